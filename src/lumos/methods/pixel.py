"""Pixel-space attributions: gradients, gradient x input, DeconvNet, guided backprop, guided Grad-CAM.

Every method returns an :class:`~lumos.explanation.Explanation` of kind ``"pixel"`` whose ``raw`` is the
signed attribution (N, C, H, W) in the model's input space and whose ``maps`` (N, H, W) reduce the channels
explicitly (``reduce=``) and normalise with a percentile clip (``normalize=``, ``clip=``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from lumos.engine import Forward, grad
from lumos.errors import LumosError
from lumos.explanation import (
    REDUCTIONS,
    Kind,
    PixelNormalize,
    Reduce,
    finish_pixel_maps,
    normalize_pixel_maps,
    reduce_channels,
    upper_quantile,
    upsample,
)
from lumos.layers import LayerSpec
from lumos.methods.base import Method, register, stack_ranks, upsample_check, weighted_sum
from lumos.methods.gradient_cams import gradcam_weights
from lumos.rules import RuleState

__all__ = ["DeconvNet", "GradientXInput", "Gradients", "GuidedBackprop", "GuidedGradCAM", "PixelMethod",
           "normalize_pixel_maps", "reduce_channels", "upper_quantile"]


class PixelMethod(Method):
    """Base of pixel-space methods: same constructor and call as the CAMs, maps at input resolution.

    Args (besides ``Method``'s):
        layer: ignored except by ``guided_gradcam`` (its Grad-CAM layer); accepted so every method has
            the same signature.
        reduce: channel reduction for ``maps``: ``"absmax"`` (default, Simonyan et al.), ``"l2"`` or
            ``"sum"`` (signed).
        normalize: ``"percentile"`` (default), ``"minmax"`` or ``None``.
        clip: the percentile of |map| that maps to 1 with ``normalize="percentile"`` (default 99.5).
    """

    kind: ClassVar[Kind] = "pixel"
    grad_mode: ClassVar[str] = "input"
    uses_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, reduce: Reduce = "absmax",
                 normalize: PixelNormalize = "percentile", clip: float = 99.5, **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        if reduce not in REDUCTIONS:
            raise LumosError(f"reduce={reduce!r} is not known; use one of {', '.join(REDUCTIONS)}.")
        if normalize not in ("percentile", "minmax", None):
            raise LumosError(f"normalize={normalize!r} is not known; use 'percentile', 'minmax' or None.")
        if not isinstance(clip, int | float) or isinstance(clip, bool) or not 0.0 < float(clip) <= 100.0:
            raise LumosError(f"clip={clip!r} must be a percentile in (0, 100].")
        self.reduce = reduce
        self.normalize = normalize
        self.clip = clip

    def params(self) -> dict[str, Any]:
        return {"reduce": self.reduce, "normalize": self.normalize, "clip": self.clip}

    def finish(self, raws: list[torch.Tensor] | torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``maps`` from signed attributions (N, C, H, W): channel reduction, then normalisation."""
        raw = raws if isinstance(raws, torch.Tensor) else raws[0]
        return finish_pixel_maps(raw, self.reduce, self.normalize, self.clip)

    def input_grads(self, fw: Forward) -> torch.Tensor:
        """d score / d input (B*K, C, H, W), image-major, under the forward's backward rule."""
        warn_if_no_relu(self, fw.rule_state)
        return stack_ranks([[g] for _, (g,) in fw.rank_grads([fw.x], "the input")])[0]

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        return [self.input_grads(fw)]


def warn_if_no_relu(method: Method, state: RuleState | None) -> None:
    """Warn (once per method object) when a modified backward rule found no ReLU-like call (the result is
    then the plain gradient)."""
    if state is None or state.calls or getattr(method, "_warned_no_relu", False):
        return
    method._warned_no_relu = True  # a warning policy, not call state: the result does not depend on it
    why = ("the model is TorchScript, whose ReLU calls run inside the compiled graph where no rule can reach them"
           if isinstance(method.model, torch.jit.ScriptModule) else
           "the model made no ReLU-like call (ReLU, ReLU6, Hardtanh, relu/relu6/hardtanh functions)")
    warnings.warn(f"{method.name}: {why}, so the modified backward rule changes nothing and the result is the "
                  "plain gradient.", stacklevel=5)


@register
class Gradients(PixelMethod):
    """Vanilla gradients (Simonyan et al. 2013): d score / d input."""

    name = "gradients"


@register
class GradientXInput(PixelMethod):
    """Gradient x input (Shrikumar et al. 2016): the input times d score / d input."""

    name = "gradient_x_input"

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        return [self.input_grads(fw) * fw.x.detach().repeat_interleave(fw.k, 0)]


@register
class DeconvNet(PixelMethod):
    """DeconvNet (Zeiler & Fergus 2014): through ReLU-like ops only positive gradients pass, forward ignored."""

    name = "deconvnet"
    rule = "deconvnet"


@register
class GuidedBackprop(PixelMethod):
    """Guided backprop (Springenberg et al. 2014): gradient where both the input and the gradient are positive."""

    name = "guided_backprop"
    rule = "guided"


@register
class GuidedGradCAM(PixelMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop x the upsampled Grad-CAM of ``layer``.

    One forward; a plain backward to the layer (Grad-CAM's channel weights, ReLU'd map) and a guided one to
    the input. ``upsample`` is the Grad-CAM interpolation (default bilinear; Captum's default is nearest).
    """

    name = "guided_gradcam"
    rule = "guided"
    uses_layer = True

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, upsample: str = "bilinear",
                 **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        self.upsample = upsample_check(upsample)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "upsample": self.upsample}

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        if len(fw.sites) != 1:
            raise LumosError("guided_gradcam explains one layer at a time; give a single layer.")
        warn_if_no_relu(self, fw.rule_state)
        (site,) = fw.sites
        act = fw.acts[site.name]
        state = fw.rule_state
        raws = []
        for j in range(fw.k):
            score = fw.targets.scores[:, j].sum()
            state.rule = "plain"
            (g_layer,) = grad(score, [act], retain=True, what=f"layer '{site.name}'")
            a = site.to_map(act.detach())
            weights = gradcam_weights(site.to_map(g_layer))
            cam = weighted_sum(weights, a).relu()
            cam = upsample(cam, tuple(fw.x.shape[-2:]), self.upsample)
            state.rule = "guided"
            (g_in,) = grad(score, [fw.x], retain=j < fw.k - 1, what="the input")
            raws.append([g_in * cam[:, None]])
        return stack_ranks(raws)
