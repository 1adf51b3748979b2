"""Occlusion and RISE: checked against Captum's Occlusion, against their own definitions, and on the
synthetic benchmark (localisation beats random)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion

import lumos
from lumos.evaluate.benchmark import synthetic_benchmark
from lumos.methods.rise import rise_masks
from nets import GapNet

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def captum_occlusion(model, x, target, window, stride, baseline=0.0):
    c = x.shape[1]
    return CaptumOcclusion(model).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                            baselines=baseline, target=target, perturbations_per_eval=16)


@pytest.mark.parametrize(("size", "window", "stride"), [(32, 8, 4), (30, 8, 5), (32, 6, 6)])
def test_occlusion_equals_captum_on_a_small_relu_net(size, window, stride):
    torch.manual_seed(0)
    model = GapNet(classes=4).eval()
    x = torch.randn(3, 3, size, size)
    ex = lumos.explain(model, x, method="occlusion", target=[0, 2, 3], window=window, stride=stride, baseline=0.25,
                       relu=False, normalize=None, batch_size=7)
    ref = captum_occlusion(model, x, torch.tensor([0, 2, 3]), window, stride, baseline=0.25)
    assert torch.equal(ref[:, 0], ref[:, 1])  # Captum's window spans the channels: one value per pixel
    assert ex.kind == "region" and ex.raw.shape == (3, size, size)
    assert rel(ex.raw, ref[:, 0]) <= 1e-5


def test_occlusion_equals_captum_on_the_bundled_model():
    bundle = lumos.load_model("efficientnet_lite0", size=96)
    from lumos.io import sample_images

    x = bundle.preprocess([sample_images()["chelsea"]])
    ex = lumos.explain(bundle.model, x, method="occlusion", window=16, stride=16, relu=False, normalize=None)
    ref = captum_occlusion(bundle.model.eval(), x, ex.targets, 16, 16)
    assert rel(ex.raw, ref[:, 0]) <= 1e-5


def test_occlusion_settings_are_checked():
    model = GapNet()
    for bad in (dict(window=0), dict(stride=(2, 3, 4)), dict(window=4, stride=8), dict(batch_size=2.5),
                dict(baseline="grey")):
        with pytest.raises(lumos.LumosError):
            lumos.Occlusion(model, **bad)
    with pytest.raises(lumos.LumosError, match="larger than the input"):
        lumos.explain(model, torch.randn(1, 3, 8, 8), method="occlusion", window=16)


def test_rise_is_its_definition():
    """sum_i (P_i - mean P) M_i / (N p) + mean P with P_i = P(class | x * M_i), masks rebuilt from the seed."""
    torch.manual_seed(0)
    model = GapNet(classes=3).eval()
    x = torch.randn(2, 3, 20, 20)
    n, s, p = 24, 4, 0.5
    ex = lumos.explain(model, x, method="rise", target=1, n_masks=n, cell=s, p=p, seed=7, batch_size=5,
                       normalize=None, relu=False)
    gen = torch.Generator().manual_seed(7)
    grids = torch.rand(n, s, s, generator=gen) < p
    shifts = torch.stack([torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)], 1)
    masks = rise_masks(grids, shifts, (20, 20))
    with torch.no_grad():
        probs = torch.stack([model(x * m).softmax(1)[:, 1] for m in masks], 1)  # (B, N)
    centred = probs.double() - probs.double().mean(1, keepdim=True)
    expected = torch.einsum("bn,nhw->bhw", centred, masks.double()) / (n * p) + probs.double().mean(1)[:, None, None]
    torch.testing.assert_close(ex.raw.double(), expected, rtol=1e-5, atol=1e-6)
    assert masks.min() >= 0 and masks.max() <= 1 and masks.shape == (n, 20, 20)


def test_rise_two_seeds_agree_on_the_cat():
    """4000 masks: two independent mask sets give nearly the same map (128 px input keeps this fast)."""
    bundle = lumos.load_model("efficientnet_lite0", size=128)
    from lumos.io import sample_images

    x = bundle.preprocess([sample_images()["chelsea"]])
    maps = [lumos.explain(bundle.model, x, method="rise", n_masks=4000, seed=s, batch_size=64).raw.flatten()
            for s in (0, 1)]
    corr = float(torch.corrcoef(torch.stack(maps))[0, 1])
    assert corr >= 0.9, corr


def test_rise_and_occlusion_localise_on_the_synthetic_benchmark():
    # 64 x 64 images: a window of 8 px is what 16 px is to a 224 px photo
    report = synthetic_benchmark(["rise", "occlusion"], n=40, steps=8,
                                 method_kwargs={"rise": {"n_masks": 1000}, "occlusion": {"window": 8, "stride": 4}})
    r = report.rows["random"]["pointing_game"]
    assert report.rows["rise"]["pointing_game"] >= r + 0.5
    assert report.rows["occlusion"]["pointing_game"] >= r + 0.5


def test_rise_map_of_a_score_below_zero_is_not_blanked():
    """A segmentation region's score is a sum of logits; when every masked copy scores below 0 the RISE map is
    negative everywhere, and a ReLU (the default before) drew nothing and called it the exact result."""
    from lumos.synthetic.scenes import make_scenes
    from lumos.synthetic.segmenter import load_tinysegmenter
    from lumos.tasks import SegmentationTarget

    net, x = load_tinysegmenter(), make_scenes(8, seed=123).images[1:2]
    ex = lumos.explain(net, x, "rise", target=SegmentationTarget(2), n_masks=300)
    assert ex.raw.max() < 0  # every pixel's expected masked score is below zero
    expected = (ex.raw - ex.raw.min()) / (ex.raw.max() - ex.raw.min())  # min-max, the RegionMethod default
    torch.testing.assert_close(ex.maps, expected, rtol=1e-5, atol=1e-6)
    assert ex.params["relu"] is False


def test_rise_with_probabilities_is_the_same_map_with_or_without_relu():
    """With probabilities the map is non-negative (the benchmarks' and the photos' case): no change there."""
    torch.manual_seed(0)
    model = GapNet(classes=3).eval()
    x = torch.rand(2, 3, 24, 24)
    plain = lumos.explain(model, x, method="rise", target=1, n_masks=64, cell=4)
    clamped = lumos.explain(model, x, method="rise", target=1, n_masks=64, cell=4, relu=True)
    assert plain.raw.min() >= 0
    torch.testing.assert_close(plain.maps, clamped.maps)
