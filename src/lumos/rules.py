"""Modified backward rules for ReLU-like activations (guided backprop, DeconvNet), for one call only.

``backward_rules(rule)`` is a context manager that pushes a ``torch.overrides.TorchFunctionMode``.
While it is active, every ReLU-family call -- whether made by a module (``nn.ReLU``, ``nn.ReLU6``,
``nn.Hardtanh`` route through ``F.relu`` / ``F.hardtanh``), reused, in-place, or functional
(``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_``, ``F.relu6``, ``F.hardtanh``, ``hardtanh_``) --
is redirected to one ``autograd.Function`` whose forward is the same clamp and whose backward follows
``rules.rule`` *at backward time*:

- ``"plain"``: the ordinary gradient, ``g * (lo < y < hi)``;
- ``"guided"`` (Springenberg et al. 2014): ``relu(g) * (lo < y < hi)``;
- ``"deconvnet"`` (Zeiler & Fergus 2014): ``relu(g)``, the forward pass is ignored.

Because the rule is read when the backward runs, one forward can serve a plain backward (Grad-CAM at a
layer) and a guided one (to the input). Nothing is attached to the model: leaving the context pops the
mode, on every exit path, so later calls (and the graph of later forwards) are untouched.

Not treated as ReLU-like: ``clamp``/``clamp_min``, ``threshold``, leaky/parametric ReLU, GELU, SiLU,
hardswish and other smooth or non-zero-slope activations (their gradient is left as it is).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Rule = Literal["plain", "guided", "deconvnet"]
RULES: tuple[str, ...] = ("plain", "guided", "deconvnet")


class RuleState:
    """Mutable holder of the rule applied by backwards of graphs recorded under ``backward_rules``."""

    def __init__(self, rule: Rule) -> None:
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} is not known; use one of {', '.join(RULES)}.")
        self.rule: Rule = rule
        self.calls = 0  # ReLU-like calls seen (0 after a forward means the rules had nothing to act on)


class _ClampRule(torch.autograd.Function):
    """Forward: ``clamp(x, lo, hi)`` (in place if asked). Backward: ``state.rule`` on the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float, inplace: bool, state: RuleState) -> torch.Tensor:
        lo_ = None if lo == -math.inf else lo
        hi_ = None if hi == math.inf else hi
        if inplace:
            out = x.clamp_(lo_, hi_)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(lo_, hi_)
        ctx.save_for_backward(out)
        ctx.bounds = (lo, hi)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rule = ctx.state.rule
        if rule == "deconvnet":
            return grad.clamp_min(0), None, None, None, None
        (out,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        # One fused kernel for the mask (lo < y < hi); on y = clamp(x) it equals the mask on x.
        if hi != math.inf:
            g = torch.ops.aten.hardtanh_backward(grad, out, lo, hi)
        elif lo != -math.inf:
            g = torch.ops.aten.threshold_backward(grad, out, lo)
        else:
            g = grad.clone()
        if rule == "guided":
            g.clamp_min_(0)  # in place on the fresh tensor: no second allocation
        return g, None, None, None, None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


# Each entry: function -> parse(args, kwargs) -> (input, lo, hi, inplace).
_Parse = Callable[[tuple, dict], tuple[torch.Tensor, float, float, bool]]


def _relu(inplace: bool | None) -> _Parse:
    def parse(args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, float, bool]:
        ip = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return args[0], 0.0, math.inf, ip

    return parse


def _relu6(inplace: bool | None) -> _Parse:
    def parse(args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, float, bool]:
        ip = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return args[0], 0.0, 6.0, ip

    return parse


def _hardtanh(inplace: bool | None) -> _Parse:
    def parse(args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, float, bool]:
        lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
        hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
        ip = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return args[0], lo, hi, ip

    return parse


RELU_LIKE: dict[Callable, _Parse] = {
    F.relu: _relu(None),
    torch.relu: _relu(False),
    torch.Tensor.relu: _relu(False),
    torch.relu_: _relu(True),
    torch.Tensor.relu_: _relu(True),
    F.relu6: _relu6(None),
    torch._C._nn.relu6: _relu6(False),
    torch._C._nn.relu6_: _relu6(True),
    F.hardtanh: _hardtanh(None),
    torch._C._nn.hardtanh: _hardtanh(False),
    torch._C._nn.hardtanh_: _hardtanh(True),
}
"""The functions treated as ReLU-like (modules ``nn.ReLU``/``nn.ReLU6``/``nn.Hardtanh`` call them)."""


class _RulesMode(TorchFunctionMode):
    def __init__(self, state: RuleState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        parse = RELU_LIKE.get(func)
        if parse is None:
            return func(*args, **kwargs)
        x, lo, hi, inplace = parse(args, kwargs)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        self.state.calls += 1
        return _ClampRule.apply(x, lo, hi, inplace, self.state)


@contextmanager
def backward_rules(rule: Rule = "guided") -> Iterator[RuleState]:
    """Record forwards run inside with ReLU-like calls whose backward follows ``state.rule``.

    Yields the :class:`RuleState`; change ``state.rule`` between backwards of the same graph to switch
    rules. The mode is removed on exit (exceptions included); nothing on the model is touched.
    """
    state = RuleState(rule)
    with _RulesMode(state):
        yield state


class _SquashWatch(TorchFunctionMode):
    """Records the tensors returned by sigmoid/softmax calls (to tell probabilities from logits)."""

    NAMES = ("sigmoid", "softmax")

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[Any] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and name.strip("_").split(".")[-1] in self.NAMES:
            self.outputs.append(out)
        return out

    def produced(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is (a view of) what the last sigmoid/softmax call returned."""
        if not self.outputs:
            return False
        last = self.outputs[-1]
        return t is last or (t.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()
                             and t.shape == last.shape)


@contextmanager
def squash_watch() -> Iterator[_SquashWatch]:
    """Watch a forward for a final sigmoid/softmax: ``watch.produced(output)`` says whether the model's
    output already is a probability (functional calls and nn.Sigmoid/nn.Softmax modules alike)."""
    watch = _SquashWatch()
    with watch:
        yield watch
