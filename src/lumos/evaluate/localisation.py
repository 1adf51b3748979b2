"""Localisation against ground truth (object masks or boxes): pointing game, energy-based pointing game,
relevance mass accuracy. All batched in torch; the model is not needed (the argument is accepted so every
metric shares the ``(model, images, maps, targets, masks)`` call).

With ``images`` given, a map of another size (a CAM at its layer's resolution) is first upsampled bilinearly to the
images' size, so masks and boxes are in image pixels, as is the pointing game's tolerance. Without ``images`` the
maps are scored as they are: masks must have their size and boxes are read in map pixels.

A map that is undefined for a metric gives NaN, not a number: a constant map (all zero, say) has no maximum to
point with and no relevance that favours one place, and a map with no positive value has no relevance to share
out."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lumos.errors import LumosError
from lumos.evaluate._common import boxes_to_masks, check_images, check_maps, check_masks, constant_maps, masks_to_boxes


def _maps(maps: object) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise LumosError(f"maps must be a tensor (B, H, W), not {type(maps).__name__}.")
    m = maps.detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise LumosError(f"maps must be (B, H, W); got {tuple(maps.shape)}.")
    if not bool(m.isfinite().all()):
        raise LumosError("maps must be finite; got NaN or infinite values.")
    return m.float()


class _Localisation:
    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: object = None, images: object = None, maps: torch.Tensor | None = None,
                 targets: object = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image score (B,) of ``maps`` (B, H, W) against ``masks`` (B, H, W) or boxes (B, 4) ``x0, y0, x1, y1``
        (``x1, y1`` exclusive), both at the images' size when ``images`` are given (maps upsampled to it), else at
        the maps'. Images with an empty ground truth, or whose map is undefined for the metric, give NaN."""
        if maps is None or masks is None:
            raise LumosError(f"{type(self).__name__} needs maps and ground-truth masks (or boxes).")
        m = _maps(maps)
        if isinstance(images, torch.Tensor):
            m = check_maps(m, check_images(images))
        gt = check_masks(masks, m)
        out = self.score(m, gt)
        ok = gt.flatten(1).any(1) & self.defined(m)
        return torch.where(ok, out, torch.full_like(out, float("nan")))

    def defined(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,) False where the metric has no value for the map."""
        return ~constant_maps(maps)


def _within(masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B, H, W) True at the pixels within ``tolerance`` pixels (Euclidean, between pixel centres) of a pixel of
    ``masks``: the masks dilated by a disk of that radius (offsets beyond the image's size never matter)."""
    if tolerance == 0:
        return masks
    h, w = masks.shape[-2:]
    r = int(tolerance + 1e-6)
    ry, rx = min(r, h - 1), min(r, w - 1)
    dy = torch.arange(-ry, ry + 1, device=masks.device, dtype=torch.float32)
    dx = torch.arange(-rx, rx + 1, device=masks.device, dtype=torch.float32)
    disk = (dy[:, None] ** 2 + dx[None, :] ** 2 <= (tolerance + 1e-6) ** 2).float()
    hit = F.conv2d(masks[:, None].float(), disk[None, None], padding=(ry, rx))[:, 0]
    return hit > 0.5


class PointingGame(_Localisation):
    """Pointing game (Zhang et al. 2016): a hit when the map's maximum lies within ``tolerance`` pixels
    (Euclidean) of the object. The usual tolerance is 15 px at 224 x 224.

    Several pixels may share the maximum (a plateau, a CAM cell upsampled at the border). ``ties="mean"``
    (default) scores the share of the tied maxima that hit: the expected score of pointing at one of them drawn
    uniformly, without a random draw, and 0 or 1 when the maximum is unique. ``ties="first"`` points at the first
    maximum in raster order (the rule before, which favours objects at the top left); ``ties="any"`` counts a hit
    when any of the tied maxima is inside (Quantus). A constant map (all zero, say) points nowhere: NaN, not the
    top-left corner (``"first"``), a sure hit (``"any"``) or the object's area share (``"mean"``).
    """

    def __init__(self, tolerance: float = 0.0, ties: Literal["mean", "first", "any"] = "mean") -> None:
        if tolerance < 0:
            raise LumosError(f"tolerance must be >= 0 pixels, got {tolerance}.")
        if ties not in ("mean", "first", "any"):
            raise LumosError(f"ties must be 'mean', 'first' or 'any', got {ties!r}.")
        self.tolerance = float(tolerance)
        self.ties = ties

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        if self.ties == "first":
            points = torch.zeros_like(flat, dtype=torch.bool)
            points.scatter_(1, flat.argmax(1, keepdim=True), True)
        else:
            points = flat == flat.max(1, keepdim=True).values
        hits = (points & _within(masks, self.tolerance).flatten(1)).sum(1).float()
        if self.ties == "mean":
            return hits / points.sum(1).float()
        return (hits > 0).float()


class RelevanceMass(_Localisation):
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside the object mask divided by
    the total positive relevance. With boxes as ground truth it equals the energy pointing game. NaN for a map with
    no positive value or a constant one (whose share is just the mask's area share)."""

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pos = maps.clamp_min(0).flatten(1)
        total = pos.sum(1)
        inside = (pos * masks.flatten(1)).sum(1)
        return inside / total.clamp_min(torch.finfo(total.dtype).tiny)

    def defined(self, maps: torch.Tensor) -> torch.Tensor:
        return ~constant_maps(maps) & (maps.flatten(1) > 0).any(1)


class EnergyPointingGame(RelevanceMass):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the map's positive energy
    inside the object's bounding box (``use_box=True``, default, as in the paper) or its mask (then it is
    :class:`RelevanceMass`). NaN for a map with no positive value or a constant one (whose share is just the box's
    area share)."""

    def __init__(self, use_box: bool = True) -> None:
        self.use_box = use_box

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        region = boxes_to_masks(masks_to_boxes(masks), tuple(masks.shape[-2:])) if self.use_box else masks
        return super().score(maps, region)
