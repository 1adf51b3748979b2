"""Layer maps with nothing to show must not come out as stretched rounding noise."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lumos
from lumos.errors import LumosError
from lumos.explanation import finish_maps, normalize_maps, upsample, upsample_minmax
from nets import GapNet, images


class PointwiseNet(nn.Module):
    """1x1 stride-2 conv -> ReLU -> GAP -> linear: a constant image gives a constant layer map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1, stride=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.bias.fill_(0.5)
            self.fc.weight.fill_(1.0)  # positive evidence: Grad-CAM's raw map is > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 7)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_a_constant_map_upsampled_and_scaled_is_zeros(shape, mode):
    raw = torch.full((2, *shape), 1.7)
    assert not upsample_minmax(raw, (224, 224), mode).any()
    assert not finish_maps([raw], (224, 224), True, "minmax", mode).any()


def test_plain_upsampling_of_a_constant_map_is_noise_that_minmax_would_stretch():
    # why upsample_minmax exists: the plain path turns a flat 3x5 map into a full-range pattern
    noisy = normalize_maps(upsample(torch.full((1, 3, 5), 1.7), (224, 224), "bicubic"), "minmax")
    assert noisy.max() == 1 and noisy.std() > 0.05


def test_a_varying_map_is_still_scaled_to_the_full_range():
    raw = torch.arange(15.0).view(1, 3, 5)
    out = upsample_minmax(raw, (30, 50), "bilinear")
    assert out.min() == 0 and out.max() == 1


@pytest.mark.parametrize("method", ["gradcam", "layercam", "scorecam", "eigencam", "guided_gradcam"])
def test_a_1x1_layer_is_a_one_line_error_for_every_layer_method(method):
    with pytest.raises(LumosError, match=r"Layer 'pool' outputs 16x1x1: one value per channel"):
        lumos.explain(GapNet().eval(), images(2), method=method, layer="pool")


def test_a_constant_image_gives_a_blank_map_with_the_reason(caplog):
    x = torch.full((1, 3, 32, 32), 0.3)
    with caplog.at_level(logging.WARNING, logger="lumos"):
        ex = lumos.explain(PointwiseNet().eval(), x, method="gradcam", layer="act", target=0, upsample="bicubic")
    assert ex.raw.shape[-2:] == (16, 16) and ex.raw.amax() == ex.raw.amin() > 0
    assert not ex.maps.any()
    assert "same at every position" in caplog.text


def test_score_cam_masks_from_a_constant_channel_are_zeros_not_noise():
    # a channel constant over a 3x5 layer adds nothing to Score-CAM: its mask must be empty
    acts = torch.stack([torch.full((3, 5), 0.9), torch.arange(15.0).view(3, 5)])
    masks = upsample_minmax(acts, (48, 80), "bilinear")
    assert not masks[0].any() and masks[1].max() == 1
