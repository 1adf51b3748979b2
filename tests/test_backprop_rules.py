"""The modified-backward mechanism: catches every ReLU-family call, and leaves nothing behind."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import lumos
from lumos.rules import backward_rules
from nets import GapNet, images
from test_engine import assert_unchanged, state_snapshot


def plain_pass(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outputs and parameter gradients of an ordinary forward + backward."""
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    return out.detach(), [g.detach() for g in grads]


class Activations(nn.Module):
    """One linear layer followed by each ReLU-family call in turn."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6, 6)
        self.relu6 = nn.ReLU6()
        self.hardtanh = nn.Hardtanh(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * 4
        return {
            "F.relu": lambda t: F.relu(t),
            "F.relu_inplace": lambda t: F.relu(t, inplace=True),
            "torch.relu": torch.relu,
            "Tensor.relu": lambda t: t.relu(),
            "relu_": lambda t: t.relu_(),
            "torch.relu_": torch.relu_,
            "F.relu6": F.relu6,
            "nn.ReLU6": self.relu6,
            "F.hardtanh": lambda t: F.hardtanh(t, -0.5, 0.5),
            "F.hardtanh_": lambda t: F.hardtanh_(t, -0.5, 0.5),
            "nn.Hardtanh": self.hardtanh,
        }[self.kind](y)


BOUNDS = {"relu6": (0.0, 6.0), "hardtanh": (-0.5, 0.5)}


@pytest.mark.parametrize("kind", ["F.relu", "F.relu_inplace", "torch.relu", "Tensor.relu", "relu_", "torch.relu_",
                                  "F.relu6", "nn.ReLU6", "F.hardtanh", "F.hardtanh_", "nn.Hardtanh"])
def test_every_relu_family_call_gets_the_rule(kind):
    torch.manual_seed(0)
    model = Activations(kind)
    x = torch.randn(5, 6, requires_grad=True)
    weight = torch.randn(5, 6)
    lo, hi = next((b for k, b in BOUNDS.items() if k in kind.lower()), (0.0, float("inf")))
    pre = (model.lin(x) * 4).detach()
    mask = ((pre > lo) & (pre < hi)).float()
    for rule in ("plain", "guided", "deconvnet"):
        with backward_rules(rule) as state:
            out = model(x)
        assert state.calls == 1
        torch.testing.assert_close(out, pre.clamp(lo, hi))
        (g,) = torch.autograd.grad((out * weight).sum(), x)
        upstream = {"plain": weight * mask, "guided": weight.clamp_min(0) * mask, "deconvnet": weight.clamp_min(0)}
        torch.testing.assert_close(g, upstream[rule] @ (model.lin.weight * 4))


def test_guided_backprop_leaves_the_model_as_found_even_after_an_exception():
    torch.manual_seed(0)
    model = GapNet(inplace=True, bn=True).eval()  # eval: the plain pass is deterministic (no dropout)
    model.features[1].train()  # a mixed-mode model: the flags must come back as they were
    x = images(3)
    with torch.no_grad():
        model.features[1].running_mean.zero_()
    model.features[1].momentum = 0.0  # training-mode BatchNorm, but the plain pass leaves its stats alone
    out0, grads0 = plain_pass(model, x.clone())
    snap = state_snapshot(model)
    lumos.explain(model, x, method="guided_backprop")
    lumos.explain(model, x, method="deconvnet", target="topk:2")
    lumos.explain(model, x, method="guided_backprop", eval_mode=False)
    assert_unchanged(snap, model)

    def boom(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inside the call")

    with pytest.raises(RuntimeError, match="inside the call"):
        lumos.explain(model, x, method="guided_backprop", target=boom)
    with pytest.raises(RuntimeError, match="inside the call"):
        lumos.explain(model, x, method="guided_gradcam", layer="features.3", target=boom)
    assert_unchanged(snap, model)
    assert torch._C._len_torch_function_stack() == 0
    out1, grads1 = plain_pass(model, x.clone())
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    # F.relu after the call: ordinary gradient (negative upstream gradients pass, negative inputs block).
    t = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad((F.relu(t) * torch.tensor([3.0, -5.0])).sum(), t)
    assert g.tolist() == [0.0, -5.0]


def test_user_torch_function_mode_is_kept():
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    model = GapNet().eval()
    with Spy():
        lumos.explain(model, images(1), method="guided_backprop")
        depth = torch._C._len_torch_function_stack()
    assert depth == 1 and seen
    assert torch._C._len_torch_function_stack() == 0


def test_warns_once_without_relu_like_activations():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = images(2, size=8)
    model(x)
    gb = lumos.GuidedBackprop(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = gb(x)
        gb(x)
    assert len([w for w in caught if "ReLU-like" in str(w.message)]) == 1
    torch.testing.assert_close(a.raw, lumos.explain(model, x, method="gradients", target=a.targets).raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lumos.explain(GapNet().eval(), x, method="guided_backprop")  # ReLUs present: no warning


def test_frozen_model_under_no_grad():
    model = GapNet().eval().requires_grad_(False)
    with torch.no_grad():
        ex = lumos.explain(model, images(2), method="guided_backprop")
        assert not torch.is_grad_enabled()
    assert ex.raw.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_torchscript_model_gets_the_plain_gradient_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.13
        scripted = torch.jit.script(model.eval())
    x = images(2, size=8)
    with pytest.warns(UserWarning, match="TorchScript"):
        guided = lumos.explain(scripted, x, method="guided_backprop", target=1)
    torch.testing.assert_close(guided.raw, lumos.explain(scripted, x, method="gradients", target=1).raw)
