"""The result object, and the explicit post-processing that turns raw layer maps into ``maps``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lumos.errors import LumosError

Normalize = Literal["minmax"] | None
UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "area")


@dataclass
class Explanation:
    """Maps for a batch, with everything needed to read, compare and reproduce them.

    ``maps`` is (N, H, W) float32 at input resolution on the input's device, N = images x maps per image
    (image-major; ``image_index`` says which image each map belongs to). ``raw`` is (N, h, w) at layer
    resolution before ReLU/normalisation (a tuple of such tensors, one per layer, when several layers
    are fused). ``targets`` holds class indices (None for callable targets), ``scores`` the explained
    output value, ``probs`` its softmax (or sigmoid) probability.
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


def finish_maps(
    raws: list[torch.Tensor], size: tuple[int, int], relu: bool, normalize: Normalize, mode: str
) -> torch.Tensor:
    """ReLU, upsample and normalise raw layer maps; several layers are averaged after normalising."""
    maps = []
    for raw in raws:
        m = raw.float().relu() if relu else raw.float()
        maps.append(normalize_maps(upsample(m, size, mode), normalize))
    fused = maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
    return normalize_maps(fused, normalize) if len(maps) > 1 else fused
