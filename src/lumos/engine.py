"""The engine: the work every method shares, in one place.

- :func:`check_input` -- the one input check (shape, dtype, NaN/Inf, inference tensors);
- :func:`guard` -- the model left as found, autograd available even under ``torch.inference_mode``;
- :func:`forward` -- the one guarded forward over capture sites (+ backward rules) that resolves targets;
- :func:`grad` / :meth:`Forward.rank_grads` -- the one ``torch.autograd.grad`` call, per target rank, with
  a clear error when gradients are blocked (never a silent zero map);
- :func:`input_gradients` -- gradients of the targets w.r.t. many inputs in one forward (IG's path points);
- :func:`score_inputs` -- scoring many masked/perturbed inputs in bounded batches;
- :func:`run` and :func:`build` -- a method's call (forward -> method math -> Explanation) and the one
  Explanation builder.

A method is math on top of this (see ``lumos.methods``): it says which forward it needs (``grad``:
``"sites"``, ``"input"`` or ``"none"``; an optional backward ``rule``), computes raw maps from a
:class:`Forward` in ``compute`` and finishes them in ``finish``.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lumos.capture import Capture, model_guard
from lumos.errors import LumosError, NonFiniteError
from lumos.explanation import Explanation, Kind
from lumos.layers import Site
from lumos.rules import Rule, RuleState, backward_rules, squash_watch
from lumos.targets import OutputSpec, Target, Targets, TargetSpec, probability_kind, resolve_targets, select_output

log = logging.getLogger(__name__)
# Whether a call logs its blank maps: not while a method computes (calls it makes to other methods, e.g.
# SmoothGrad's base, are parts, not results), nor under quiet_blank_maps (batch surfaces say it per file)
_REPORT_BLANK = contextvars.ContextVar("lumos_report_blank_maps", default=True)
#: Why a map can be zero everywhere (the surfaces that report blank maps end with BLANK_REASON)
_BLANK_CAUSE = ("This is the exact result: the target's score does not change with what the method looks at (e.g. a "
                "head still initialised to zero)")
BLANK_REASON = (f"{_BLANK_CAUSE}, or a CAM has no positive evidence after ReLU, or its layer map is the same at "
                "every position (e.g. a constant image).")

# Whether a model's (selected) output comes out of a final sigmoid/softmax: watched once per model and output
# selector (the watch intercepts every torch call, ~30% of a forward), then remembered.
_SQUASHED: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _output_key(output: OutputSpec) -> str:
    return f"{type(output).__name__}:{output!r}" if not callable(output) else f"callable:{id(output)}"


def _known_squash(model: nn.Module, output: OutputSpec) -> bool | None:
    return _SQUASHED.get(model, {}).get(_output_key(output))


class GradientError(LumosError):
    """Gradients cannot reach what a method differentiates (no_grad/inference_mode/detach in the model)."""


def check_input(x: object) -> torch.Tensor:
    """Accept a (B, C, H, W) or (C, H, W) floating tensor of finite values; anything else is a one-line error.

    Returns a detached tensor that autograd can use (an inference-mode tensor is cloned out of it).
    """
    if not isinstance(x, torch.Tensor):
        raise LumosError(
            f"Input must be a torch.Tensor (B x C x H x W), not {type(x).__name__}; preprocess images first, "
            "e.g. with the preprocess returned by lumos.load_model."
        )
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise LumosError(f"Input must be a non-empty float tensor B x C x H x W; got {x.dtype} {tuple(x.shape)}.")
    x = x.detach()
    if x.is_inference():
        with torch.inference_mode(False):
            x = x.clone()
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    if bool(bad.any()):
        which = ", ".join(str(i) for i in bad.nonzero()[:, 0].tolist()[:10])
        raise LumosError(f"Input image(s) {which} (batch index) contain NaN or Inf values; nothing to explain there.")
    return x


def check_matches_model(model: nn.Module, x: torch.Tensor) -> None:
    """A one-line :class:`LumosError` when ``x``'s dtype or device differs from the model's first floating
    parameter (torch would fail deep inside the forward with the layer's internals)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return
    if x.dtype != weight.dtype:
        raise LumosError(f"The input is {x.dtype} but the model's weights are {weight.dtype}; convert one "
                         f"(e.g. x.to({weight.dtype}) or model.to({x.dtype})).")
    if x.device != weight.device:
        raise LumosError(f"The input is on {x.device} but the model is on {weight.device}; move one "
                         f"(e.g. x.to('{weight.device}')).")


@contextmanager
def guard(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """The model left as found (modes, buffers, grad mode), with autograd usable even when the caller is
    inside ``torch.inference_mode()``."""
    with torch.inference_mode(False), model_guard(model, eval_mode):
        yield


def grad(score: torch.Tensor, wrt: Sequence[torch.Tensor], retain: bool, what: str) -> list[torch.Tensor]:
    """d ``score`` / d ``wrt`` -- the one ``torch.autograd.grad`` call. Blocked gradients are an error."""
    if not score.requires_grad:
        raise GradientError(
            f"Gradients are blocked: the explained score does not depend on {what} through autograd (the model "
            "runs under torch.no_grad, detaches its output, or uses .data); explain a model that keeps its graph."
        )
    grads = torch.autograd.grad(score, list(wrt), retain_graph=retain, allow_unused=True)
    if any(g is None for g in grads):
        raise GradientError(
            f"Gradients are blocked: the explained score does not depend on {what} through autograd (a detach or "
            "torch.no_grad inside the model cuts the path)."
        )
    if not all(bool(g.isfinite().all()) for g in grads):
        raise NonFiniteError(
            f"The gradient of the explained score with respect to {what} is not finite (NaN or inf), though the score "
            "is: no map can be computed from it. A model that scales each input by its own spread divides by zero "
            "on a constant input (e.g. an integrated-gradients baseline); try another baseline."
        )
    return list(grads)


@dataclass
class Forward:
    """One guarded forward: the input (a leaf requiring grad for ``grad="input"``), the selected output,
    the recorded sites' raw outputs (graph leaves), the resolved targets and the backward-rule state."""

    x: torch.Tensor
    output: torch.Tensor
    acts: dict[str, torch.Tensor]
    sites: list[Site]
    targets: Targets
    rule_state: RuleState | None = None
    probs_kind: str = "none"

    @property
    def target(self) -> Target:
        return self.targets.target

    @property
    def k(self) -> int:
        return self.targets.scores.shape[1]

    def maps(self) -> list[torch.Tensor]:
        """Each site's activations as B x C x h x w (its layout applied), detached."""
        return [s.to_map(self.acts[s.name].detach()) for s in self.sites]

    def classes(self, j: int) -> torch.Tensor | None:
        """Target classes (B,) of rank ``j`` (None for a callable target)."""
        return None if self.targets.classes is None else self.targets.classes[:, j]

    def rank_grads(self, wrt: Sequence[torch.Tensor], what: str) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Per target rank ``j``: gradients of ``scores[:, j].sum()`` w.r.t. ``wrt`` (one backward each)."""
        for j in range(self.k):
            yield j, grad(self.targets.scores[:, j].sum(), wrt, retain=j < self.k - 1, what=what)

    def site_grads(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Per rank: gradients at every site as B x C x h x w (the site's layout applied)."""
        tensors = [self.acts[s.name] for s in self.sites]
        names = ", ".join(f"layer '{s.name}'" for s in self.sites)
        for j, grads in self.rank_grads(tensors, names):
            yield j, [s.to_map(g) for s, g in zip(self.sites, grads, strict=True)]


def check_spatial(name: str, maps: torch.Tensor, images: int | None = None) -> None:
    """A one-line :class:`LumosError` when a layer's maps (B, C, h, w) are 1 x 1: one value per channel, so
    every "map" would be a flat square (upsampling would only add rounding noise, min-max scaled to [0, 1]);
    or, given the number of ``images``, when there is not one map per image (a detector's RoI pooling gives one
    per proposal: explaining them as images would be silently wrong)."""
    if images is not None and maps.shape[0] != images:
        raise LumosError(f"Layer '{name}' outputs {maps.shape[0]} maps for {images} image(s), not one per image "
                         "(e.g. one per region proposal); choose a layer of the backbone (layer='auto' does).")
    if tuple(maps.shape[-2:]) == (1, 1):
        raise LumosError(f"Layer '{name}' outputs {maps.shape[1]}x1x1: one value per channel, no spatial map to "
                         "show; choose a layer whose output is larger than 1x1 (layer='auto' picks the last one).")


def forward(
    model: nn.Module,
    x: torch.Tensor,
    sites: Sequence[Site],
    target: TargetSpec,
    *,
    output: OutputSpec = None,
    labels: Sequence[str] | None = None,
    probs: str = "auto",
    grad_mode: str = "sites",
    rule: Rule | None = None,
) -> Forward:
    """The one forward (call inside :func:`guard`): record ``sites``, resolve targets.

    ``grad_mode``: ``"sites"`` -- autograd from the first site on (CAMs); ``"input"`` -- from the input
    (pixel attributions); ``"none"`` -- no autograd (perturbation methods, activation CAMs).
    """
    sites = [s.for_input(x.shape) for s in sites]  # token grids follow the input size
    with ExitStack() as stack:
        state = stack.enter_context(backward_rules(rule)) if rule else None
        if grad_mode == "input":
            x = x.clone().requires_grad_(True)
            stack.enter_context(torch.enable_grad())
            model_in = x.clone()  # the model may modify its input in place
        else:
            stack.enter_context(torch.no_grad())
            model_in = x
        cap = stack.enter_context(Capture({s.name: s.module for s in sites}, grad=grad_mode != "none"))
        squashed = _known_squash(model, output)
        watch = stack.enter_context(squash_watch()) if squashed is None else None
        out = select_output(model(model_in), output)
    if watch is not None:
        squashed = watch.produced(out)
        _SQUASHED.setdefault(model, {})[_output_key(output)] = squashed
    missing = [s.name for s in sites if s.name not in cap.activations]
    if missing:
        raise LumosError(f"Layer '{missing[0]}' did not run in the forward pass; choose another layer.")
    for s in sites:  # a layer that cannot give a map fails here, before any backward
        check_spatial(s.name, s.to_map(cap.activations[s.name].detach()), x.shape[0])
    targets = resolve_targets(target, out, labels, probs, squashed)
    check_finite_scores(targets.scores, targets.classes)
    return Forward(x, out, dict(cap.activations), sites, targets, state, probability_kind(out, probs, squashed))


def input_gradients(
    model: nn.Module, inputs: torch.Tensor, target: Target, index: torch.Tensor | None, output: OutputSpec = None,
    rule: Rule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (n, K, C, H, W) of the target scores w.r.t. ``inputs`` (n, C, H, W) in one forward, and the
    scores (n, K); row r belongs to image ``index[r]``."""
    xg = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad(), backward_rules(rule) if rule else nullcontext():
        scores = target.scores(select_output(model(xg.clone()), output), index)
    k = scores.shape[1]
    grads = [grad(scores[:, j].sum(), [xg], retain=j < k - 1, what="the input")[0] for j in range(k)]
    return torch.stack(grads, 1), scores.detach()


@torch.no_grad()
def score_inputs(
    model: nn.Module,
    make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
    n: int,
    target: Target,
    *,
    output: OutputSpec = None,
    batch_size: int = 32,
    use_probs: bool = True,
) -> torch.Tensor:
    """Score ``n`` perturbed inputs in batches of ``batch_size``: ``make(start, stop)`` returns the inputs of
    rows ``start:stop`` and the image each row belongs to. Returns (n, K) confidences (probabilities where
    the target has them and ``use_probs``, else scores). Memory is bounded by ``batch_size``, never by ``n``."""
    rows = []
    fast = True  # channels-last batches run ~1.6x faster through CPU convolutions; not every model takes them
    for start in range(0, n, batch_size):
        inputs, index = make(start, min(n, start + batch_size))
        out = None
        if fast and inputs.ndim == 4:
            try:
                out = model(inputs.contiguous(memory_format=torch.channels_last))
            except RuntimeError:  # e.g. a .view() on the input: use the standard layout from here on
                fast = False
        out = select_output(model(inputs.contiguous()) if out is None else out, output)
        rows.append(target.confidence(out, index) if use_probs else target.scores(out, index).float())
        bad = ~rows[-1].isfinite().all(1)
        if bool(bad.any()):
            which = sorted({int(i) for i in index[bad.cpu()].tolist()})
            images = f"image{'s' if len(which) > 1 else ''} {', '.join(map(str, which[:3]))}"
            raise NonFiniteError(
                f"The model's score is not finite (NaN or inf) on {int(bad.sum())} perturbed copies of {images} "
                "(pixels masked, occluded or replaced): no map or curve can be computed from them. A model "
                "that scales each input by its own spread divides by zero on a constant baseline; try another "
                "baseline.")
    return torch.cat(rows)


def check_finite_scores(scores: torch.Tensor, classes: torch.Tensor | None) -> None:
    """A one-line error naming the images whose explained score is NaN or inf (a map of it would be noise or 0)."""
    bad = ~scores.detach().isfinite()
    if not bool(bad.any()):
        return
    where = bad.nonzero().tolist()

    def name(i: int, j: int) -> str:  # a single image needs no index (batch surfaces retry image by image)
        cls = "" if classes is None else f"class {int(classes[i, j])}"
        if scores.shape[0] == 1:
            return cls or "the image"
        return f"image {i} {cls}".strip()

    shown = ", ".join(name(i, j) for i, j in where[:3])
    raise NonFiniteError(f"The model's score for the explained target is not finite (NaN or inf) for {shown}"
                     f"{', ...' if len(where) > 3 else ''}: no map can be computed; check the model and its input.")


class MethodLike(Protocol):
    """What the engine needs from a method object (see ``lumos.methods.base.Method``)."""

    name: str
    kind: Kind
    grad_mode: str
    rule: Rule | None
    model: nn.Module
    output: OutputSpec
    labels: Sequence[str] | None
    probs: str
    eval_mode: bool

    def sites(self, x: torch.Tensor) -> list[Site]: ...
    def compute(self, fw: Forward) -> Any: ...
    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor: ...
    def params(self) -> dict[str, Any]: ...
    def layer_names(self, fw: Forward) -> list[str]: ...


def run(method: MethodLike, x: object, target: TargetSpec = None) -> Explanation:
    """A method's call: check the input, guarded forward, method math, the Explanation."""
    x = check_input(x)
    check_matches_model(method.model, x)
    with guard(method.model, method.eval_mode):
        sites = method.sites(x)
        fw = forward(method.model, x, sites, target, output=method.output, labels=method.labels,
                     probs=method.probs, grad_mode=method.grad_mode, rule=method.rule)
        with quiet_blank_maps():
            result = method.compute(fw)
    raws, extra = result if isinstance(result, tuple) else (result, {})
    return build(method, x, raws, fw, extra)


def blank_maps(maps: torch.Tensor) -> torch.Tensor:
    """(N,) bool on the CPU: which finished maps (N, H, W) are zero everywhere (drawn as nothing)."""
    return (maps.detach().flatten(1) == 0).all(1).cpu()


@contextmanager
def quiet_blank_maps() -> Iterator[None]:
    """Calls inside log no blank-map line (a surface that reports per file, or a method's inner calls)."""
    token = _REPORT_BLANK.set(False)
    try:
        yield
    finally:
        _REPORT_BLANK.reset(token)


def report_blank_maps(method: str, maps: torch.Tensor, layers: list[str], classes: torch.Tensor | None, k: int,
                      relu: bool = False) -> None:
    """One log line when finished maps (N, H, W) are zero everywhere: exact, but drawn as nothing, so say so
    (not for a method's inner calls: the result they make up says it once)."""
    if not _REPORT_BLANK.get() or maps.ndim < 2 or maps.shape[0] == 0:
        return
    blank = blank_maps(maps)
    if not bool(blank.any()):
        return
    which = blank.nonzero()[:, 0].tolist()
    cls = None if classes is None else classes.reshape(-1).cpu()
    shown = ", ".join(f"image {i // k}" + ("" if cls is None else f" class {int(cls[i])}") for i in which[:3])
    where = f"at {', '.join(layers)} " if layers else ""
    reason = BLANK_REASON if relu else f"{_BLANK_CAUSE}."
    log.warning("%s: %d of %d maps are zero everywhere %s(%s%s), so nothing is drawn for them. %s", method,
                len(which), blank.numel(), where, shown, ", ..." if len(which) > 3 else "", reason)


def build(method: MethodLike, x: torch.Tensor, raws: list[torch.Tensor], fw: Forward,
          extra: dict[str, Any] | None = None) -> Explanation:
    """The one Explanation builder: finished maps, raw maps, targets/scores/probs flattened image-major."""
    raws = [r.detach() for r in raws]
    t = fw.targets
    b, k = t.scores.shape
    names = method.layer_names(fw)
    maps = method.finish(raws, tuple(x.shape[-2:]))
    report_blank_maps(method.name, maps, names, t.classes, k, bool(getattr(method, "relu", False)))
    flat = (lambda v: None if v is None else v.detach().reshape(-1))  # noqa: E731
    return Explanation(
        maps=maps,
        raw=raws[0] if len(raws) == 1 else tuple(raws),
        targets=flat(t.classes),
        scores=flat(t.scores),
        probs=flat(t.probs),
        layer=None if not names else names[0] if len(names) == 1 else tuple(names),
        method=method.name,
        params={**method.params(), **(extra or {})},
        image_index=torch.arange(b, device=x.device).repeat_interleave(k),
        layer_auto=bool(fw.sites) and any(s.auto for s in fw.sites),
        kind=method.kind,
        output=fw.output.detach(),
        probs_kind=fw.probs_kind,
    )
