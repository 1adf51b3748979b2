"""Issue 11 (hardening), the library side: no silent zero map when gradients are blocked, one-line errors for
layers that give no map, NaN/Inf inputs and bad settings, CAM in bfloat16, the probability choice, and the
CLI's --output/--probs selectors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lumos
from lumos.engine import GradientError
from lumos.errors import NonFiniteError
from nets import GapNet

pytestmark = pytest.mark.usefixtures("one_thread")
GRADIENT_METHODS = ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "gradients", "gradient_x_input",
                    "guided_backprop", "deconvnet", "guided_gradcam", "integrated_gradients"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return GapNet(classes=4).eval()


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- 1: torch.inference_mode() around a call ------------------------------------------------------------------
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_inference_mode_gives_the_same_maps(net, method):
    x = images()
    kwargs = {"steps": 8} if method == "integrated_gradients" else {}
    plain = lumos.explain(net, x, method=method, target=1, layer="features", **kwargs)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        inside = lumos.explain(net, xi, method=method, target=1, layer="features", **kwargs)
    assert inside.maps.abs().sum() > 0
    torch.testing.assert_close(inside.raw, plain.raw)


class Detached(nn.Module):
    """A model that cuts its own graph: the score does not depend on the input through autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GapNet(classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.net.features(x)
        return self.net.fc(feats.mean((2, 3)))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_blocked_gradients_are_an_error_not_a_zero_map(method):
    model = Detached().eval()
    layer = "net.features" if method in ("gradients", "gradient_x_input", "guided_backprop", "deconvnet",
                                         "integrated_gradients") else "net.features.0"
    with pytest.raises(GradientError, match="Gradients are blocked"):
        lumos.explain(model, images(), method=method, layer=layer, **({"steps": 4} if "integrated" in method else {}))


# -- 2: a layer whose output is not B x C x h x w -------------------------------------------------------------
class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.mix(self.embed(x).flatten(2).transpose(1, 2))  # B x N x D tokens
        return self.head(t.mean(1))


@pytest.mark.parametrize("method", ["gradcam", "layercam", "scorecam", "eigencam", "cam", "guided_gradcam",
                                    "gradcam++", "xgradcam", "hirescam", "smoothgrad"])
def test_layer_without_a_map_is_a_one_line_error(method):
    # token layers ('mix') get an inferred grid now (tests/test_transformer_layers.py); a B x K output has none
    kwargs = {"base": "gradcam", "n_samples": 2} if method == "smoothgrad" else {}
    with pytest.raises(lumos.LumosError, match=r"Layer 'head' outputs shape \(2, 3\), not a B x C x h x w map"):
        lumos.explain(Tokens().eval(), images(), method=method, layer="head", **kwargs)
    with pytest.raises(lumos.LumosError, match="not a B x C x h x w map"):
        lumos.feature_maps(Tokens(), images(), layer="head")


def test_a_layout_turns_tokens_into_a_map():
    """The seam for token layers: a layout applied to activations and gradients alike equals the hand reshape."""
    model = Tokens().eval()
    layout = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)  # noqa: E731
    ex = lumos.explain(model, images(), method="gradcam", layer="mix", layout=layout, target=0, relu=False,
                       normalize=None)
    acts = {}
    h = model.mix.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    out = model(images())
    h.remove()
    (g,) = torch.autograd.grad(out[:, 0].sum(), acts["a"])
    a4, g4 = layout(acts["a"].detach()), layout(g)
    torch.testing.assert_close(ex.raw, (g4.mean((2, 3), keepdim=True) * a4).sum(1), rtol=1e-6, atol=1e-6)


# -- 3: CAM in bfloat16 ---------------------------------------------------------------------------------------
def test_cam_in_bfloat16_accepts_a_gap_linear_head():
    torch.manual_seed(0)
    model = GapNet(classes=5).eval().to(torch.bfloat16)
    x = images(3, 24).to(torch.bfloat16)
    ex = lumos.explain(model, x, method="cam", layer="features")
    ref = lumos.explain(model.float(), x.float(), method="cam", layer="features")
    assert torch.corrcoef(torch.stack([ex.maps.float().flatten(), ref.maps.flatten()]))[0, 1] > 0.99


# -- 4: settings of the wrong kind, in the library ------------------------------------------------------------
@pytest.mark.parametrize(("method", "kwargs"), [
    ("scorecam", {"batch_size": 2.5}), ("integrated_gradients", {"batch_size": 0}), ("smoothgrad", {"n_samples": -1}),
    ("integrated_gradients", {"steps": "many"}), ("rise", {"n_masks": 1.5}), ("occlusion", {"window": 0}),
    ("gradcam", {"relu": "maybe"}), ("gradcam", {"probs": "softish"}),
])
def test_bad_settings_are_one_line_errors(net, method, kwargs):
    with pytest.raises(lumos.LumosError) as err:
        lumos.explain(net, images(), method=method, **kwargs)
    assert "\n" not in str(err.value) and next(iter(kwargs)) in str(err.value)


# -- 11: NaN / Inf in the input -------------------------------------------------------------------------------
def test_nan_or_inf_input_names_the_images(net):
    x = images(4)
    x[1, 0, 2, 2] = float("nan")
    x[3, 2, 0, 0] = float("inf")
    for method in ("gradcam", "gradients", "scorecam"):
        with pytest.raises(lumos.LumosError, match=r"Input image\(s\) 1, 3 \(batch index\) contain NaN or Inf"):
            lumos.explain(net, x, method=method)


class NanClass(nn.Module):
    """Class 1's logit is NaN; the others are finite."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GapNet(classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.where(torch.tensor([False, True, False]), torch.tensor(float("nan")), out)


class SelfStandardised(nn.Module):
    """Scales each input by its own spread: finite on images, 0/0 on a constant (all-baseline) input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GapNet(classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True))


def test_a_nan_score_is_an_error_naming_the_images_never_a_blank_map():
    """A NaN target score used to give maps of zeros (reported as an exact zero): now every method refuses it in
    one line naming the images and class; a finite class of the same model still explains."""
    torch.manual_seed(0)
    model, x = NanClass().eval(), images(2)
    for method in lumos.methods(general=True):
        with pytest.raises(lumos.LumosError, match=r"not finite \(NaN or inf\) for image 0 class 1, image 1 class 1"):
            lumos.explain(model, x, method=method, target=1)
    assert lumos.explain(model, x, method="gradcam", target=0).maps.isfinite().all()


def test_nan_on_perturbed_copies_or_in_gradients_is_an_error():
    """Finite on the images, NaN on a constant input: Score-CAM's baseline and deletion's last step are
    perturbed copies (one line naming them), integrated gradients' zero baseline gives a NaN gradient (one
    line), while Grad-CAM, which never leaves the image, explains."""
    from lumos.evaluate import Deletion

    torch.manual_seed(0)
    model, x = SelfStandardised().eval(), images(2)
    with pytest.raises(lumos.LumosError, match=r"not finite \(NaN or inf\) on 1 perturbed copies of image 0"):
        lumos.explain(model, x, method="scorecam")
    with pytest.raises(lumos.LumosError, match=r"not finite \(NaN or inf\) on 2 perturbed copies of images 0, 1"):
        Deletion(steps=4)(model, x, torch.rand(2, 32, 32))
    with pytest.raises(NonFiniteError, match="gradient of the explained score with respect to the input is not finite"):
        lumos.explain(model, x, method="integrated_gradients")
    assert lumos.explain(model, x, method="gradcam").maps.isfinite().all()


# -- 10: probabilities ----------------------------------------------------------------------------------------
class MultiLabel(nn.Module):
    """A multi-label head with its sigmoid inside: the outputs already are probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GapNet(classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def test_a_sigmoid_inside_the_model_is_not_softmaxed_again():
    torch.manual_seed(0)
    model = MultiLabel().eval()
    x = images(2)
    with torch.no_grad():
        said = model(x)
    for method in ("gradcam", "gradients", "scorecam", "occlusion"):
        ex = lumos.explain(model, x, method=method, target=2, **({"window": 8} if method == "occlusion" else {}))
        torch.testing.assert_close(ex.probs, said[:, 2])  # what the model says, not a softmax over its outputs
        assert ex.probs_kind == "identity"
    soft = lumos.explain(model, x, method="gradcam", target=2, probs="softmax")
    torch.testing.assert_close(soft.probs, said.softmax(1)[:, 2])
    assert lumos.explain(model, x, method="gradcam", target=2, probs="none").probs is None
    from lumos.explainer import predict

    top = predict(model, x, k=4)
    assert [p for _, _, p in top[0].top] == pytest.approx(sorted(said[0].tolist(), reverse=True))


def test_logits_in_the_unit_interval_are_still_softmaxed():
    """Outputs in [0, 1] that the model did not squash are logits: softmax, decided once on the clean forward."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.2, 0.5, 0.9]))
    ex = lumos.explain(model, images(1), method="gradients", target=0)
    torch.testing.assert_close(ex.probs, torch.tensor([0.2, 0.5, 0.9]).softmax(0)[:1])


# -- 9: the CLI's --output selector ---------------------------------------------------------------------------
NET = textwrap.dedent('''
    import torch
    from torch import nn

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            f = self.features(x)
            return {"logits": self.fc(f.mean((2, 3))), "features": f}

    def build():
        torch.manual_seed(0)
        return DictNet()
''')


def test_cli_output_selector_for_dict_models(tmp_path):
    from PIL import Image

    (tmp_path / "dictnet.py").write_text(NET)
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "a.png")
    env = {"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "COLUMNS": "200"}
    run = [sys.executable, "-m", "lumos.cli", "explain", "a.png", "--model", "dictnet:build", "--size", "32",
           "--out", "o", "--method", "gradcam,occlusion", "--set", "window=8"]
    bad = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "with --output one of 'logits'" in bad.stderr
    ok = subprocess.run([*run, "--output", "logits"], capture_output=True, text=True, cwd=tmp_path, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("a.png: class ") and (tmp_path / "o" / "a_occlusion.png").exists()


def test_a_layer_returning_a_tuple_is_recorded_through_its_first_element_and_says_so(caplog):
    """(hidden states, extra) layers (Hugging Face blocks) are explained through the hidden states, and the
    choice is logged once per layer, not silently and not on every forward."""
    import logging

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Pair()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h, _ = self.block(x)
            return self.fc(h.mean((2, 3)))

    net, x = Net().eval(), torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="lumos.capture"):
        ex = lumos.explain(net, x, method="gradcam", layer="block", target=1)
        lumos.explain(net, x, method="gradcam", layer="block", target=1)
    ref = lumos.explain(net, x, method="gradcam", layer="block.conv", target=1)
    torch.testing.assert_close(ex.maps, ref.maps)  # the same activations as the conv that makes them
    noted = [r.getMessage() for r in caplog.records if "returns a tuple" in r.getMessage()]
    assert len(noted) == 1 and "'block'" in noted[0] and "(2, 4, 8, 8)" in noted[0]
