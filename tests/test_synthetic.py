"""Tests for the synthetic ground-truth data set and the bundled TinyCNN weights.

The localisation test uses a minimal Grad-CAM written here (independent of the lumos engine) to
check that the committed model looks at the object: the map's argmax must fall inside the object's
mask dilated by ``TOLERANCE_PX`` pixels (the CAM layer is 16x16 for a 64x64 image, so one map cell
spans 4 pixels; the 2-pixel tolerance absorbs upsampling blur at the object's edge).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lumos.synthetic import CLASS_NAMES, SyntheticData, TinyCNN, load_tinycnn, make_dataset

HELD_OUT_SEED = 123
N_HELD_OUT = 200
TOLERANCE_PX = 2


@pytest.fixture(scope="module")
def held_out() -> SyntheticData:
    return make_dataset(N_HELD_OUT, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def model() -> TinyCNN:
    return load_tinycnn()


def test_same_seed_same_data_and_global_rng_untouched() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = make_dataset(12, size=48, seed=5)
    assert torch.equal(torch.rand(3), expected), "make_dataset must not consume the global torch RNG"
    b = make_dataset(12, size=48, seed=5)
    for name in ("images", "labels", "masks", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_different_seed_different_data() -> None:
    a, b = make_dataset(8, seed=0), make_dataset(8, seed=1)
    assert not torch.equal(a.images, b.images)
    assert not torch.equal(a.masks, b.masks)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtypes_range(size: int) -> None:
    n = 10
    d = make_dataset(n, size=size, seed=3)
    assert len(d) == n
    assert d.images.shape == (n, 3, size, size) and d.images.dtype == torch.float32
    assert d.labels.shape == (n,) and d.labels.dtype == torch.int64
    assert d.masks.shape == (n, size, size) and d.masks.dtype == torch.bool
    assert d.boxes.shape == (n, 4) and not d.boxes.dtype.is_floating_point
    assert d.class_names == CLASS_NAMES
    assert d.images.min() >= 0.0 and d.images.max() <= 1.0
    assert d.labels.min() >= 0 and d.labels.max() < len(d.class_names)


def test_empty_and_invalid() -> None:
    assert len(make_dataset(0)) == 0
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1)


def test_masks_match_boxes(held_out: SyntheticData) -> None:
    size = held_out.images.shape[-1]
    for mask, (x0, y0, x1, y1) in zip(held_out.masks, held_out.boxes.tolist(), strict=True):
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert mask.any()
        assert not (mask & ~inside).any(), "object pixels outside the box"
        # The box is tight: every edge row/column touches the object.
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
    area = held_out.masks.float().mean((1, 2))
    assert area.min() > 0.005 and area.max() < 0.1, "object should cover a small part of the image"


def test_labels_balanced(held_out: SyntheticData) -> None:
    counts = torch.bincount(held_out.labels, minlength=len(CLASS_NAMES))
    assert counts.max() - counts.min() <= 1
    first = make_dataset(40, seed=9).labels[:20]
    assert len(set(first.tolist())) == len(CLASS_NAMES), "labels should be shuffled, not sorted"


def test_tinycnn_architecture() -> None:
    m = TinyCNN(num_classes=3)
    out = m(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3)
    feats = m.features(torch.rand(1, 3, 64, 64))
    assert feats.shape == (1, 64, 16, 16)
    assert isinstance(m.pool, torch.nn.AdaptiveAvgPool2d) and isinstance(m.fc, torch.nn.Linear)


def test_load_tinycnn_eval_mode(model: TinyCNN) -> None:
    assert not model.training
    assert model.fc.out_features == len(CLASS_NAMES)


def test_committed_model_accuracy(model: TinyCNN, held_out: SyntheticData) -> None:
    with torch.no_grad():
        preds = model(held_out.images).argmax(1)
    acc = (preds == held_out.labels).float().mean().item()
    assert acc >= 0.95, f"held-out accuracy {acc:.3f} < 0.95"


def _grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minimal reference Grad-CAM, ``(N, H, W)`` at the input's resolution."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    act = store["a"]
    score = logits.gather(1, target[:, None])
    (grad,) = torch.autograd.grad(score.sum(), act)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


def _hit_rate(maps: torch.Tensor, masks: torch.Tensor, tolerance: int) -> float:
    """Fraction of maps whose argmax lies in the mask dilated by ``tolerance`` pixels."""
    k = 2 * tolerance + 1
    dilated = F.max_pool2d(masks[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0
    flat = maps.flatten(1).argmax(1)
    hits = dilated.flatten(1).gather(1, flat[:, None])[:, 0]
    return hits.float().mean().item()


def test_hit_rate_helper_can_fail() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 0, 0] = True
    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 1] = 1.0  # one pixel off: a hit only with tolerance
    maps[1, 7, 7] = 1.0  # far away: never a hit
    assert _hit_rate(maps, masks, 0) == 0.0
    assert _hit_rate(maps, masks, 1) == 0.5


def test_grad_cam_points_at_object(model: TinyCNN, held_out: SyntheticData) -> None:
    maps = _grad_cam(model, model.features.block4, held_out.images, held_out.labels)
    hit = _hit_rate(maps, held_out.masks, TOLERANCE_PX)
    assert hit >= 0.9, f"Grad-CAM pointing-game hit rate {hit:.3f} < 0.9"

    gen = torch.Generator().manual_seed(0)
    random_maps = torch.rand(maps.shape, generator=gen)
    random_hit = _hit_rate(random_maps, held_out.masks, TOLERANCE_PX)
    dilated_area = F.max_pool2d(held_out.masks[:, None].float(), 5, stride=1, padding=2).mean().item()
    assert random_hit < 0.3, f"random maps hit {random_hit:.3f}: the benchmark is too easy"
    assert abs(random_hit - dilated_area) < 0.1
