"""Segmentation targets: a class over a region (predicted, user mask, box), hand-computed; the region is fixed
on the clean output; torchvision's DeepLabV3 (random weights) runs; the shipped segmenter's maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
from lumos.targets import TargetError
from lumos.tasks import SegmentationModel, SegmentationTarget, box_mask


def logits() -> torch.Tensor:
    out = torch.zeros(1, 3, 4, 4)
    out[0, 1, :2, :2] = 2.0  # class 1 wins the top-left 2x2
    out[0, 2, 2:, 2:] = 3.0  # class 2 wins the bottom-right 2x2
    out[0, 1, 3, 3] = 1.0
    return out


def test_region_scores_by_hand():
    out = logits()
    assert SegmentationTarget(1)(out).tolist() == [8.0]  # predicted region: 4 pixels of 2
    assert SegmentationTarget(1, reduce="mean")(out).tolist() == [2.0]
    assert SegmentationTarget(1, box=(2, 2, 4, 4))(out).tolist() == [1.0]  # box in output pixels: [3, 3] only
    user = torch.zeros(8, 8, dtype=torch.bool)
    user[6:, 6:] = True  # at twice the output size: resized (nearest) to the [3, 3] pixel
    assert SegmentationTarget(1, user)(out).tolist() == [1.0]
    assert box_mask((4, 4), (1, 0, 3, 2)).nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]


def test_predicted_region_is_fixed_on_the_clean_output():
    out = logits()
    fixed = SegmentationTarget(1).resolve_targets(out).target
    shifted = out.roll(2, dims=3)  # class 1 now predicted elsewhere; the clean region scores 0 there
    assert fixed.scores(shifted).tolist() == [[0.0]]
    assert SegmentationTarget(1)(shifted).tolist() == [8.0]  # the bare callable would have moved along


def test_clear_errors():
    ones = torch.zeros(1, 3, 4, 4)
    ones[:, 1] = 1.0
    with pytest.raises(TargetError, match="no pixel of class 2"):
        SegmentationTarget(2).resolve_targets(ones)
    with pytest.raises(TargetError, match="out of range"):
        SegmentationTarget(5)(logits())
    with pytest.raises(TargetError, match="H, W"):
        SegmentationTarget(1)(torch.zeros(2, 3))
    with pytest.raises(TargetError, match="not both"):
        SegmentationTarget(1, torch.ones(4, 4), box=(0, 0, 1, 1))


class Pixelwise(nn.Module):
    """A 1x1 conv segmenter: class c's logit at a pixel depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": self.conv(x), "aux": x}


def test_region_gradcam_vanishes_off_the_region_and_dict_outputs_work():
    model, x = Pixelwise(), torch.rand(1, 3, 8, 8)
    target = SegmentationTarget(1, box=(0, 0, 4, 4))
    ex = lumos.explain(model, x, "hirescam", target=target, layer="conv", output="out")
    wrapped = lumos.explain(SegmentationModel(model), x, "hirescam", target=target, layer="model.conv")
    assert torch.equal(ex.raw, wrapped.raw)
    # closed form: d sum_{region} z_1 / d z = 1 on the region for channel 1 -> HiResCAM = z_1 on the region
    z1 = model.conv(x)[0, 1].detach()
    assert torch.allclose(ex.raw[0, :4, :4], z1[:4, :4]) and ex.raw[0, 4:].abs().max() == 0


def test_deeplabv3_mobilenet_random_weights_runs(one_thread):
    seg = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = SegmentationModel(seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                               num_classes=3, aux_loss=False)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    category = int(before.argmax(1).flatten().mode().values)
    for method in ("gradcam", "occlusion"):
        kw = {"window": 32, "stride": 32} if method == "occlusion" else {}
        ex = lumos.explain(model, x, method, target=SegmentationTarget(category), layer="model.backbone.16", **kw)
        assert ex.maps.shape == (1, 64, 64) and torch.isfinite(ex.maps).all()
    assert torch.equal(model(x).detach(), before)


# -- the shipped segmenter on held-out scenes ------------------------------------------------------------
def test_shipped_segmenter_class_region_energy_in_the_class_mask(one_thread):
    from lumos.synthetic.scenes import make_scenes
    from lumos.synthetic.segmenter import load_tinysegmenter

    model, scenes = load_tinysegmenter(), make_scenes(16, seed=123)
    gen = torch.Generator().manual_seed(0)
    own, rand = [], []
    for i in range(len(scenes)):
        x = scenes.images[i:i + 1]
        with torch.no_grad():
            pred = model(x).argmax(1)[0]
        for c in scenes.semantic[i].unique().tolist():
            if c == 0 or not (pred == c).any():
                continue
            maps = lumos.explain(model, x, "gradcam", target=SegmentationTarget(c), layer="features.block5").maps
            mask = (scenes.semantic[i] == c).float()
            own.append(float((maps[0] * mask).sum() / maps[0].sum()))
            r = torch.rand(64, 64, generator=gen)
            rand.append(float((r * mask).sum() / r.sum()))
    assert len(own) >= 20
    assert sum(own) / len(own) >= 2 * sum(rand) / len(rand)


def test_cli_helper_writes_one_overlay_per_predicted_class(one_thread, tmp_path):
    from lumos.cli_tasks import explain_segmentation
    from lumos.synthetic.scenes import make_scenes
    from lumos.synthetic.segmenter import load_tinysegmenter

    model, scenes = load_tinysegmenter(), make_scenes(2, seed=123)
    with torch.no_grad():
        predicted = [c for c in model(scenes.images[:1]).argmax(1).unique().tolist() if c]
    paths = explain_segmentation(model, scenes.images[:1], tmp_path, layer="features.block5", scale=1)
    assert [p.name for p in paths] == [*(f"image_class{c}.png" for c in predicted), "image_segments.png"]
