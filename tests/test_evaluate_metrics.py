"""Metric properties, hand computations, and agreement with torchcam's implementations."""

from __future__ import annotations

import contextlib
import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from lumos.api import explain
from lumos.errors import LumosError
from lumos.evaluate import (
    AverageDropIncrease,
    CascadingRandomisation,
    Deletion,
    EnergyPointingGame,
    Insertion,
    PointingGame,
    RandomLogit,
    RelevanceMass,
    boxes_to_masks,
    gaussian_blur,
    masks_to_boxes,
    rankdata,
    spearman,
    ssim,
)
from lumos.evaluate._common import minmax
from lumos.synthetic import load_tinycnn, make_dataset


class Linear2(nn.Module):
    """Two-class linear model on images: logits = (sum(w0 * x), sum(w1 * x)); exact attribution known."""

    def __init__(self, shape: tuple[int, int, int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(2, *shape, generator=g) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.w)


class SumSigmoid(nn.Module):
    """logits = (sum of pixels, 0): p(class 0) = sigmoid(sum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, torch.zeros_like(s)], 1)


@pytest.fixture(scope="module")
def synth():
    return make_dataset(200, seed=123)


@pytest.fixture(scope="module")
def tiny():
    return load_tinycnn()


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# -- localisation ---------------------------------------------------------------------------------------
def test_ground_truth_mask_as_map_scores_one_and_the_highest_energy(synth):
    masks = torch.as_tensor(synth.masks)
    gt = masks.float()
    assert PointingGame()(maps=gt, masks=masks).mean() == 1.0
    e_gt = EnergyPointingGame()(maps=gt, masks=masks)
    r_gt = RelevanceMass()(maps=gt, masks=masks)
    assert torch.allclose(e_gt, torch.ones_like(e_gt)) and torch.allclose(r_gt, torch.ones_like(r_gt))
    g = torch.Generator().manual_seed(0)
    for other in (torch.rand(gt.shape, generator=g), gt + 0.05 * torch.rand(gt.shape, generator=g),
                  torch.roll(gt, 7, dims=2)):
        assert (EnergyPointingGame()(maps=other, masks=masks) <= e_gt + 1e-6).all()
        assert (RelevanceMass()(maps=other, masks=masks) <= r_gt + 1e-6).all()


def test_random_map_scores_near_chance(synth):
    masks = torch.as_tensor(synth.masks).repeat(5, 1, 1)
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(masks.shape, generator=g)
    area = masks.flatten(1).float().mean()
    box_area = boxes_to_masks(masks_to_boxes(masks), tuple(masks.shape[-2:])).float().mean()  # a constant map is NaN
    assert abs(PointingGame()(maps=maps, masks=masks).mean() - area) < 0.03
    assert abs(RelevanceMass()(maps=maps, masks=masks).mean() - area) < 0.005
    assert abs(EnergyPointingGame()(maps=maps, masks=masks).mean() - box_area) < 0.005


def test_pointing_game_tolerance_and_ties_by_hand():
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, 0] = 1.0
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 0, 3] = True
    assert PointingGame()(maps=maps, masks=mask).item() == 0.0
    assert PointingGame(tolerance=2)(maps=maps, masks=mask).item() == 0.0
    assert PointingGame(tolerance=3)(maps=maps, masks=mask).item() == 1.0
    mask2 = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask2[0, 3, 4] = True  # distance 5 from (0, 0)
    assert PointingGame(tolerance=4.9)(maps=maps, masks=mask2).item() == 0.0
    assert PointingGame(tolerance=5)(maps=maps, masks=mask2).item() == 1.0
    tied = torch.zeros(1, 10, 10)
    tied[0, 0, 0] = tied[0, 0, 3] = 1.0
    assert PointingGame(ties="first")(maps=tied, masks=mask).item() == 0.0  # raster order: (0, 0) first
    assert PointingGame(ties="any")(maps=tied, masks=mask).item() == 1.0  # Quantus' rule
    assert PointingGame()(maps=maps, masks=torch.zeros(1, 10, 10, dtype=torch.bool)).isnan().all()


def test_energy_by_hand_and_boxes():
    maps = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 3.0, -5.0], [4.0, 0.0, 0.0]]])
    mask = torch.tensor([[[False, True, False], [False, True, False], [False, False, False]]])
    assert RelevanceMass()(maps=maps, masks=mask).item() == pytest.approx(5 / 10)
    box = masks_to_boxes(mask)
    assert box.tolist() == [[1, 0, 2, 2]]
    assert EnergyPointingGame()(maps=maps, masks=mask).item() == pytest.approx(5 / 10)
    wide = torch.tensor([[0, 0, 2, 2]])  # boxes (x0, y0, x1, y1) exclusive
    assert RelevanceMass()(maps=maps, masks=wide).item() == pytest.approx(6 / 10)


# -- deletion / insertion -------------------------------------------------------------------------------
def test_deletion_insertion_auc_equal_a_hand_computation():
    x = torch.tensor([[[[0.4, -0.3], [1.0, 0.2]]]])  # pixel values
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])  # order: (0,1), then (1,0) and (1,1) tied -> raster, then (0,0)
    model = SumSigmoid()
    order = [1, 2, 3, 0]  # flat indices
    vals = x.flatten().tolist()
    remaining = [sum(vals)]
    for k in range(1, 5):
        remaining.append(sum(v for i, v in enumerate(vals) if i not in order[:k]))
    p = [sig(s) for s in remaining]
    d = Deletion(steps=4, batch_size=3, seed=None)(model, x, maps, 0)  # seed=None: ties in raster order
    assert d.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert d.curves[0].tolist() == pytest.approx(p, abs=1e-6)
    assert d.auc.item() == pytest.approx((p[0] / 2 + p[1] + p[2] + p[3] + p[4] / 2) / 4, abs=1e-6)
    d2 = Deletion(steps=2, seed=None)(model, x, maps, 0)
    assert d2.auc.item() == pytest.approx((p[0] / 2 + p[2] + p[4] / 2) / 2, abs=1e-6)
    # insertion from the constant 0.5: inserted pixels take their value, the others stay 0.5
    ins = Insertion(steps=4, substrate=0.5, batch_size=2, seed=None)(model, x, maps, 0)
    q = [sig(sum(vals[i] if i in order[:k] else 0.5 for i in range(4))) for k in range(5)]
    assert ins.curves[0].tolist() == pytest.approx(q, abs=1e-6)
    assert ins.auc.item() == pytest.approx((q[0] / 2 + q[1] + q[2] + q[3] + q[4] / 2) / 4, abs=1e-6)


@pytest.mark.parametrize("blur", [False, True])
def test_true_importance_order_beats_its_inverse(blur):
    torch.manual_seed(0)
    shape = (3, 16, 16)
    model = Linear2(shape)
    x = torch.randn(6, *shape)
    start = gaussian_blur(x) if blur else torch.zeros_like(x)
    dw = (model.w[0] - model.w[1]).detach()
    attribution = (dw * (x - start)).sum(1)  # exact contribution of each pixel to logit0 - logit1 vs start
    ins = Insertion(steps=32, substrate=start) if not blur else Insertion(steps=32)
    dele = Deletion(steps=32)
    zero_attr = (dw * x).sum(1)
    assert (dele(model, x, zero_attr, 0).auc < dele(model, x, -zero_attr, 0).auc).all()
    assert (ins(model, x, attribution, 0).auc > ins(model, x, -attribution, 0).auc).all()


def test_deletion_batch_size_does_not_change_the_result(tiny, synth):
    x = synth.images[:3]
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = Deletion(steps=16, batch_size=5)(tiny, x, maps)
    b = Deletion(steps=16, batch_size=64)(tiny, x, maps)
    assert torch.allclose(a.curves, b.curves, atol=1e-5)


def test_average_drop_increase_match_the_formula():
    model = SumSigmoid()
    x = torch.tensor([[[[0.4, 0.3], [1.0, 0.2]]], [[[-1.0, 0.0], [0.5, -0.5]]]])
    maps = torch.tensor([[[1.0, 3.0], [2.0, 1.0]], [[0.0, 0.0], [2.0, 0.0]]])
    norm = torch.stack([(m - m.min()) / (m.max() - m.min()) for m in maps])
    y = [sig(float(v.sum())) for v in x]
    o = [sig(float((v[0] * m).sum())) for v, m in zip(x, norm, strict=True)]
    r = AverageDropIncrease()(model, x, maps, 0)
    drops = [max(0.0, yi - oi) / yi for yi, oi in zip(y, o, strict=True)]
    assert r.drop.tolist() == pytest.approx(drops, abs=1e-6)
    assert r.increase.tolist() == [oi > yi for yi, oi in zip(y, o, strict=True)] == [False, True]
    assert r.avg_drop == pytest.approx(sum(drops) / 2, abs=1e-6)
    assert r.increase_rate == 0.5


class _FixedCAM:
    """A torchcam CAM-extractor stand-in that returns given maps, so both sides rank the same map."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def test_agreement_with_torchcam(tiny, synth):
    metrics = pytest.importorskip("torchcam.metrics")
    import lumos

    x = synth.images[:3]
    cam = lumos.explain(tiny, x, method="gradcam", layer="features.block4")
    blur = gaussian_blur(x)
    softmax = partial(torch.softmax, dim=-1)
    rand = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    for maps in (cam.raw.relu(), rand):  # a layer-size map (upsampled alike) and an input-size one
        ext = _FixedCAM(tiny, maps)
        ref = metrics.DeletionInsertionMetric(ext, softmax, steps=16, baseline=None, batch_size=51)
        ref.update(x)
        ref_blur = metrics.DeletionInsertionMetric(ext, softmax, steps=16, baseline=blur, batch_size=51)
        ref_blur.update(x)
        # torchcam orders tied pixels (the ReLU's zeros) in raster order: seed=None is that convention
        assert Deletion(steps=16, seed=None)(tiny, x, maps).mean_auc == pytest.approx(
            ref.summary()["deletion_auc"], abs=1e-4)
        assert Insertion(steps=16, substrate=0.0, seed=None)(tiny, x, maps).mean_auc == pytest.approx(
            ref.summary()["insertion_auc"], abs=1e-4)
        assert Insertion(steps=16, seed=None)(tiny, x, maps).mean_auc == pytest.approx(
            ref_blur.summary()["insertion_auc"], abs=1e-4)
        # torchcam multiplies by the map as its extractor returns it (min-max normalised); ours normalises
        cls = metrics.ClassificationMetric(_FixedCAM(tiny, minmax(maps)), softmax)
        cls.update(x)
        r = AverageDropIncrease()(tiny, x, maps)
        assert r.avg_drop == pytest.approx(cls.summary()["avg_drop"], abs=1e-4)
        assert r.increase_rate == pytest.approx(cls.summary()["conf_increase"], abs=1e-6)


# -- sanity helpers -------------------------------------------------------------------------------------
def test_spearman_and_ssim_match_scipy_and_skimage():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 20, 24, generator=g)
    b = (a + 0.5 * torch.rand(3, 20, 24, generator=g)).clamp(0, 1)
    a[0, :5] = 0.0  # ties
    b[0, :3] = 0.0
    assert rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    for i in range(3):
        rho = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert spearman(a[i : i + 1], b[i : i + 1]).item() == pytest.approx(rho, abs=1e-5)
        ref = skm.structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0)
        assert ssim(a[i : i + 1], b[i : i + 1]).item() == pytest.approx(ref, abs=1e-5)
    assert spearman(a, a).tolist() == pytest.approx([1.0] * 3)
    assert spearman(a, torch.zeros_like(a)).isnan().all()  # a blank map has no ranks: undefined, as in scipy


# -- the model is left as found ----------------------------------------------------------------------
def test_metrics_leave_the_model_as_found(synth):
    model = load_tinycnn().train()
    model.features.block1.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    x = synth.images[:2]
    maps = torch.rand(2, 64, 64)
    Deletion(steps=4)(model, x, maps)
    Insertion(steps=4)(model, x, maps)
    AverageDropIncrease()(model, x, maps)
    CascadingRandomisation("gradcam", layer="features.block4", max_steps=2)(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.features.block1.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_sanity_checks_log_no_blank_map_lines_for_their_randomised_models(synth, caplog):
    """Randomising the whole model blanks Grad-CAM on these images (checked): an expected outcome of the check,
    so it logs no "zero everywhere" line, while the same blank maps from a plain call do."""
    model, x = load_tinycnn(), synth.images[:4]
    with caplog.at_level("WARNING", logger="lumos.engine"):
        result = CascadingRandomisation("gradcam", layer="features.block4")(model, x)
        RandomLogit("gradcam", layer="features.block4")(model, x)
    assert bool((result.maps[-1].flatten(1) == 0).all(1).any())  # some randomised maps are blank
    assert not [r for r in caplog.records if "zero everywhere" in r.getMessage()]
    model.fc.weight.data.zero_()  # a plain call with blank maps is reported
    with caplog.at_level("WARNING", logger="lumos.engine"):
        explain(model, x, "gradcam", layer="features.block4")
    assert [r for r in caplog.records if "zero everywhere" in r.getMessage()]


def test_bad_inputs_are_one_line_errors(tiny, synth):
    x = synth.images[:2]
    with pytest.raises(LumosError, match="maps must be"):
        Deletion()(tiny, x, torch.rand(3, 64, 64))
    with pytest.raises(LumosError, match="steps"):
        Deletion(steps=0)
    with pytest.raises(LumosError, match="targets"):
        Deletion(steps=4)(tiny, x, torch.rand(2, 64, 64), [1, 2, 3])
    with pytest.raises(LumosError, match="masks"):
        PointingGame()(maps=torch.rand(2, 64, 64), masks=torch.ones(2, 32, 32, dtype=torch.bool))
    with pytest.raises(LumosError, match="no such module"):
        CascadingRandomisation("gradcam", layers=["nope"])(tiny, x)
    assert Deletion(steps=4)(tiny, x, torch.zeros(2, 64, 64)).auc.isnan().all()  # blank maps: undefined


# -- axioms ------------------------------------------------------------------------------------------------
def test_completeness_on_a_linear_model():
    from lumos.evaluate import Completeness

    torch.manual_seed(0)
    model = Linear2((3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    exact = model.w[0].detach() * x  # gradient x input = IG for a linear model with a zero baseline
    res = Completeness()(model, x, exact, 0)
    assert res.delta.max() < 1e-5
    assert (Completeness()(model, x, exact * 1.5, 0).relative > 0.4).all()
    import lumos

    if "integrated_gradients" in lumos.methods():
        raw = lumos.explain(model, x, method="integrated_gradients", target=0).raw
        assert Completeness()(model, x, raw, 0).relative.max() < 1e-3
