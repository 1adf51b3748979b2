"""The result object, and the explicit post-processing that turns raw maps into ``maps``.

Layer maps (CAMs) are ReLU'd, upsampled and min-max normalised; pixel attributions have their channels
reduced and a percentile clip. Both live here, so every consumer finishes maps the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lumos.errors import LumosError

Normalize = Literal["minmax"] | None
Kind = Literal["layer", "pixel", "region"]
Reduce = Literal["absmax", "sum", "l2"]
PixelNormalize = Literal["percentile", "minmax"] | None
UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "area")
REDUCTIONS = ("absmax", "sum", "l2")


@dataclass
class Explanation:
    """Maps for a batch, with everything needed to read, compare and reproduce them.

    ``maps`` is (N, H, W) float32 at input resolution on the input's device, N = images x maps per image
    (image-major; ``image_index`` says which image each map belongs to). ``kind`` says what the maps are:
    ``"layer"`` maps (CAMs: ``raw`` is (N, h, w) at layer resolution before ReLU/normalisation, a tuple of
    such tensors when several layers are fused) or ``"pixel"`` attributions (``raw`` is the signed
    (N, C, H, W) attribution in input space). ``targets`` holds class indices (None for callable
    targets), ``scores`` the explained output value, ``probs`` its probability. ``output`` is the
    selected model output of the clean forward (B, ...), detached, so predictions need no other forward;
    ``probs_kind`` how its probabilities are formed (``lumos.targets.to_probabilities``).
    """

    maps: torch.Tensor
    raw: torch.Tensor | tuple[torch.Tensor, ...]
    targets: torch.Tensor | None
    scores: torch.Tensor
    probs: torch.Tensor | None
    layer: str | tuple[str, ...] | None
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    image_index: torch.Tensor | None = None
    layer_auto: bool = False
    kind: Kind = "layer"
    output: torch.Tensor | None = None
    probs_kind: str = "none"

    def __len__(self) -> int:
        return self.maps.shape[0]

    def cpu(self) -> Explanation:
        """A copy with every tensor moved to the CPU."""
        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().cpu()
            if isinstance(v, tuple):
                return tuple(move(t) for t in v)
            return v

        return Explanation(**{k: move(getattr(self, k)) for k in self.__dataclass_fields__})


def normalize_maps(maps: torch.Tensor, mode: Normalize) -> torch.Tensor:
    """Scale each map to [0, 1] (``"minmax"``) or leave it (``None``). A constant map becomes zeros."""
    if mode is None:
        return maps
    if mode != "minmax":
        raise LumosError(f"normalize={mode!r} is not known; use 'minmax' or None.")
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (N, h, w) maps to ``size`` with an explicit interpolation mode."""
    if mode not in UPSAMPLE_MODES:
        raise LumosError(f"upsample={mode!r} is not known; use one of {', '.join(UPSAMPLE_MODES)}.")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None], size=size, mode=mode, **kwargs)[:, 0]


def upsample_minmax(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Upsample (N, h, w) maps and scale each to [0, 1]; a map that is the same at every position becomes
    zeros, as :func:`normalize_maps` makes a constant map (interpolating it adds rounding noise, up to a
    few ulps, that min-max scaling would stretch to [0, 1])."""
    flat = maps.flatten(1)
    constant = (flat.amax(1) == flat.amin(1)).view(-1, 1, 1)
    return normalize_maps(upsample(maps, size, mode), "minmax").masked_fill(constant, 0.0)


def finish_maps(
    raws: list[torch.Tensor], size: tuple[int, int], relu: bool, normalize: Normalize, mode: str
) -> torch.Tensor:
    """ReLU, upsample and normalise raw layer maps; several layers are averaged after normalising."""
    maps = []
    for raw in raws:
        m = raw.float().relu() if relu else raw.float()
        maps.append(upsample(m, size, mode) if normalize is None else upsample_minmax(m, size, mode))
    fused = maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
    return normalize_maps(fused, normalize) if len(maps) > 1 else fused


# -- pixel attributions ----------------------------------------------------------------------------------
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


def finish_pixel_maps(raw: torch.Tensor, reduce: Reduce, normalize: PixelNormalize, clip: float) -> torch.Tensor:
    """``maps`` from signed attributions (N, C, H, W): channel reduction, then normalisation."""
    return normalize_pixel_maps(reduce_channels(raw, reduce), normalize, clip).float()
