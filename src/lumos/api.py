"""One-call entry points: ``explain``, ``methods``, ``feature_maps``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lumos.capture import Capture, model_guard
from lumos.errors import LumosError, close_matches
from lumos.explanation import Explanation
from lumos.layers import LayerSpec, resolve_layers
from lumos.methods import REGISTRY
from lumos.methods.base import check_input
from lumos.targets import TargetSpec

ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam", "score-cam": "scorecam"}


def methods() -> list[str]:
    """Names accepted by ``explain(method=...)``."""
    return sorted(REGISTRY)


def method_class(name: str) -> type:
    """The method class registered under ``name`` (case-insensitive, a few aliases)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise LumosError(f"Unknown method '{name}'.{close_matches(name, REGISTRY)} Known: {', '.join(methods())}.")
    return REGISTRY[key]


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradcam",
    target: TargetSpec = None,
    layer: LayerSpec = "auto",
    **kwargs: Any,
) -> Explanation:
    """Explain ``model`` on the batch ``x`` with one method; see the method classes for ``kwargs``.

    >>> ex = lumos.explain(model, x, method="gradcam", target="tabby cat", labels=labels)
    >>> ex.maps.shape  # (B, H, W), in [0, 1]
    """
    return method_class(method)(model, layer, **kwargs)(x, target)


@dataclass
class FeatureMaps:
    """Activations of one layer (B, C, h, w) and, per image, the ``n`` most active channels (B, n)."""

    activations: torch.Tensor
    top_channels: torch.Tensor
    layer: str


def feature_maps(model: nn.Module, x: torch.Tensor, layer: LayerSpec = "auto", n: int = 16) -> FeatureMaps:
    """Record a layer's feature maps for ``x`` and rank its channels by mean activation."""
    x = check_input(x)
    with model_guard(model), torch.no_grad():
        layers = resolve_layers(model, layer, x)
        if len(layers) != 1:
            raise LumosError("feature_maps shows one layer at a time.")
        with Capture(layers, grad=False) as cap:
            model(x)
    (name, acts), = cap.activations.items()
    if acts.ndim != 4:
        raise LumosError(f"Layer '{name}' outputs shape {tuple(acts.shape)}, not a B x C x H x W map.")
    top = acts.mean((2, 3)).topk(min(n, acts.shape[1]), dim=1).indices
    return FeatureMaps(acts, top, name)
