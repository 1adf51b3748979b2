"""On data with known object locations, lumos's Grad-CAM peak lands on the object; a random map does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lumos
from lumos.synthetic import load_tinycnn, make_dataset

TOLERANCE_PX = 2  # one cell of the 16x16 CAM layer covers 4x4 input pixels


def hit_rate(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = TOLERANCE_PX) -> float:
    k = 2 * tolerance + 1
    dilated = F.max_pool2d(masks[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0
    peaks = maps.flatten(1).argmax(1)
    return dilated.flatten(1).gather(1, peaks[:, None]).float().mean().item()


@pytest.fixture(scope="module")
def data():
    return make_dataset(200, seed=123)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "cam"])
def test_cam_peak_inside_object(data, method):
    model = load_tinycnn()
    ex = lumos.explain(model, data.images, method=method, target=data.labels)
    rate = hit_rate(ex.maps, data.masks)
    assert rate >= 0.9, f"{method}: peak inside the object for {rate:.1%} of images"


def test_random_map_does_not_point_at_object(data):
    maps = torch.rand(data.images.shape[0], *data.images.shape[-2:], generator=torch.Generator().manual_seed(0))
    assert hit_rate(maps, data.masks) < 0.3
