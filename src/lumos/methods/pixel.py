"""Pixel-space attributions: gradients, gradient x input, DeconvNet, guided backprop, guided Grad-CAM.

Every method returns an :class:`~lumos.explanation.Explanation` whose ``raw`` is the signed attribution
(N, C, H, W) in the model's input space and whose ``maps`` (N, H, W) reduce the channels explicitly
(``reduce=``) and normalise with a percentile clip (``normalize=``, ``clip=``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lumos.capture import Capture, model_guard
from lumos.errors import LumosError
from lumos.explanation import Explanation, normalize_maps, upsample
from lumos.layers import LayerSpec
from lumos.methods.backprop_rules import Rule, RuleState, backward_rules
from lumos.methods.base import LayerMethod, _flat, check_input, register
from lumos.targets import OutputSpec, Targets, TargetSpec, resolve_targets, select_output

Reduce = Literal["absmax", "sum", "l2"]
PixelNormalize = Literal["percentile", "minmax"] | None
REDUCTIONS = ("absmax", "sum", "l2")


def reduce_channels(raw: torch.Tensor, mode: Reduce) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): ``absmax`` max_c |a|, ``l2`` sqrt(sum_c a^2), ``sum`` sum_c a (signed)."""
    raw = raw.float()
    if mode == "absmax":
        return raw.abs().amax(1)
    if mode == "l2":
        return raw.pow(2).sum(1).sqrt()
    if mode == "sum":
        return raw.sum(1)
    raise LumosError(f"reduce={mode!r} is not known; use one of {', '.join(REDUCTIONS)}.")


def upper_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q, dim=1, keepdim=True)`` (linear interpolation) from a top-k, not a full sort."""
    n = values.shape[1]
    pos = q * (n - 1)
    below = math.floor(pos)
    k = n - below  # the value at ascending index `below` is the k-th largest
    top = values.topk(k, dim=1).values
    low, high = top[:, k - 1:k], top[:, max(k - 2, 0):max(k - 2, 0) + 1]
    return low + (high - low) * (pos - below)


def normalize_pixel_maps(maps: torch.Tensor, mode: PixelNormalize, clip: float = 99.5) -> torch.Tensor:
    """Normalise (N, H, W) maps per map.

    ``"percentile"``: divide by the ``clip``-th percentile of |map| and clip, so a few hot pixels do not
    wash out the rest; non-negative maps land in [0, 1], signed ones (``reduce="sum"``) in [-1, 1].
    ``"minmax"``: to [0, 1] by min and max. ``None``: unchanged. A zero map stays zeros.
    """
    if mode is None:
        return maps
    if mode == "minmax":
        return normalize_maps(maps, "minmax")
    if mode != "percentile":
        raise LumosError(f"normalize={mode!r} is not known; use 'percentile', 'minmax' or None.")
    if not 0.0 < float(clip) <= 100.0:
        raise LumosError(f"clip={clip!r} must be a percentile in (0, 100].")
    flat = maps.flatten(1)
    mag = flat.abs()
    scale = upper_quantile(mag, float(clip) / 100.0)
    top = mag.amax(1, keepdim=True)
    scale = torch.where(scale > 0, scale, top)  # a sparse map whose percentile is 0: use its max
    out = torch.where(scale > 0, flat / scale.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    lower = -1.0 if bool((flat < 0).any()) else 0.0
    return out.clamp(lower, 1.0).view_as(maps)


class PixelMethod(LayerMethod):
    """Base of pixel-space methods: same constructor and call as the CAMs, maps at input resolution.

    Args:
        model: any ``nn.Module``; left exactly as found.
        layer: ignored except by ``guided_gradcam`` (its Grad-CAM layer); accepted so every method has
            the same signature.
        output: selects the tensor to explain when the model returns a tuple/dict.
        labels: class names, so targets may be given as names.
        eval_mode: explain the model in eval mode (restored after).
        reduce: channel reduction for ``maps``: ``"absmax"`` (default, Simonyan et al.), ``"l2"`` or
            ``"sum"`` (signed).
        normalize: ``"percentile"`` (default), ``"minmax"`` or ``None``.
        clip: the percentile of |map| that maps to 1 with ``normalize="percentile"`` (default 99.5).
    """

    rule: ClassVar[Rule | None] = None

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        output: OutputSpec = None,
        labels: Sequence[str] | None = None,
        eval_mode: bool = True,
        reduce: Reduce = "absmax",
        normalize: PixelNormalize = "percentile",
        clip: float = 99.5,
    ) -> None:
        super().__init__(model, layer, output=output, eval_mode=eval_mode, labels=labels)
        if reduce not in REDUCTIONS:
            raise LumosError(f"reduce={reduce!r} is not known; use one of {', '.join(REDUCTIONS)}.")
        if normalize not in ("percentile", "minmax", None):
            raise LumosError(f"normalize={normalize!r} is not known; use 'percentile', 'minmax' or None.")
        self.reduce = reduce
        self.normalize = normalize  # type: ignore[assignment]
        self.clip = clip
        self._warned = False

    def params(self) -> dict[str, Any]:
        return {"reduce": self.reduce, "normalize": self.normalize, "clip": self.clip}

    # -- to implement ----------------------------------------------------------------------------------
    def attribute(self, x: torch.Tensor, target: TargetSpec) -> tuple[torch.Tensor, Targets, dict[str, Any]]:
        """Signed attributions (B*K, C, H, W) image-major, the resolved targets, extra params."""
        raise NotImplementedError

    # -- pipeline --------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        x = check_input(x)
        with model_guard(self.model, self.eval_mode), torch.enable_grad():
            raw, targets, extra = self.attribute(x, target)
        return self.explanation(x, raw.detach(), targets, extra)

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """``maps`` from signed attributions: channel reduction, then normalisation."""
        return normalize_pixel_maps(reduce_channels(raw, self.reduce), self.normalize, self.clip).float()

    def explanation(
        self, x: torch.Tensor, raw: torch.Tensor, targets: Targets, extra: dict[str, Any] | None = None,
        layer: str | None = None,
    ) -> Explanation:
        """Assemble the Explanation (maps from ``raw``; targets, scores, probs flattened image-major)."""
        b, k = targets.scores.shape
        return Explanation(
            maps=self.finish(raw),
            raw=raw,
            targets=_flat(targets.classes),
            scores=_flat(targets.scores),
            probs=_flat(targets.probs),
            layer=layer,
            method=self.name,
            params={**self.params(), **(extra or {})},
            image_index=torch.arange(b, device=x.device).repeat_interleave(k),
            layer_auto=layer is not None and self.layer == "auto",
        )

    def warn_if_no_relu(self, state: RuleState | None) -> None:
        """Warn (once per method object) when a modified backward rule found no ReLU-like call."""
        if state is not None and state.calls == 0 and not self._warned:
            self._warned = True
            why = ("the model is TorchScript, whose ReLU calls run inside the compiled graph where no rule can "
                   "reach them" if isinstance(self.model, torch.jit.ScriptModule) else
                   "the model made no ReLU-like call (ReLU, ReLU6, Hardtanh, relu/relu6/hardtanh functions)")
            warnings.warn(f"{self.name}: {why}, so the modified backward rule changes nothing and the result is "
                          "the plain gradient.", stacklevel=4)

    def input_gradients(
        self, x: torch.Tensor, target: TargetSpec, rule: Rule | None = None
    ) -> tuple[torch.Tensor, Targets]:
        """d score / d input (B*K, C, H, W), with ReLU-like backwards following ``rule`` (None = plain)."""
        xg = x.clone().requires_grad_(True)
        with backward_rules(rule) if rule else nullcontext() as state:
            out = select_output(self.model(xg.clone()), self.output)
        self.warn_if_no_relu(state)
        targets = resolve_targets(target, out, self.labels)
        k = targets.scores.shape[1]
        grads = [_grad(targets.scores[:, j].sum(), xg, retain=j < k - 1) for j in range(k)]
        return (grads[0] if k == 1 else torch.stack(grads, 1).flatten(0, 1)), targets


def _grad(score: torch.Tensor, x: torch.Tensor, retain: bool) -> torch.Tensor:
    if not score.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(score, x, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@register
class Gradients(PixelMethod):
    """Vanilla gradients (Simonyan et al. 2013): d score / d input."""

    name = "gradients"

    def attribute(self, x, target):
        g, targets = self.input_gradients(x, target)
        return g, targets, {}


@register
class GradientXInput(PixelMethod):
    """Gradient x input (Shrikumar et al. 2016): the input times d score / d input."""

    name = "gradient_x_input"

    def attribute(self, x, target):
        g, targets = self.input_gradients(x, target)
        k = targets.scores.shape[1]
        return g * x.repeat_interleave(k, 0), targets, {}


@register
class DeconvNet(PixelMethod):
    """DeconvNet (Zeiler & Fergus 2014): through ReLU-like ops only positive gradients pass, forward ignored."""

    name = "deconvnet"
    rule = "deconvnet"

    def attribute(self, x, target):
        g, targets = self.input_gradients(x, target, self.rule)
        return g, targets, {}


@register
class GuidedBackprop(PixelMethod):
    """Guided backprop (Springenberg et al. 2014): gradient where both the input and the gradient are positive."""

    name = "guided_backprop"
    rule = "guided"

    def attribute(self, x, target):
        g, targets = self.input_gradients(x, target, self.rule)
        return g, targets, {}


@register
class GuidedGradCAM(PixelMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop x the upsampled Grad-CAM of ``layer``.

    One forward; a plain backward to the layer (Grad-CAM, ReLU'd) and a guided one to the input.
    ``upsample`` is the Grad-CAM interpolation (default bilinear; Captum's default is nearest).
    """

    name = "guided_gradcam"
    rule = "guided"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, upsample: str = "bilinear",
                 **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        self.upsample = upsample

    def params(self) -> dict[str, Any]:
        return {**super().params(), "upsample": self.upsample}

    def __call__(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        x = check_input(x)
        with model_guard(self.model, self.eval_mode), torch.enable_grad():
            layers = self.resolve(x)
            if len(layers) != 1:
                raise LumosError("guided_gradcam explains one layer at a time; give a single layer.")
            raw, targets, extra = self.attribute(x, target)
        return self.explanation(x, raw.detach(), targets, extra, layer=next(iter(layers)))

    def attribute(self, x, target):
        layers = self.resolve(x)
        (name, _), = layers.items()
        xg = x.clone().requires_grad_(True)
        with backward_rules("plain") as state, Capture(layers, grad=True) as cap:
            out = select_output(self.model(xg.clone()), self.output)
        self.warn_if_no_relu(state)
        if name not in cap.activations:
            raise LumosError(f"Layer '{name}' did not run in the forward pass; choose another layer.")
        act = cap.activations[name]
        if act.ndim != 4:
            raise LumosError(f"Layer '{name}' outputs shape {tuple(act.shape)}, not a B x C x h x w map for Grad-CAM.")
        targets = resolve_targets(target, out, self.labels)
        k = targets.scores.shape[1]
        raws = []
        for j in range(k):
            score = targets.scores[:, j].sum()
            state.rule = "plain"
            g_layer = _grad(score, act, retain=True)
            cam = (g_layer.mean((2, 3), keepdim=True) * act.detach()).sum(1).relu()
            cam = upsample(cam, tuple(x.shape[-2:]), self.upsample)
            state.rule = "guided"
            g_in = _grad(score, xg, retain=j < k - 1)
            raws.append(g_in * cam[:, None])
        return torch.stack(raws, 1).flatten(0, 1), targets, {}
