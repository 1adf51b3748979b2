"""Localisation against ground truth (object masks or boxes): pointing game, energy-based pointing game,
relevance mass accuracy. All batched in torch; the model is not needed (the argument is accepted so every
metric shares the ``(model, images, maps, targets, masks)`` call)."""

from __future__ import annotations

from typing import Literal

import torch

from lumos.errors import LumosError
from lumos.evaluate._common import boxes_to_masks, check_masks, masks_to_boxes


def _maps(maps: object) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise LumosError(f"maps must be a tensor (B, H, W), not {type(maps).__name__}.")
    m = maps.detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise LumosError(f"maps must be (B, H, W); got {tuple(maps.shape)}.")
    return m.float()


class _Localisation:
    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: object = None, images: object = None, maps: torch.Tensor | None = None,
                 targets: object = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image score (B,) of ``maps`` (B, H, W) against ``masks`` (B, H, W) or boxes (B, 4).
        Images with an empty ground truth give NaN."""
        if maps is None or masks is None:
            raise LumosError(f"{type(self).__name__} needs maps and ground-truth masks (or boxes).")
        m = _maps(maps)
        gt = check_masks(masks, m)
        out = self.score(m, gt)
        return torch.where(gt.flatten(1).any(1), out, torch.full_like(out, float("nan")))


class PointingGame(_Localisation):
    """Pointing game (Zhang et al. 2016): a hit when the map's maximum lies within ``tolerance`` pixels
    (Euclidean) of the object. The usual tolerance is 15 px at 224 x 224.

    ``ties="first"`` (default) points at the first maximum in raster order, so a constant map points at
    the top-left corner; ``ties="any"`` counts a hit when any of the tied maxima is inside (Quantus).
    """

    def __init__(self, tolerance: float = 0.0, ties: Literal["first", "any"] = "first") -> None:
        if tolerance < 0:
            raise LumosError(f"tolerance must be >= 0 pixels, got {tolerance}.")
        if ties not in ("first", "any"):
            raise LumosError(f"ties must be 'first' or 'any', got {ties!r}.")
        self.tolerance = float(tolerance)
        self.ties = ties

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b, h, w = maps.shape
        flat = maps.flatten(1)
        if self.ties == "first":
            points = torch.zeros_like(flat, dtype=torch.bool)
            points.scatter_(1, flat.argmax(1, keepdim=True), True)
        else:
            points = flat == flat.max(1, keepdim=True).values
        if self.tolerance == 0:
            return (points & masks.flatten(1)).any(1).float()
        ys = torch.arange(h, device=maps.device, dtype=torch.float32)
        xs = torch.arange(w, device=maps.device, dtype=torch.float32)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([yy.flatten(), xx.flatten()], 1)  # (HW, 2)
        hits = torch.zeros(b, device=maps.device)
        for i in range(b):  # distances from the (few) pointed pixels to all object pixels
            p = coords[points[i]]
            q = coords[masks[i].flatten()]
            if len(q):
                hits[i] = float(torch.cdist(p, q).min() <= self.tolerance + 1e-6)
        return hits


class EnergyPointingGame(_Localisation):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the map's positive energy
    inside the object's bounding box (``use_box=True``, default, as in the paper) or its mask."""

    def __init__(self, use_box: bool = True) -> None:
        self.use_box = use_box

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        region = boxes_to_masks(masks_to_boxes(masks), tuple(masks.shape[-2:])) if self.use_box else masks
        pos = maps.clamp_min(0).flatten(1)
        total = pos.sum(1)
        inside = (pos * region.flatten(1)).sum(1)
        return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


class RelevanceMass(_Localisation):
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside the object mask divided by
    the total positive relevance. With boxes as ground truth it equals the energy pointing game."""

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pos = maps.clamp_min(0).flatten(1)
        total = pos.sum(1)
        inside = (pos * masks.flatten(1)).sum(1)
        return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
