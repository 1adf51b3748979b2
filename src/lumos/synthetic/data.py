"""Procedurally generated images with known object locations (a ground-truth benchmark).

Each image holds exactly one *class object* (a disc, square, triangle or plus sign, at a random
position, size, small tilt and colour) on a textured background, together with 1-3 *distractors*
(thin lines, hollow rings, small blobs) that belong to no class. The label is decidable only from
the class object, so a model that classifies well has to look at it, and an explanation of that
model should point at the object's pixels, which are returned as ``masks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

CLASS_NAMES: list[str] = ["disc", "square", "triangle", "plus"]

# Object extent (diameter of the circumscribed circle) as a fraction of the image side.
_OBJ_MIN, _OBJ_MAX = 0.18, 0.28
# Objects are tilted by at most this angle (radians), so shapes stay recognisably upright.
_MAX_TILT = np.pi / 9


@dataclass
class SyntheticData:
    """A synthetic data set; index ``i`` of every tensor describes the same image.

    Attributes:
        images: float32, ``(n, 3, size, size)``, values in ``[0, 1]``.
        labels: int64, ``(n,)``, index into ``class_names``.
        masks: bool, ``(n, size, size)``, the class object's pixels.
        boxes: int64, ``(n, 4)``, ``(x0, y0, x1, y1)`` with ``x1, y1`` exclusive, so that
            ``masks[i, y0:y1, x0:x1]`` holds every object pixel.
        class_names: name of each label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _interp_matrix(size: int, k: int) -> np.ndarray:
    """``(size, k)`` matrix that linearly upsamples a length-``k`` signal to ``size`` samples."""
    pos = np.linspace(0.0, k - 1.0, size)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    frac = pos - lo
    m = np.zeros((size, k))
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, max_contrast: float = 1.0) -> np.ndarray:
    """A ``(size, size, 3)`` texture: smooth noise, stripes or a gradient between random colours."""
    size = xx.shape[0]
    kind = rng.integers(3)
    if kind == 0:  # smooth noise
        k = int(rng.integers(3, 9))
        m = _interp_matrix(size, k)
        t = m @ rng.random((k, k)) @ m.T
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == 1:  # stripes at a random angle and frequency
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
    else:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-6)
    c0, c1 = rng.random(3), rng.random(3)
    contrast = max_contrast * rng.uniform(0.3, 1.0)
    c1 = c0 + contrast * (c1 - c0)
    return c0 + t[..., None] * (c1 - c0)


def _shape_mask(label: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Boolean mask of class shape ``label`` with circumradius ``r`` centred at ``(cx, cy)``."""
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(rot), np.sin(rot)
    u = (c * dx + s * dy) / r
    v = (-s * dx + c * dy) / r
    if label == 0:  # disc
        return u * u + v * v <= 1.0
    if label == 1:  # square (circumradius r -> half side r / sqrt 2)
        return np.maximum(np.abs(u), np.abs(v)) <= 1 / np.sqrt(2)
    if label == 2:  # equilateral triangle inscribed in the unit circle
        out = np.ones_like(u, dtype=bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            out &= -(u * np.cos(a) + v * np.sin(a)) <= 0.5
        return out
    if label == 3:  # plus sign
        arm = 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1))
    raise ValueError(f"unknown class label {label}; expected 0..{len(CLASS_NAMES) - 1}")


def _distractor(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Mask of a non-class shape: a thin line segment, a hollow ring or a small blob."""
    size = xx.shape[0]
    kind = rng.integers(3)
    if kind == 0:  # thin line segment
        x0, y0 = rng.uniform(0, size, 2)
        theta = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.2, 0.5) * size
        dx, dy = np.cos(theta), np.sin(theta)
        t = np.clip((xx - x0) * dx + (yy - y0) * dy, 0, length)
        dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        return dist <= rng.uniform(0.6, 1.2)
    if kind == 1:  # hollow ring, about as large as a class object
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(0.06, 0.12) * size
        return np.abs(np.hypot(xx - cx, yy - cy) - rad) <= rng.uniform(0.6, 1.1)
    # small elongated blob (an ellipse far smaller than any class object)
    cx, cy = rng.uniform(0, size, 2)
    a, b = rng.uniform(1.0, 2.5), rng.uniform(1.0, 4.0)
    rot = rng.uniform(0, np.pi)
    c, s = np.cos(rot), np.sin(rot)
    u = (c * (xx - cx) + s * (yy - cy)) / a
    v = (-s * (xx - cx) + c * (yy - cy)) / b
    return u * u + v * v <= 1.0


def _colour_apart(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 0.45) -> np.ndarray:
    """A random colour at least ``min_dist`` (Euclidean, RGB) from ``ref``, or the farthest of 16 tries."""
    cands = rng.random((16, 3))
    dist = np.linalg.norm(cands - ref, axis=1)
    ok = np.flatnonzero(dist >= min_dist)
    return cands[ok[0]] if ok.size else cands[int(np.argmax(dist))]


def make_dataset(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    max_distractors: int = 3,
    background_contrast: float = 1.0,
) -> SyntheticData:
    """Generate ``n`` images deterministically from ``seed`` (the global RNGs are not touched).

    Labels are balanced (each class appears ``n // 4`` or ``n // 4 + 1`` times) in a shuffled order.
    Objects span 18-28% of the image side, are tilted by at most 20 degrees, lie fully inside the
    image, and are drawn last, so the mask is exactly the object's visible pixels.

    ``max_distractors`` (each image gets ``min(1, max)``..``max`` of them) and
    ``background_contrast`` (scales the texture's colour contrast) only exist to make easier
    variants, e.g. for a training curriculum; the defaults define the benchmark.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    k = len(CLASS_NAMES)
    labels = rng.permutation(np.arange(n) % k)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        img = _background(rng, xx, yy, background_contrast)
        bg_mean = img.mean(axis=(0, 1))
        for _ in range(int(rng.integers(min(1, max_distractors), max_distractors + 1))):
            img[_distractor(rng, xx, yy)] = _colour_apart(rng, bg_mean, 0.3)
        r = rng.uniform(_OBJ_MIN, _OBJ_MAX) * size / 2
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        mask = _shape_mask(int(labels[i]), xx, yy, cx, cy, r, rng.uniform(-_MAX_TILT, _MAX_TILT))
        img[mask] = _colour_apart(rng, img[mask].mean(axis=0))
        images[i] = img
        masks[i] = mask
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.float32(0.03)
    np.clip(images, 0.0, 1.0, out=images)
    return SyntheticData(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks),
        boxes=torch.from_numpy(boxes),
    )
