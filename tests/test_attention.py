"""Attention capture (fused or not) and the attention methods (rollout, gradient-weighted rollout).

References are independent of lumos: a toy ViT that computes its attention by hand and keeps it, the
formulas of Abnar & Zuidema (2020) and Chefer, Gur & Wolf (2021) written out with loops, and attention
weights returned by ``nn.MultiheadAttention(need_weights=True)``. Real architectures (torchvision, timm,
Hugging Face) are built with random weights and small configs: no downloads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.attention import AttentionError, capture_attention
from lumos.methods import method_class
from lumos.methods.attention import token_layout

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
tv_vit = pytest.importorskip("torchvision.models.vision_transformer")

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


# -- a toy ViT whose attention is computed by hand and kept ----------------------------------------------------
class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d // self.heads)
            self.probs = logits.softmax(-1)
            if self.probs.requires_grad:
                self.probs.retain_grad()
            y = torch.einsum("bhij,bhjd->bhid", self.probs, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class ToyViT(nn.Module):
    """2 blocks, 3 heads, class token, 4 x 4 patches of 4 px on 16 x 16 inputs."""

    def __init__(self, fused: bool, depth: int = 2, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.5)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(ToyAttention(dim, heads, fused) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps, strict=True):
            t = t + attn(norm(t))
            t = t + mlp(t)
        return self.head(t[:, 0])


def _rollout_by_hand(probs: list[torch.Tensor], fusion: str = "mean", discard: float = 0.0) -> torch.Tensor:
    """Abnar & Zuidema, image by image: fused heads, smallest entries zeroed, + I, rows / row sums, product."""
    maps = []
    for i in range(probs[0].shape[0]):
        r = None
        for p in probs:
            heads = p[i].double()
            a = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}[fusion].clone()
            k = int(a.numel() * discard)
            if k:
                threshold = a.flatten().sort().values[k - 1]
                a[a <= threshold] = 0.0
            a = a + torch.eye(a.shape[0], dtype=a.dtype)
            a = a / a.sum(1, keepdim=True)
            r = a if r is None else a @ r
        maps.append(r[0, 1:])
    return torch.stack(maps)


def _chefer_by_hand(probs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.: R = I; R = R + mean_h(max(grad * A, 0)) R per block; class row, patch columns."""
    maps = []
    for i in range(probs[0].shape[0]):
        n = probs[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in zip(probs, grads, strict=True):
            cam = (g[i].double() * a[i].double()).clamp(min=0).mean(0)
            r = r + cam @ r
        maps.append(r[0, 1:])
    return torch.stack(maps)


@pytest.fixture(scope="module")
def toys() -> tuple[ToyViT, ToyViT]:
    torch.manual_seed(0)
    unfused = ToyViT(fused=False).eval()
    fused = ToyViT(fused=True).eval()
    fused.load_state_dict(unfused.state_dict())
    return unfused, fused


@pytest.fixture(scope="module")
def toy_x() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_rollout_equals_hand_computation(toys, toy_x) -> None:
    unfused, fused = toys
    with torch.no_grad():
        unfused(toy_x)
    probs = [a.probs for a in unfused.attns]
    for fusion, discard in [("mean", 0.0), ("max", 0.5), ("min", 0.25)]:
        expected = _rollout_by_hand(probs, fusion, discard).view(-1, 4, 4)
        for model in (unfused, fused):
            ex = method_class("rollout")(model, head_fusion=fusion, discard_ratio=discard)(toy_x)
            assert ex.raw.shape == (3, 4, 4) and ex.kind == "layer"
            torch.testing.assert_close(ex.raw.double(), expected, atol=1e-6, rtol=1e-5)
    assert ex.params["prefix"] == 1 and ex.params["grid"] == [4, 4] and ex.params["blocks"] == 2


def test_gradient_rollout_equals_hand_computation(toys, toy_x) -> None:
    unfused, fused = toys
    classes = torch.tensor([0, 3, 4])
    x = toy_x.clone().requires_grad_(True)  # so the first block's attention is on the graph too
    logits = unfused(x)
    logits.gather(1, classes[:, None]).sum().backward()
    probs = [a.probs.detach() for a in unfused.attns]
    grads = [a.probs.grad for a in unfused.attns]
    expected = _chefer_by_hand(probs, grads).view(-1, 4, 4)
    for model in (unfused, fused):
        ex = method_class("grad_rollout")(model)(toy_x, classes)
        torch.testing.assert_close(ex.raw.double(), expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(ex.targets, classes)
    # class-specific: another class gives another map (the gradients differ)
    other = method_class("grad_rollout")(fused)(toy_x, torch.tensor([1, 1, 1]))
    assert not torch.allclose(other.raw, ex.raw)


# -- real architectures: fused vs unfused ----------------------------------------------------------------------
class ForceWeights(nn.Module):
    """nn.MultiheadAttention called with need_weights=True: the unfused path, weights per head kept."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha
        self.weights: torch.Tensor | None = None

    def forward(self, q, k, v, need_weights=False, **kwargs):  # noqa: ANN001, ANN003
        out, self.weights = self.mha(q, k, v, need_weights=True, average_attn_weights=False, **kwargs)
        return out, None


@pytest.fixture(scope="module")
def torchvision_vit() -> nn.Module:
    torch.manual_seed(2)
    model = tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: every logit 0, every gradient 0
    return model


@pytest.fixture(scope="module")
def timm_pair() -> tuple[nn.Module, nn.Module]:
    """timm ViT with 2 register tokens on a non-square 32 x 48 input (prefix 3, grid 4 x 6): fused, unfused."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    kw = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, reg_tokens=2)
    fused, unfused = VisionTransformer(**kw).eval(), VisionTransformer(**kw).eval()
    unfused.load_state_dict(fused.state_dict())
    for block in unfused.blocks:
        block.attn.fused_attn = False
    assert all(b.attn.fused_attn for b in fused.blocks)
    return fused, unfused


@pytest.fixture(scope="module")
def hf_pair() -> tuple[nn.Module, nn.Module]:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(4)
    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, num_labels=5)
    sdpa = ViTForImageClassification(ViTConfig(**cfg, attn_implementation="sdpa")).eval()
    eager = ViTForImageClassification(ViTConfig(**cfg, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def _x(h: int, w: int, n: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_torchvision_mha_need_weights_false_matches_explicit_weights(torchvision_vit) -> None:
    x = _x(32, 32)
    got = method_class("rollout")(torchvision_vit)(x).raw
    model = tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=5).eval()
    model.load_state_dict(torchvision_vit.state_dict())
    wrappers = []
    for layer in model.encoder.layers:
        layer.self_attention = ForceWeights(layer.self_attention)
        wrappers.append(layer.self_attention)
    with torch.no_grad():
        model(x)
    expected = _rollout_by_hand([w.weights for w in wrappers]).view(-1, 4, 4)
    torch.testing.assert_close(got.double(), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_fused_and_unfused_give_the_same_maps(method, timm_pair, hf_pair) -> None:
    cls = method_class(method)
    fused, unfused = timm_pair
    x = _x(32, 48)
    a, b = cls(fused)(x, 1), cls(unfused)(x, 1)
    assert a.raw.shape == (2, 4, 6) and a.params["prefix"] == 3
    torch.testing.assert_close(a.raw, b.raw, atol=TOL, rtol=0)
    sdpa, eager = hf_pair
    x = _x(32, 32)
    a, b = cls(sdpa)(x, 2), cls(eager)(x, 2)
    assert a.raw.shape == (2, 4, 4)
    torch.testing.assert_close(a.raw, b.raw, atol=TOL, rtol=0)


def _logits(out: object) -> torch.Tensor:
    return getattr(out, "logits", out)  # type: ignore[return-value]


@pytest.mark.parametrize("grad", [False, True])
def test_outputs_bit_identical_under_capture(grad, torchvision_vit, timm_pair, hf_pair, toys) -> None:
    cases = [(torchvision_vit, _x(32, 32)), (timm_pair[0], _x(32, 48)), (timm_pair[1], _x(32, 48)),
             (hf_pair[0], _x(32, 32)), (hf_pair[1], _x(32, 32)), (toys[1], _x(16, 16)), (toys[0], _x(16, 16))]
    for model, x in cases:
        with torch.no_grad():
            plain = _logits(model(x))
            with capture_attention(model, grad=grad) as rec:
                captured = _logits(model(x))
            assert not torch.is_grad_enabled()  # the grad mode is restored
        assert plain.abs().amin() > 0 and torch.equal(plain, captured), type(model).__name__
        assert len(rec.probs) == 2 and captured.requires_grad == grad
        if grad:
            assert all(p.requires_grad for p in rec.probs)
    ex = method_class("grad_rollout")(torchvision_vit)(_x(32, 32))
    with torch.no_grad():
        assert torch.equal(ex.output, torchvision_vit(_x(32, 32)))


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_same_map_alone_and_in_a_batch(method, timm_pair, torchvision_vit) -> None:
    for model, x in ((timm_pair[0], _x(32, 48, n=3)), (torchvision_vit, _x(32, 32, n=3))):
        explain = method_class(method)(model)
        batch = explain(x, 2).maps
        for i in range(3):
            torch.testing.assert_close(explain(x[i:i + 1], 2).maps[0], batch[i], atol=1e-5, rtol=0)


def test_topk_targets_and_explain_api(toys, toy_x) -> None:
    ex = method_class("grad_rollout")(toys[1])(toy_x, "top2")
    assert ex.maps.shape == (6, 16, 16) and ex.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.allclose(ex.raw[0], ex.raw[1])
    ex = lumos.explain(toys[1], toy_x, method="attention_rollout")
    assert ex.method == "rollout" and ex.layer is None and ex.maps.shape == (3, 16, 16)


def test_callers_grad_mode_does_not_matter_and_is_restored(toys, toy_x) -> None:
    explain = method_class("grad_rollout")(toys[1])
    expected = explain(toy_x, 1).raw
    with torch.no_grad():
        assert torch.equal(explain(toy_x, 1).raw, expected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        assert torch.equal(explain(toy_x, 1).raw, expected)
    assert torch.is_grad_enabled() and all(p.grad is None for p in toys[1].parameters())


def test_token_layout() -> None:
    assert token_layout(197, (224, 224)) == (1, (14, 14))
    assert token_layout(198, (224, 224)) == (2, (14, 14))  # class + distillation
    assert token_layout(201, (224, 224)) == (5, (14, 14))  # class + 4 registers
    assert token_layout(141, (224, 160)) == (1, (14, 10))
    assert token_layout(196, (224, 224)) == (0, (14, 14))  # global pooling, no class token
    assert token_layout(20, (64, 64), grid=(4, 4)) == (4, (4, 4))
    with pytest.raises(lumos.LumosError, match="grid"):
        token_layout(50, (64, 96), prefix=0)
    with pytest.raises(lumos.LumosError, match="does not match"):
        token_layout(20, (64, 64), grid=(5, 5))


def test_errors_are_one_line(timm_pair) -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(lumos.LumosError, match="no attention call"):
        method_class("rollout")(cnn)(_x(16, 16))
    for bad in ({"head_fusion": "median"}, {"discard_ratio": 1.0}, {"grid": (4,)}, {"prefix": -1}):
        with pytest.raises(lumos.LumosError):
            method_class("rollout")(cnn, **bad)
    from timm.models.vision_transformer import VisionTransformer

    dropped = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                attn_drop_rate=0.5)
    with pytest.raises(AttentionError, match="dropout"):
        method_class("grad_rollout")(dropped, eval_mode=False)(_x(32, 32))
    class Windows(nn.Module):  # attention over 2 windows: the token count differs from block to block
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.view(2 * x.shape[0], 1, -1, 4)
            return F.scaled_dot_product_attention(q, q, q).sum((1, 2, 3)).view(x.shape[0], 2)

    with pytest.raises(lumos.LumosError, match="global self-attention"):
        method_class("rollout")(Windows())(_x(16, 16))


def test_one_model_captured_on_two_threads_neither_fails_nor_mixes(torchvision_vit) -> None:
    """Thread A holds a capture of a torchvision ViT (wrapped nn.MultiheadAttention) open. Meanwhile a plain
    forward on the main thread is not recorded by A, and a capture on thread C waits for A instead of failing;
    A and C record exactly what a capture alone records."""
    import threading

    x = _x(32, 32)
    with capture_attention(torchvision_vit) as alone, torch.no_grad():
        torchvision_vit(x)
    inside, release, results, errors = threading.Event(), threading.Event(), {}, []

    def capture(name: str, hold: bool) -> None:
        try:
            with capture_attention(torchvision_vit) as rec, torch.no_grad():
                torchvision_vit(x)
                if hold:
                    inside.set()
                    release.wait(60)
            results[name] = rec.probs
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)
            inside.set()

    a = threading.Thread(target=capture, args=("a", True))
    a.start()
    assert inside.wait(60)
    with torch.no_grad():
        torchvision_vit(x[:1])  # a plain forward while A's modules are wrapped
    c = threading.Thread(target=capture, args=("c", False))
    c.start()
    c.join(0.5)
    assert c.is_alive(), "the second capture should wait for the first"
    release.set()
    a.join(60)
    c.join(60)
    assert not errors, errors
    for name in "ac":
        assert len(results[name]) == len(alone.probs)
        assert all(torch.equal(p, q) for p, q in zip(results[name], alone.probs, strict=True))
    assert "forward" not in torchvision_vit.encoder.layers[0].self_attention.__dict__


def test_a_forward_replaced_by_someone_else_is_refused_and_left_in_place(torchvision_vit) -> None:
    mha = torchvision_vit.encoder.layers[1].self_attention
    mha.forward = mine = lambda *a, **k: None  # noqa: ARG005
    try:
        with pytest.raises(AttentionError, match="forward replaced"), capture_attention(torchvision_vit):
            pass
        assert mha.forward is mine
        assert "forward" not in torchvision_vit.encoder.layers[0].self_attention.__dict__
    finally:
        del mha.forward


def test_method_all_runs_the_general_methods_and_attention_methods_are_chosen_by_name():
    """``--method all`` means every method that works on any model (so a CNN run does not fail on rollout);
    the attention methods stay available by name and in ``lumos.methods()``."""
    from lumos.cli_common import parse_methods

    general = lumos.methods(general=True)
    assert "rollout" not in general and "grad_rollout" not in general and "gradcam" in general
    assert {"rollout", "grad_rollout"} <= set(lumos.methods())
    assert parse_methods("all") == general
    assert set(parse_methods("all", transformer=True)) == set(lumos.methods())
    assert parse_methods("gradcam,attention_rollout") == ["gradcam", "rollout"]
