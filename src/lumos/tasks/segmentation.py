"""Segmentation targets: a class's score over a region of a (B, classes, H, W) output.

The region is the pixels predicted as the class (taken once, on the clean output, and kept for every
perturbed copy), a user mask, or a box. Models returning torchvision's ``{"out": ..., "aux": ...}`` are
explained with ``output="out"`` or wrapped in :class:`SegmentationModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lumos.targets import SegmentationTarget as _CallableSegmentation
from lumos.targets import Target, TargetError, Targets


def box_mask(size: tuple[int, int], box: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Boolean (H, W) mask of the pixels whose centres lie in ``box`` = ``(x0, y0, x1, y1)``."""
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


class SegmentationModel(nn.Module):
    """A segmentation model whose output is a dict (torchvision's ``{"out": ...}``) as one returning the
    (B, classes, H, W) tensor under ``key``."""

    def __init__(self, model: nn.Module, key: str = "out") -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]


class SegmentationTarget(_CallableSegmentation):
    """Score = a class's logits over a region, summed (``reduce="sum"``) or averaged (``"mean"``).

    Args:
        category: the class index.
        mask: (H, W) or (B, H, W) region (resized to the output by nearest neighbour if needed).
        box: ``(x0, y0, x1, y1)`` in output pixels instead of a mask.
        reduce: ``"sum"`` or ``"mean"`` over the region.

    With neither, the region is the pixels predicted as ``category`` on the clean output (fixed from then
    on, so perturbed copies are scored on the same pixels). An empty region is a one-line error.
    """

    def __init__(self, category: int, mask: torch.Tensor | None = None, *,
                 box: Sequence[float] | torch.Tensor | None = None, reduce: str = "sum") -> None:
        if mask is not None and box is not None:
            raise TargetError("Give mask= or box=, not both.")
        if reduce not in ("sum", "mean"):
            raise TargetError(f"reduce={reduce!r}: use 'sum' or 'mean'.")
        super().__init__(int(category), None if mask is None else torch.as_tensor(mask).bool())
        self.box = box
        self.reduce = reduce

    def region(self, output: torch.Tensor) -> torch.Tensor:
        """The (B, H, W) boolean region on this output."""
        if output.ndim != 4:
            raise TargetError(
                f"A segmentation target needs a (batch, classes, H, W) output; got {tuple(output.shape)}.")
        b, c, h, w = output.shape
        if not 0 <= self.category < c:
            raise TargetError(f"Class {self.category} is out of range: the model segments {c} classes.")
        if self.box is not None:
            return box_mask((h, w), self.box).to(output.device).expand(b, h, w)
        if self.mask is None:
            return output.detach().argmax(1) == self.category
        mask = self.mask.to(output.device)
        mask = mask[None] if mask.ndim == 2 else mask
        if tuple(mask.shape[-2:]) != (h, w):
            mask = nn.functional.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool()
        return mask.expand(b, h, w) if mask.shape[0] == 1 else mask

    def fixed(self, output: torch.Tensor) -> SegmentationTarget:
        """The target with its region taken from the clean ``output`` (one (B, H, W) mask)."""
        region = self.region(output)
        empty = (~region.flatten(1).any(1)).nonzero()
        if empty.numel():
            raise TargetError(f"Image {int(empty[0])} has no pixel of class {self.category} in the region; "
                              "nothing to explain there (give mask= or box=).")
        return SegmentationTarget(self.category, region, reduce=self.reduce)

    def resolve_targets(self, output: torch.Tensor) -> Targets:
        """Fix the region on the clean output (the hook ``lumos.targets.resolve_targets`` calls)."""
        target = Target(None, self.fixed(output), "none")
        return Targets(target.scores(output), None, None, target)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        region = self.region(output).to(output.dtype)
        total = (output[:, self.category] * region).flatten(1).sum(1)
        return total if self.reduce == "sum" else total / region.flatten(1).sum(1).clamp_min(1)

    def select(self, index: torch.Tensor) -> SegmentationTarget:
        if self.mask is None or self.mask.ndim < 3:
            return self
        return SegmentationTarget(self.category, self.mask[index.to(self.mask.device)], reduce=self.reduce)
