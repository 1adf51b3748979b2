"""Audit of the evaluation metrics: undefined cases say so (NaN), tied pixels carry no layout bias, and each
number is checked against a closed form or an independent reference (scipy, scikit-image)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lumos.errors import LumosError
from lumos.evaluate import AverageDropIncrease, Deletion, Insertion, pixel_ranks


class RegionSigmoid(nn.Module):
    """logits = (a * (mean of the pixels in ``region``) - a / 2, 0): p(class 0) = sigmoid(a * (mean - 1/2))."""

    def __init__(self, region: torch.Tensor, a: float = 6.0) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (x[:, 0] * self.region).flatten(1).sum(1, keepdim=True) / self.region.sum()
        s = self.a * (mean - 0.5)
        return torch.cat([s, torch.zeros_like(s)], 1)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# -- deletion: ties ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_deletion_of_a_tied_plateau_has_no_raster_bias(where):
    """A map that ranks one pixel and ties all others (a CAM's zeros, a plateau) says nothing about where the
    object is; deleting the plateau in raster order made an object in the top rows look 'explained' (low AUC)
    and one in the bottom rows not. Closed form: with the plateau in an order unrelated to the layout, the
    object loses on average the same share of its pixels as the image, f_k = (c_k - 1) / (n - 1) after
    c_k > 0 pixels, so p_k ~ sigmoid(a (1 - f_k - 1/2))."""
    h = w = 32
    region = torch.zeros(h, w, dtype=torch.bool)
    if where == "top":
        region[:8] = True
    else:
        region[-8:] = True
    model = RegionSigmoid(region)
    x = torch.ones(1, 1, h, w)
    maps = torch.zeros(1, h, w)
    maps[0, 16, 16] = 1.0  # outside the object; every other pixel tied at 0
    steps = 64
    d = Deletion(steps=steps)(model, x, maps, 0)
    n = h * w
    counts = [k * n // steps for k in range(steps + 1)]
    ref = [sig(6.0 * (1 - max(c - 1, 0) / (n - 1) - 0.5)) for c in counts]
    fr = [c / n for c in counts]
    ref_auc = sum((fr[i + 1] - fr[i]) * (ref[i] + ref[i + 1]) / 2 for i in range(steps))
    assert d.auc.item() == pytest.approx(ref_auc, abs=0.02)
    # raster order (seed=None, the old behaviour) is far off in one direction or the other
    raster = Deletion(steps=steps, seed=None)(model, x, maps, 0).auc.item()
    assert abs(raster - ref_auc) > 0.2


def test_tie_order_is_the_same_for_every_image_and_keeps_the_strict_order():
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 3, (3, 6, 7), generator=g).float()  # many ties
    ranks = pixel_ranks(maps)
    flat = maps.flatten(1)
    for i in range(3):  # a higher value always ranks first; ranks are a permutation
        assert sorted(ranks[i].tolist()) == list(range(42))
        hi, lo = flat[i][:, None] > flat[i][None, :], ranks[i][:, None] < ranks[i][None, :]
        assert bool(lo[hi].all())
    alone = torch.cat([pixel_ranks(maps[i : i + 1]) for i in range(3)])
    assert torch.equal(alone, ranks)  # an image's ranks do not depend on the rest of the batch


# -- constant maps: undefined, not a plausible number -------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 0.7])
def test_constant_maps_give_nan_curves_and_auc(value):
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:2] = True
    model = RegionSigmoid(region)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    maps[1] = value
    for metric in (Deletion(steps=4), Insertion(steps=4, substrate=0.0)):
        r = metric(model, x, maps, 0)
        assert r.defined.tolist() == [True, False]
        assert r.auc[1].isnan() and r.curves[1].isnan().all()
        assert not r.auc[0].isnan()
        assert r.mean_auc == pytest.approx(r.auc[0].item())  # the mean is over the defined images
    drop = AverageDropIncrease()(model, x, maps, 0)
    assert drop.defined.tolist() == [True, False]
    assert drop.drop[1].isnan() and not drop.drop[0].isnan()
    y0, o0 = drop.probs[0].item(), drop.masked_probs[0].item()
    assert drop.avg_drop == pytest.approx(max(0.0, y0 - o0) / y0, abs=1e-6)
    assert drop.increase_rate == float(o0 > y0)


def test_non_finite_maps_are_refused():
    model = RegionSigmoid(torch.ones(4, 4, dtype=torch.bool))
    maps = torch.rand(2, 4, 4)
    maps[1, 2, 2] = float("nan")
    with pytest.raises(LumosError, match=r"maps must be finite.*\[1\]"):
        Deletion(steps=4)(model, torch.rand(2, 1, 4, 4), maps, 0)


# -- localisation -------------------------------------------------------------------------------------------
def test_localisation_of_a_constant_or_non_positive_map_is_nan():
    from lumos.evaluate import EnergyPointingGame, PointingGame, RelevanceMass

    mask = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask[:, :2, :2] = True  # holds the top-left corner, where "first" of a constant map used to point
    maps = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    maps[1] = 0.0  # blank
    maps[2] = -maps[2]  # signed, nothing positive (not constant)
    pg_first, pg_any = PointingGame()(maps=maps, masks=mask), PointingGame(ties="any")(maps=maps, masks=mask)
    assert pg_first[1].isnan() and pg_any[1].isnan()
    assert not pg_first[0].isnan() and not pg_first[2].isnan()  # a negative map still has a maximum
    for metric in (EnergyPointingGame(), EnergyPointingGame(use_box=False), RelevanceMass()):
        out = metric(maps=maps, masks=mask)
        assert out[1:].isnan().all(), type(metric).__name__
        pos = maps[0].clamp_min(0)
        assert out[0].item() == pytest.approx((pos * mask[0]).sum().item() / pos.sum().item(), rel=1e-6)
    flat = torch.full((1, 6, 6), 0.3)
    assert RelevanceMass()(maps=flat, masks=mask[:1]).isnan().all()  # only the mask's area share: no information


def test_localisation_upsamples_a_small_map_to_the_images_so_boxes_are_in_image_pixels():
    import torch.nn.functional as F

    from lumos.evaluate import EnergyPointingGame, PointingGame, RelevanceMass

    images = torch.rand(2, 3, 16, 16)
    small = torch.zeros(2, 4, 4)
    small[0, 3, 3] = 1.0  # bottom-right cell
    small[1, 0, 1] = 1.0  # top row, second cell
    boxes = torch.tensor([[8, 8, 16, 16], [4, 0, 8, 4]])  # in image pixels, x1/y1 exclusive
    big = F.interpolate(small[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    for metric in (PointingGame(), PointingGame(tolerance=3.0), EnergyPointingGame(), RelevanceMass()):
        got = metric(images=images, maps=small, masks=boxes)
        ref = metric(maps=big, masks=boxes)
        assert torch.allclose(got, ref), type(metric).__name__
    assert PointingGame()(images=images, maps=small, masks=boxes).tolist() == [1.0, 1.0]
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 8:, 8:] = True
    masks[1, :4, 4:8] = True
    got = RelevanceMass()(images=images, maps=small, masks=masks)
    assert torch.allclose(got, RelevanceMass()(maps=big, masks=boxes))


# -- sanity checks ------------------------------------------------------------------------------------------
def test_spearman_of_a_constant_map_is_undefined_as_in_scipy():
    stats = pytest.importorskip("scipy.stats")
    import warnings

    from lumos.evaluate import spearman

    a = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0))
    blank = torch.zeros_like(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = stats.spearmanr(a[0].flatten().numpy(), blank[0].flatten().numpy()).statistic
    assert math.isnan(ref)
    assert spearman(a, blank).isnan().all()
    assert spearman(blank, blank).isnan().all()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_ssim_matches_skimage_with_the_maps_own_range_at_any_scale(scale):
    skm = pytest.importorskip("skimage.metrics")
    from lumos.evaluate import ssim

    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 20, 24, generator=g, dtype=torch.float64) * scale
    b = torch.rand(2, 20, 24, generator=g, dtype=torch.float64) * scale * 0.7  # unrelated maps
    got = ssim(a, b)
    for i in range(2):
        lo, hi = min(a[i].min(), b[i].min()).item(), max(a[i].max(), b[i].max()).item()
        ref = skm.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=hi - lo)
        assert got[i].item() == pytest.approx(ref, abs=1e-5)
        assert got[i].item() < 0.5  # unrelated maps are dissimilar at any scale (data_range=1: small ones were ~1)
    assert ssim(a, b, data_range=1.0)[0].item() == pytest.approx(
        skm.structural_similarity(a[0].numpy(), b[0].numpy(), data_range=1.0), abs=1e-5)


def test_random_logit_says_when_the_other_class_map_is_blank():
    from lumos.evaluate import RandomLogit

    model = RegionSigmoid(torch.ones(12, 12, dtype=torch.bool))  # two classes
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    own = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(1))

    def explainer(model, images, classes):  # class 0: a map; class 1: blank (as Grad-CAM of a class argued against)
        return torch.where((classes == 0)[:, None, None], own, torch.zeros_like(own))

    r = RandomLogit(explainer)(model, x, targets=0)
    assert r.other_classes.tolist() == [1, 1]
    assert r.other_blank.tolist() == [True, True]
    assert r.spearman.isnan().all()  # undefined, not a 'perfectly uncorrelated' 0
    assert not r.ssim.isnan().any()


# -- targets ------------------------------------------------------------------------------------------------
def test_targets_out_of_range_or_fractional_are_one_line_errors():
    from lumos.evaluate import Completeness, RandomLogit

    model = RegionSigmoid(torch.ones(8, 8, dtype=torch.bool))  # two classes
    x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
    for t in (2, -1, [0, 5]):
        for run in (lambda t: Deletion(steps=4)(model, x, maps, t), lambda t: AverageDropIncrease()(model, x, maps, t),
                    lambda t: Completeness()(model, x, torch.rand(2, 1, 8, 8), t),
                    lambda t: RandomLogit(lambda m, i, c: maps)(model, x, targets=t)):
            with pytest.raises(LumosError, match="out of range: the model has 2 classes"):
                run(t)
    with pytest.raises(LumosError, match="whole class indices"):
        Deletion(steps=4)(model, x, maps, torch.tensor([0.0, 0.6]))  # was truncated to class 0, silently
    given = Deletion(steps=4)(model, x, maps, torch.tensor([1.0, 0.0]))  # whole floats are class indices
    assert given.classes.tolist() == [1, 0]


# -- lumos evaluate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("benchmark", ["synthetic", "synthetic-detection", "synthetic-segmentation"])
@pytest.mark.parametrize(("flag", "value"), [("--steps", 0), ("--batch-size", -2), ("--n", 0)])
def test_evaluate_names_the_option_at_fault(capsys, tmp_path, benchmark, flag, value):
    from cli_run import run_cli

    code, out, err = run_cli(capsys, "evaluate", "--benchmark", benchmark, "--method", "gradcam",
                             "--out", tmp_path / "o", flag, value)
    assert code != 0
    assert f"{flag} must be a positive integer, got {value}" in err
    others = {"--steps", "--batch-size", "--n"} - {flag}
    assert not any(o in err for o in others), err


# -- boxes ----------------------------------------------------------------------------------------------------
def test_fractional_boxes_hold_the_pixels_whose_centre_is_inside_and_mirror_consistently():
    from lumos.evaluate import boxes_to_masks

    w = 10
    box = torch.tensor([[2.6, 1.2, 5.4, 3.9]])
    mask = boxes_to_masks(box, (6, w))[0]
    cols = [x for x in range(w) if 2.6 <= x + 0.5 < 5.4]
    rows = [y for y in range(6) if 1.2 <= y + 0.5 < 3.9]
    assert mask.nonzero().tolist() == [[y, x] for y in rows for x in cols]
    mirrored = torch.tensor([[w - 5.4, 1.2, w - 2.6, 3.9]])  # the same box seen in the mirrored image
    assert torch.equal(boxes_to_masks(mirrored, (6, w))[0], mask.flip(1))
    whole = torch.tensor([[2, 1, 5, 4]])
    assert torch.equal(boxes_to_masks(whole.float(), (6, w)), boxes_to_masks(whole, (6, w)))  # integers unchanged


# -- batch size ---------------------------------------------------------------------------------------------
def test_results_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(4)
    region = torch.rand(10, 10, generator=g) > 0.5
    model = RegionSigmoid(region)
    x = torch.rand(3, 1, 10, 10, generator=g)
    maps = torch.randint(0, 4, (3, 5, 5), generator=g).float()  # small (upsampled) and with ties
    for make in (lambda b: Deletion(steps=7, batch_size=b), lambda b: Insertion(steps=7, batch_size=b)):
        ref = make(64)(model, x, maps, 0)
        for b in (1, 2, 5):
            got = make(b)(model, x, maps, 0)
            assert torch.allclose(got.curves, ref.curves, atol=1e-6) and torch.allclose(got.auc, ref.auc, atol=1e-6)
    ref = AverageDropIncrease(batch_size=64)(model, x, maps, 0)
    for b in (1, 2):
        got = AverageDropIncrease(batch_size=b)(model, x, maps, 0)
        assert torch.allclose(got.drop, ref.drop, atol=1e-6) and torch.equal(got.increase, ref.increase)


def test_curve_result_reports_the_largest_plateau():
    model = RegionSigmoid(torch.ones(4, 4, dtype=torch.bool))
    maps = torch.arange(32.0).view(2, 4, 4)
    maps[0, 0, :3] = 5.0  # 5 appears 4 times (with the original 5 at (1, 1))
    maps[1] = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11.0]])
    r = Deletion(steps=4)(model, torch.rand(2, 1, 4, 4), maps, 0)
    by_hand = [max(int((m == v).sum()) for v in m.flatten()) / 16 for m in maps]
    assert r.plateau.tolist() == pytest.approx(by_hand)
    assert r.plateau.tolist() == pytest.approx([4 / 16, 3 / 16])


@pytest.mark.parametrize("benchmark", ["synthetic", "synthetic-detection", "synthetic-segmentation"])
def test_evaluate_names_steps_when_they_exceed_the_pixels(capsys, tmp_path, benchmark):
    from cli_run import run_cli
    from lumos.synthetic import make_dataset

    h, w = make_dataset(1, seed=123).images.shape[-2:]  # the benchmarks' image size
    code, out, err = run_cli(capsys, "evaluate", "--benchmark", benchmark, "--method", "gradcam",
                             "--out", tmp_path / "o", "--steps", h * w + 1, "--n", 2)
    assert code != 0
    assert f"--steps {h * w + 1} exceeds the {h * w} pixels" in err and f"--steps {h * w} or fewer" in err
    assert "skipped" not in err


def test_evaluate_names_steps_for_image_files(capsys, tmp_path):
    from PIL import Image

    from cli_run import run_cli

    Image.new("RGB", (8, 8), (120, 30, 200)).save(tmp_path / "a.png")
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "a.png", "--model", "lumos.synthetic:load_tinycnn",
                             "--method", "gradcam", "--size", 16, "--mean", "0", "--std", "1",
                             "--out", tmp_path / "o", "--steps", 257)
    assert code != 0
    assert f"--steps {16 * 16 + 1} exceeds the {16 * 16} pixels" in err, err


def test_the_table_note_counts_blank_maps_left_out_of_the_means():
    from lumos.evaluate.benchmark import EvaluationReport, _mean
    from lumos.evaluate.report import undefined_note

    nan = float("nan")
    report = EvaluationReport()
    report.per_image = {"rise": {"deletion_auc": [0.1, nan, 0.3, nan]}, "gradcam": {"deletion_auc": [0.2, 0.4]}}
    report.rows = {m: {k: _mean(torch.tensor(v)) for k, v in per.items()} for m, per in report.per_image.items()}
    assert report.rows["rise"]["deletion_auc"] == pytest.approx(0.2)  # the mean of the two defined values
    assert undefined_note(report, "regions") == (
        "Constant (blank) maps, undefined and left out of the means: rise 2 of 4 regions.")
    report.per_image["rise"]["deletion_auc"] = [0.1, 0.3]
    assert undefined_note(report) is None
