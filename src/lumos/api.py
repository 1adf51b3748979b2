"""One-call entry points: ``explain``, ``methods``, ``feature_maps``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lumos.capture import Capture
from lumos.engine import check_input, check_spatial, guard
from lumos.errors import LumosError, positive_int
from lumos.explanation import Explanation
from lumos.layers import LayerSpec, LayoutSpec, resolve_sites
from lumos.methods import method_class, methods
from lumos.targets import TargetSpec

__all__ = ["FeatureMaps", "explain", "feature_maps", "method_class", "methods"]


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


def feature_maps(model: nn.Module, x: torch.Tensor, layer: LayerSpec = "auto", n: int = 16,
                 layout: LayoutSpec = None) -> FeatureMaps:
    """Record a layer's feature maps for ``x`` and rank its channels by mean activation.

    A layer without spatial extent (1 x 1, e.g. global pooling) is a one-line :class:`LumosError`: it has
    one value per channel, nothing to draw as a map."""
    n = positive_int("n", n)
    x = check_input(x)
    with guard(model), torch.no_grad():
        sites = resolve_sites(model, layer, x, layout)
        if len(sites) != 1:
            raise LumosError("feature_maps shows one layer at a time.")
        site = sites[0].for_input(x.shape)
        with Capture({site.name: site.module}, grad=False) as cap:
            model(x)
    if site.name not in cap.activations:
        raise LumosError(f"Layer '{site.name}' did not run in the forward pass; choose another layer.")
    acts = site.to_map(cap.activations[site.name])
    check_spatial(site.name, acts)
    top = acts.flatten(2).mean(2).topk(min(n, acts.shape[1]), dim=1).indices
    return FeatureMaps(acts, top, site.name)
