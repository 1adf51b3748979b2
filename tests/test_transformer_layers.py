"""Issue 14, part A: token layers just work -- inferred layouts (prefix tokens, channels-last, non-square inputs),
layer="auto" on transformers, every CAM method on real architectures with random weights (no downloads)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lumos
from lumos.capture import model_guard
from lumos.layers import auto_layer, resolve_sites, trace_layers
from lumos.layouts import LayoutError
from lumos.methods import GradCAM
from lumos.methods.activation_cams import HeadError
from transformer_models import NAMES, Arch, build, images

pytestmark = pytest.mark.usefixtures("one_thread")
CAMS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam"]
SETTINGS = {"scorecam": {"max_channels": 6, "batch_size": 16}}


@pytest.fixture(scope="module", params=NAMES)
def arch(request) -> Arch:
    return build(request.param)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def by_hand(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The test's own reshape to B x C x h x w, from the layout text of the architecture table."""
    if layout.startswith("NHWC"):
        return t.permute(0, 3, 1, 2)
    prefix, h, w = map(int, re.fullmatch(r"tokens (?:(\d+)\+)?(\d+)x(\d+)", layout).groups(default="0"))
    return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


def hand_gradcam(model: nn.Module, module: nn.Module, x: torch.Tensor, target: int, layout: str) -> torch.Tensor:
    """Grad-CAM from a plain hook and autograd over the whole model: sum_c mean_hw(dy/dA_c) A_c."""
    acts = []
    handle = module.register_forward_hook(lambda m, i, o: acts.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.enable_grad():
            out = logits(model, x)
            (g,) = torch.autograd.grad(out[:, target].sum(), acts[0])
    finally:
        handle.remove()
    a4, g4 = by_hand(acts[0].detach(), layout), by_hand(g, layout)
    return (g4.mean((2, 3), keepdim=True) * a4).sum(1)


# -- what is inferred ---------------------------------------------------------------------------------------------
def test_layout_and_auto_layer_are_inferred(arch):
    x = images(arch, 1)
    with model_guard(arch.model):
        infos = {i.name: i for i in trace_layers(arch.model, x)}
        chosen = auto_layer(arch.model, x)
    assert infos[arch.layer].layout == arch.layout
    assert chosen == arch.auto


# -- every CAM method at the auto layer and at an explicit token layer --------------------------------------------
@pytest.mark.parametrize("method", CAMS)
def test_every_cam_method_runs_alone_and_in_a_batch(arch, method):
    model, x = arch.model, images(arch)
    kwargs = SETTINGS.get(method, {})
    if method == "cam":  # CAM needs the layer to feed global-average-pool + linear: a one-line error elsewhere
        with pytest.raises(HeadError) as err:
            lumos.explain(model, x, method="cam", layer=arch.layer)
        assert "\n" not in str(err.value)
        if not arch.cam_at_auto:
            with pytest.raises(HeadError):
                lumos.explain(model, x, method="cam")
            return
    else:
        ex = lumos.explain(model, x, method=method, layer=arch.layer, **kwargs)
        assert ex.maps.shape == (2, *arch.size) and ex.layer == arch.layer and not ex.layer_auto
        assert torch.isfinite(ex.maps).all() and ex.raw.abs().sum() > 0
        alone = lumos.explain(model, x[1:], method=method, layer=arch.layer, **kwargs)
        torch.testing.assert_close(alone.maps[0], ex.maps[1], rtol=0, atol=1e-3)  # batch-size float noise
    auto = lumos.explain(model, x, method=method, **kwargs)
    assert auto.layer == arch.auto and auto.layer_auto
    assert auto.maps.shape == (2, *arch.size) and torch.isfinite(auto.maps).all() and auto.raw.abs().sum() > 0


# -- Grad-CAM on a token layer is Grad-CAM of the hand-reshaped activations ---------------------------------------
def test_gradcam_on_a_token_layer_equals_the_hand_reshape(arch):
    model, x = arch.model, images(arch)
    module = dict(model.named_modules())[arch.layer]
    for layer in (arch.layer, arch.auto) if arch.layout.startswith("tokens") else (arch.layer,):
        module = dict(model.named_modules())[layer]
        ex = lumos.explain(model, x, method="gradcam", layer=layer, target=3, relu=False, normalize=None)
        ref = hand_gradcam(model, module, x, 3, arch.layout)
        assert ex.raw.shape == ref.shape
        assert (ex.raw - ref).abs().max() <= 1e-6 * max(1.0, float(ref.abs().max()))


def test_explaining_leaves_the_model_output_unchanged(arch):
    model, x = arch.model, images(arch)
    with torch.no_grad():
        before = logits(model, x)
    ex = lumos.explain(model, x, method="gradcam", layer=arch.layer)
    with torch.no_grad():
        after = logits(model, x)
    assert torch.equal(before, after)
    # ex.output comes from a forward with autograd on: nn.MultiheadAttention then leaves its fused fast path, so
    # the last bits differ (1.3e-6 on a vit_b_16 logit of 0.01 was seen when this test ran alone)
    torch.testing.assert_close(ex.output, before, rtol=1e-5, atol=1e-5)


# -- non-square inputs, other input sizes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dynamic_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(48, 80), depth=2,
                             dynamic_img_size=True).eval()


def test_non_square_input_and_a_new_input_size(dynamic_vit):
    method = GradCAM(dynamic_vit, "blocks.1", relu=False, normalize=None)
    for size, layout in [((48, 80), "tokens 1+3x5"), ((64, 32), "tokens 1+4x2")]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
        ex = method(x, 1)
        assert ex.maps.shape == (2, *size) and ex.raw.shape == (2, *map(int, layout.split()[1][2:].split("x")))
        ref = hand_gradcam(dynamic_vit, dynamic_vit.blocks[1], x, 1, layout)
        torch.testing.assert_close(ex.raw, ref, rtol=1e-6, atol=1e-6)
    with model_guard(dynamic_vit):
        infos = {i.name: i for i in trace_layers(dynamic_vit, torch.zeros(1, 3, 48, 80))}
    assert infos["blocks.1"].layout == "tokens 1+3x5"


def test_feature_maps_of_a_token_layer(arch):
    x = images(arch, 1)
    fm = lumos.feature_maps(arch.model, x, layer=arch.layer, n=4)
    acts = []
    module = dict(arch.model.named_modules())[arch.layer]
    handle = module.register_forward_hook(lambda m, i, o: acts.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        arch.model(x)
    handle.remove()
    torch.testing.assert_close(fm.activations, by_hand(acts[0], arch.layout))


# -- the override, the seam for model adapters, and the one-line errors --------------------------------------------
class Tokens(nn.Module):
    """4 x 4 patches of 4 pixels, one class token in front, a linear mixer, the class token to the head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.mix = nn.Linear(8, 8)
        self.pool = nn.Identity()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.mix(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))
        return self.head(self.pool(t).mean(1))


def test_lumos_layout_attribute_is_the_default_and_layout_overrides_it():
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(2, 3, 16, 16)
    assert resolve_sites(model, "mix", x)[0].layout.describe(None) == "tokens 1+4x4"  # inferred

    def mirrored(t: torch.Tensor) -> torch.Tensor:  # an adapter's own layout: the grid mirrored left-right
        return by_hand(t, "tokens 1+4x4").flip(-1)

    model.mix.lumos_layout = mirrored
    try:
        (site,) = resolve_sites(model, "mix", x)
        assert site.layout is mirrored
        ex = lumos.explain(model, x, method="gradcam", layer="mix", target=0, relu=False, normalize=None)
        plain = hand_gradcam(model, model.mix, x, 0, "tokens 1+4x4")
        torch.testing.assert_close(ex.raw, plain.flip(-1), rtol=1e-6, atol=1e-6)
        given = lumos.explain(model, x, method="gradcam", layer="mix", target=0, relu=False, normalize=None,
                              layout=lambda t: by_hand(t, "tokens 1+4x4"))
        torch.testing.assert_close(given.raw, plain, rtol=1e-6, atol=1e-6)
    finally:
        del model.mix.lumos_layout


class Ambiguous(nn.Module):
    """A channels-last model (a LayerNorm over the last axis) with a scaling whose axes nothing reveals."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.scale = nn.Identity()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.scale(self.embed(x).permute(0, 2, 3, 1) * 2)  # B x h x w x C, by functional ops only
        return self.head(self.norm(t * 1.0).mean((1, 2)))


def test_an_unknown_channel_axis_is_a_one_line_error_and_layout_fixes_it():
    torch.manual_seed(0)
    model = Ambiguous().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(LayoutError) as err:
        lumos.explain(model, x, method="gradcam", layer="scale")
    assert "\n" not in str(err.value) and "layout=" in str(err.value) and "'scale'" in str(err.value)
    ex = lumos.explain(model, x, method="gradcam", layer="scale", layout="nhwc", target=1, relu=False, normalize=None)
    torch.testing.assert_close(ex.raw, hand_gradcam(model, model.scale, x, 1, "NHWC"), rtol=1e-6, atol=1e-6)


class Pooled(nn.Module):
    """Tokens merged 4 -> 1 (16 patches become 4 tokens plus one class token): 5 tokens, no 2 x 2 grid seen."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # B x 16 x 8
        t = torch.cat([t.mean(1, keepdim=True), t.reshape(len(t), 4, 4, 8).mean(2)], 1)  # B x 5 x 8
        return self.head(self.mix(t).mean(1))


def test_tokens_that_fit_no_grid_are_a_one_line_error():
    with pytest.raises(LayoutError, match=r"Layer 'mix' outputs 1x5x8 and its 5 tokens fit no spatial grid.*layout="):
        lumos.explain(Pooled().eval(), torch.randn(1, 3, 16, 16), method="gradcam", layer="mix")


def test_unknown_layout_text_is_a_one_line_error():
    with pytest.raises(LayoutError, match="layout='nwhc' is not known"):
        lumos.explain(Tokens().eval(), torch.randn(1, 3, 16, 16), layer="mix", layout="nwhc")


# -- the tracker and `lumos layers` --------------------------------------------------------------------------------
def test_tracker_logs_token_layers():
    from lumos.track import ExplanationLogger, MemorySink

    arch = build("timm_deit_distilled")
    x = images(arch, 2).clamp(-1, 1) * 0.5 + 0.5
    sink = MemorySink()
    logger = ExplanationLogger(x, torch.tensor([1, 2]), methods=["gradcam", "features"], sinks=[sink], n_features=4)
    assert sorted(logger.log(arch.model, 0)) == ["lumos/features/00", "lumos/features/01", "lumos/gradcam/00",
                                                 "lumos/gradcam/01"]
    assert sink.images["lumos/gradcam/00"][0][1].width > 0


TIMM_MODULE = """
import timm, torch

def build():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
"""


def test_cli_layers_shows_token_grids_and_the_auto_choice(tmp_path, monkeypatch, capsys):
    from lumos.cli import main

    (tmp_path / "lumos_tokens_cli.py").write_text(TIMM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["layers", "--model", "lumos_tokens_cli:build", "--size", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "17x192" not in lines["blocks.0"] and "18x192" in lines["blocks.0"] and "[tokens 2+4x4]" in lines["blocks.0"]
    assert lines["blocks.1.norm1"].endswith("<- auto") and sum("auto" in line for line in out.splitlines()) == 1
    assert "patch_embed.proj" in lines and "[" not in lines["patch_embed.proj"]  # a plain NCHW map


def test_hf_swin_stages_fold_like_the_library_own_reshape():
    """HF Swin keeps every stage as B x N x D tokens (2x2 patches merged per stage, so no map of the smaller
    grid is ever seen); the folded maps must equal the library's own ``reshaped_hidden_states``."""
    arch = build("hf_swin")
    x = images(arch, n=2)
    with torch.no_grad():
        hidden = arch.model(x, output_hidden_states=True).reshaped_hidden_states  # embeddings, then each stage
    for stage in range(3):
        fm = lumos.feature_maps(arch.model, x, layer=f"swin.encoder.layers.{stage}", n=1)
        assert torch.allclose(fm.activations, hidden[stage + 1], atol=1e-6), stage
