"""Multi-object synthetic scenes with boxes and masks (detection and segmentation ground truth).

Each scene holds 2-3 class objects (the shapes of :mod:`lumos.synthetic.data`: disc, square, triangle,
plus) that do not overlap, plus distractors, on the same textured backgrounds. Every object comes with its
class, its tight box and its pixel mask; ``semantic`` is the per-pixel class map (0 = background, class
``c`` = ``c + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lumos.synthetic.data import (
    _MAX_TILT,
    _OBJ_MAX,
    _OBJ_MIN,
    CLASS_NAMES,
    _background,
    _colour_apart,
    _distractor,
    _shape_mask,
)


@dataclass
class SyntheticScenes:
    """Scenes; index ``i`` of every tensor describes the same image, object slots padded with label -1.

    Attributes:
        images: float32 ``(n, 3, size, size)`` in ``[0, 1]``.
        labels: int64 ``(n, M)`` class of each object (-1: no object in that slot).
        boxes: float32 ``(n, M, 4)`` ``(x0, y0, x1, y1)``, ``x1, y1`` exclusive, tight around the mask.
        masks: bool ``(n, M, size, size)`` each object's visible pixels.
        semantic: int64 ``(n, size, size)``: 0 background, ``c + 1`` for class ``c``.
        class_names: name of each class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    semantic: torch.Tensor
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def objects(self, i: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Scene ``i``'s objects as ``(label, box (4,), mask (size, size))``."""
        return [(int(self.labels[i, j]), self.boxes[i, j], self.masks[i, j])
                for j in range(self.labels.shape[1]) if self.labels[i, j] >= 0]


def make_scenes(
    n: int, *, size: int = 64, seed: int = 0, min_objects: int = 2, max_objects: int = 3, max_distractors: int = 2,
    background_contrast: float = 1.0,
) -> SyntheticScenes:
    """Generate ``n`` scenes deterministically from ``seed`` (global RNGs untouched).

    Objects span 18-28% of the image side, are tilted by at most 20 degrees, lie inside the image and
    keep a gap of at least 2 pixels between their circumscribed circles, so boxes may touch but masks do
    not overlap; colours keep 0.45 (RGB) from the background under them.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, size, size, 3), dtype=np.float32)
    labels = np.full((n, max_objects), -1, dtype=np.int64)
    boxes = np.zeros((n, max_objects, 4), dtype=np.float32)
    masks = np.zeros((n, max_objects, size, size), dtype=bool)
    semantic = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        img = _background(rng, xx, yy, background_contrast)
        bg_mean = img.mean(axis=(0, 1))
        for _ in range(int(rng.integers(0, max_distractors + 1))):
            img[_distractor(rng, xx, yy)] = _colour_apart(rng, bg_mean, 0.3)
        placed: list[tuple[float, float, float]] = []
        for _ in range(int(rng.integers(min_objects, max_objects + 1))):
            for _try in range(50):
                r = rng.uniform(_OBJ_MIN, _OBJ_MAX) * size / 2
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                if all(np.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                    break
            else:
                continue
            j = len(placed)
            placed.append((cx, cy, r))
            label = int(rng.integers(len(CLASS_NAMES)))
            mask = _shape_mask(label, xx, yy, cx, cy, r, rng.uniform(-_MAX_TILT, _MAX_TILT))
            img[mask] = _colour_apart(rng, img[mask].mean(axis=0))
            ys, xs = np.nonzero(mask)
            labels[i, j], masks[i, j], semantic[i][mask] = label, mask, label + 1
            boxes[i, j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        images[i] = img
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.float32(0.03)
    np.clip(images, 0.0, 1.0, out=images)
    return SyntheticScenes(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels),
        boxes=torch.from_numpy(boxes),
        masks=torch.from_numpy(masks),
        semantic=torch.from_numpy(semantic),
    )


def energy_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy (sum of its non-negative values) inside a mask: (n, H, W) x (n, H, W) -> (n,).

    A uniform random map scores the mask's area share on average, the reference the benchmarks compare to."""
    maps = maps.float().clamp_min(0)
    total = maps.flatten(1).sum(1)
    inside = (maps * masks.to(maps.dtype)).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))
