"""Pixel-space methods: conformance with Captum 0.9, IG completeness, SmoothGrad, targets and maps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, InputXGradient, Saliency
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

import lumos
from lumos.methods.quadrature import quadrature
from nets import ReusedReLUNet, copy_weights, images

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class VGGNet(nn.Module):
    """VGG-style: conv-ReLU(inplace) stacks, max-pools, a ReLU'd classifier."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace),
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(inplace), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FunctionalVGG(VGGNet):
    """The same network with every ReLU a functional call of a different flavour (Captum cannot see them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features
        x = F.relu(f[0](x))
        x = torch.relu(f[2](x))
        x = f[5](f[4](x)).relu_()
        x = f[7](x)
        c = self.classifier
        return c[3](F.relu(c[1](c[0](x)), inplace=True))


class ReLU6AsReLU(nn.ReLU):
    """ReLU6 computed by a module Captum treats as a ReLU (it hooks ``nn.ReLU`` instances only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, 0.0, 6.0)


@pytest.fixture(scope="module")
def effnet():
    model, preprocess, labels = lumos.load_model("efficientnet_lite0")
    return model, preprocess, labels


@pytest.fixture(scope="module")
def effnet_twin(effnet):
    twin = copy.deepcopy(effnet[0])
    for module in list(twin.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, ReLU6AsReLU())
    return twin


def small_nets():
    torch.manual_seed(0)
    return {"vgg_inplace": VGGNet(True).eval(), "resnet_shared": ReusedReLUNet().eval()}


CAPTUM = {
    "gradients": lambda m, x, t: Saliency(m).attribute(x, target=t, abs=False),
    "gradient_x_input": lambda m, x, t: InputXGradient(m).attribute(x, target=t),
    "deconvnet": lambda m, x, t: Deconvolution(m).attribute(x, target=t),
    "guided_backprop": lambda m, x, t: GuidedBackprop(m).attribute(x, target=t),
}


def captum(method, model, x, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CAPTUM[method](model, x.clone().requires_grad_(True), target).detach()


@pytest.mark.parametrize("method", list(CAPTUM))
@pytest.mark.parametrize("net", ["vgg_inplace", "resnet_shared"])
def test_small_nets_match_captum(net, method):
    model = small_nets()[net]
    x = images(3)
    ex = lumos.explain(model, x, method=method, target=[0, 3, 4])
    assert ex.raw.shape == x.shape and ex.maps.shape == (3, 32, 32)
    assert rel(ex.raw, captum(method, model, x, [0, 3, 4])) <= TOL


@pytest.mark.parametrize("net", ["vgg_inplace", "resnet_shared"])
def test_guided_gradcam_matches_captum(net):
    model = small_nets()[net]
    layer = "features.5" if net == "vgg_inplace" else "conv2"
    x = images(3)
    ex = lumos.explain(model, x, method="guided_gradcam", layer=layer, target=[1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GuidedGradCam(model, model.get_submodule(layer)).attribute(
            x.clone().requires_grad_(True), target=[1, 2, 0], interpolate_mode="bilinear")
    assert ex.layer == layer
    assert rel(ex.raw, ref.detach()) <= TOL


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
@pytest.mark.parametrize("net", ["vgg_inplace", "resnet_shared"])
def test_integrated_gradients_matches_captum(net, rule):
    model = small_nets()[net]
    x = images(2)
    ex = lumos.IntegratedGradients(model, steps=12, method=rule, batch_size=7, baseline="zero")(x, [1, 4])
    ref, delta = CaptumIG(model).attribute(x, target=[1, 4], n_steps=12, method=rule,
                                           return_convergence_delta=True)
    assert rel(ex.raw, ref) <= TOL
    torch.testing.assert_close(ex.params["delta"], delta.float(), rtol=1e-3, atol=1e-4)


def test_trapezoid_differs_from_captum_by_its_step_weights():
    """Captum's trapezoid weights sum to (n-1)/n (step 1/n, halved ends); ours are the trapezoid rule (1/(n-1))."""
    model = small_nets()["vgg_inplace"]
    x = images(2)
    n = 10
    ex = lumos.IntegratedGradients(model, steps=n, method="trapezoid")(x, [1, 4])
    ref = CaptumIG(model).attribute(x, target=[1, 4], n_steps=n, method="riemann_trapezoid")
    assert rel(ex.raw, ref * n / (n - 1)) <= TOL
    assert abs(sum(quadrature("trapezoid", n)[1]) - 1) < 1e-12


def test_functional_relu_model_matches_module_twin_and_captum():
    torch.manual_seed(0)
    module_net = VGGNet(inplace=False).eval()
    functional = copy_weights(module_net, FunctionalVGG(inplace=False).eval())
    x = images(3)
    for method in CAPTUM:
        a = lumos.explain(functional, x, method=method, target=[0, 1, 2]).raw
        b = lumos.explain(module_net, x, method=method, target=[0, 1, 2]).raw
        assert rel(a, b) <= TOL, method
        assert rel(a, captum(method, module_net, x, [0, 1, 2])) <= TOL, method
    # Captum misses the functional calls: its guided backprop is then just the gradient.
    cap_f = captum("guided_backprop", functional, x, [0, 1, 2])
    assert rel(cap_f, captum("gradients", functional, x, [0, 1, 2])) < 1e-6
    assert rel(cap_f, b) > 0.01


def test_efficientnet_matches_captum(effnet, effnet_twin):
    model = effnet[0]
    x = images(2, size=96, seed=1)
    t = [281, 967]
    for method in ("gradients", "gradient_x_input"):
        ex = lumos.explain(model, x, method=method, target=t)
        assert rel(ex.raw, captum(method, model, x, t)) <= TOL, method
    # Captum hooks nn.ReLU only, so on the real model (ReLU6) its guided backprop is the plain gradient;
    # on a twin whose ReLU6 modules are nn.ReLU subclasses computing ReLU6 it applies the rule like lumos.
    for method in ("deconvnet", "guided_backprop"):
        ex = lumos.explain(model, x, method=method, target=t)
        assert rel(ex.raw, captum(method, effnet_twin, x, t)) <= TOL, method
    assert rel(captum("guided_backprop", model, x, t), captum("gradients", model, x, t)) < 1e-6
    ex = lumos.explain(model, x, method="guided_gradcam", layer="_blocks.12", target=t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GuidedGradCam(effnet_twin, effnet_twin.get_submodule("_blocks.12")).attribute(
            x.clone().requires_grad_(True), target=t, interpolate_mode="bilinear")
    assert rel(ex.raw, ref.detach()) <= TOL
    ex = lumos.IntegratedGradients(model, steps=8, method="gausslegendre", batch_size=16)(x, t)
    ref = CaptumIG(model).attribute(x, target=t, n_steps=8, method="gausslegendre")
    assert rel(ex.raw, ref) <= TOL


def test_default_constructor_on_efficientnet(effnet):
    model, preprocess, labels = effnet
    x = images(1, size=64)
    for name in ("guided_gradcam", "integrated_gradients", "smoothgrad"):
        cls = lumos.method_class(name)
        obj = cls(model, "auto", labels=labels) if name != "integrated_gradients" else cls(
            model, "auto", labels=labels, steps=16, tolerance=None)
        if name == "smoothgrad":
            obj = cls(model, "auto", labels=labels, n_samples=2)
        ex = obj(x, "tabby cat")
        assert ex.maps.shape == (1, 64, 64) and ex.maps.dtype == torch.float32
        assert ex.targets.tolist() == [281] and ex.method == name
        assert 0 <= float(ex.maps.min()) and float(ex.maps.max()) <= 1
    assert lumos.explain(model, x, method="guided_gradcam", labels=labels).layer == "_act1"


def test_ig_baselines_batching_and_topk():
    model = small_nets()["vgg_inplace"]
    x = images(3)
    ig = lumos.IntegratedGradients
    a = ig(model, steps=8, method="middle", batch_size=1)(x, "topk:2")
    b = ig(model, steps=8, method="middle", batch_size=100)(x, "topk:2")
    assert a.raw.shape == (6, 3, 32, 32) and a.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert rel(a.raw, b.raw) < 1e-5
    pre = lumos.preprocess.Preprocess(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    black = torch.tensor([-2.5, -1.6, -1.0]).view(3, 1, 1)
    with_pre = ig(model, steps=8, baseline="black", preprocess=pre)(x, 1)
    with_black = ig(model, steps=8, baseline="black", black=[-2.5, -1.6, -1.0])(x, 1)
    with_tensor = ig(model, steps=8, baseline=black.expand(3, 32, 32))(x, 1)
    assert rel(with_pre.raw, with_tensor.raw) < 1e-5 and rel(with_black.raw, with_tensor.raw) < 1e-5
    with pytest.raises(lumos.LumosError, match="black"):
        ig(model, baseline="black")(x)
    # Several baselines: the average of the single-baseline attributions.
    both = ig(model, steps=8, baseline=["zero", "blur"], method="middle")(x, 1)
    zero = ig(model, steps=8, baseline="zero", method="middle")(x, 1)
    blur = ig(model, steps=8, baseline="blur", method="middle")(x, 1)
    assert rel(both.raw, (zero.raw + blur.raw) / 2) < 1e-5
    u1 = ig(model, steps=8, baseline="uniform", seed=3)(x, 1)
    u2 = ig(model, steps=8, baseline="uniform", seed=3)(x, 1)
    assert torch.equal(u1.raw, u2.raw) and both.params["baseline"] == ["zero", "blur"]


def test_callable_target_and_maps():
    model = small_nets()["resnet_shared"]
    x = images(2)
    ex = lumos.explain(model, x, method="guided_backprop", target=lambda out: out[:, 2] - out[:, 0])
    assert ex.targets is None and ex.scores.shape == (2,)
    ig = lumos.explain(model, x, method="integrated_gradients", target=lambda out: out[:, 2], steps=8)
    assert ig.raw.shape == x.shape
    signed = lumos.explain(model, x, method="gradient_x_input", reduce="sum", target=1)
    assert signed.maps.min() < 0 and signed.maps.min() >= -1 and signed.maps.max() <= 1
    for reduce in ("absmax", "l2"):
        m = lumos.explain(model, x, method="gradients", reduce=reduce).maps
        assert m.min() >= 0 and m.max() == 1
    raw = signed.raw.clone()
    raw[0, 0, 0, 0] = 1e6  # one hot pixel does not wash out the picture
    maps = lumos.GradientXInput(model, reduce="absmax").finish(raw)
    assert float(maps[0].mean()) > 0.05


def test_smoothgrad_zero_noise_is_the_wrapped_method():
    model = small_nets()["vgg_inplace"]
    x = images(3)
    for base in ("guided_backprop", "gradients", "gradcam"):
        sg = lumos.explain(model, x, method="smoothgrad", base=base, noise=0.0, n_samples=4, batch_size=6,
                           target=[0, 1, 2])
        ref = lumos.explain(model, x, method=base, target=[0, 1, 2])
        assert torch.equal(sg.raw, ref.raw), base
        assert torch.equal(sg.maps, ref.maps), base
    var = lumos.explain(model, x, method="smoothgrad", noise=0.0, n_samples=3, variant="variance")
    assert torch.equal(var.raw, torch.zeros_like(var.raw))


class Recorder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_smoothgrad_noise_level_and_variants():
    model = Recorder(small_nets()["vgg_inplace"])
    x = images(2, size=32) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    sg = lumos.explain(model, x, method="smoothgrad", base="gradients", noise=0.2, n_samples=20, batch_size=8,
                       target=[1, 2])
    noisy = torch.cat(model.seen[1:]).view(-1, 2, 3, 32, 32)  # first forward: clean targets
    assert noisy.shape[0] == 20
    span = x.amax((1, 2, 3)) - x.amin((1, 2, 3))
    std = (noisy - x[None]).transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(std, 0.2 * span, rtol=0.02, atol=0)
    assert sg.raw.shape == x.shape and sg.params["base"] == "gradients"
    model.seen.clear()
    grads = lumos.explain(model.model, noisy.flatten(0, 1), method="gradients", target=[1, 2] * 20).raw.view(20, 2, 3,
                                                                                                              32, 32)
    torch.testing.assert_close(sg.raw, grads.mean(0), rtol=1e-4, atol=1e-6)
    sq = lumos.explain(model, x, method="smoothgrad", noise=0.2, n_samples=20, variant="squared", target=[1, 2])
    torch.testing.assert_close(sq.raw, grads.pow(2).mean(0), rtol=1e-4, atol=1e-7)
    var = lumos.explain(model, x, method="smoothgrad", noise=0.2, n_samples=20, variant="variance", target=[1, 2])
    torch.testing.assert_close(var.raw, grads.var(0, unbiased=False), rtol=1e-3, atol=1e-7)
    ig = lumos.explain(model, x, method="smoothgrad", base="integrated_gradients", steps=4, n_samples=2)
    assert ig.raw.shape == x.shape


def test_errors():
    model = small_nets()["vgg_inplace"]
    with pytest.raises(lumos.LumosError, match="reduce"):
        lumos.Gradients(model, reduce="max")
    with pytest.raises(lumos.LumosError, match="method"):
        lumos.IntegratedGradients(model, method="simpson")
    with pytest.raises(lumos.LumosError, match="variant"):
        lumos.SmoothGrad(model, variant="cubic")
    with pytest.raises(lumos.LumosError, match="one layer"):
        lumos.explain(model, images(1), method="guided_gradcam", layer=["features.0", "features.5"])


def test_percentile_clip_equals_torch_quantile():
    from lumos.methods.pixel import upper_quantile

    torch.manual_seed(0)
    for n in (1, 2, 7, 1000):
        values = torch.rand(3, n)
        for q in (0.0, 0.3, 0.995, 1.0):
            assert torch.allclose(upper_quantile(values, q), torch.quantile(values, q, dim=1, keepdim=True))
