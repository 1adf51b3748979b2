"""Conversions at the rendering boundary: maps and images to numpy/PIL, colormap lookup, saving."""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

MapLike = Any  # torch.Tensor | np.ndarray (2-D, or with leading singleton dims)
ImageLike = Any  # PIL.Image.Image | np.ndarray (HxWx3 uint8 or float in [0, 1]) | torch.Tensor

_SUGGESTED_COLORMAPS = ("jet", "viridis", "magma", "inferno", "turbo", "gray", "bwr", "seismic", "coolwarm")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x)


def to_numpy_map(map: MapLike) -> np.ndarray:
    """Return ``map`` (tensor on any device, or array) as a 2-D float32 numpy array.

    Leading singleton dimensions (``1xHxW``, ``1x1xHxW``) are dropped. A batch of several maps is an
    error: pass one map, e.g. ``maps[0]``. NaN becomes 0 and +/-inf the largest/smallest finite value,
    with a warning.
    """
    arr = _as_numpy(map)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"map must be a torch tensor or numeric array, got {type(map).__name__}")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(
            f"map must be 2-D (HxW), got shape {tuple(arr.shape)}; pass one map at a time, e.g. maps[0]"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"map is empty (shape {tuple(arr.shape)})")
    arr = np.array(arr, dtype=np.float32)  # always a fresh, contiguous copy
    finite = np.isfinite(arr)
    if not finite.all():
        warnings.warn("map contains NaN or inf; NaN is shown as 0, inf as the finite extreme", stacklevel=2)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    return arr


def get_colormap(colormap: str | Colormap) -> Colormap:
    """Look up a matplotlib colormap by name (or pass a ``Colormap`` through)."""
    if isinstance(colormap, Colormap):
        return colormap
    try:
        return matplotlib.colormaps[colormap]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(colormap), list(matplotlib.colormaps), n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"unknown colormap {colormap!r}; {hint}valid names include "
            f"{', '.join(_SUGGESTED_COLORMAPS)} (any name in matplotlib.colormaps)"
        ) from None


def to_pil_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts PIL images (any mode), HxWx3 / HxWx4 / HxW arrays of uint8 or of floats in [0, 1], and
    torch tensors shaped like those or channels-first (3xHxW, 1x3xHxW).
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    is_tensor = isinstance(image, torch.Tensor)
    arr = _as_numpy(image)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if is_tensor and arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or 0 in arr.shape:
        raise ValueError(
            f"image must be HxWx3 (or HxW, or a PIL image), got array of shape {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8:
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if np.issubdtype(arr.dtype, np.integer):
            if lo < 0 or hi > 255:
                raise ValueError(f"integer image values must be in [0, 255], got [{lo:g}, {hi:g}]")
            arr = arr.astype(np.uint8)
        else:
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"float image values must be in [0, 1], got [{lo:g}, {hi:g}]; "
                    "undo the model's normalisation first or pass a uint8 image"
                )
            arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr))


def save_png(image: ImageLike | Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Save a PIL image, image array or matplotlib figure as PNG, creating parent dirs; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, Figure):
        image.savefig(path, format="png", dpi=dpi)
    else:
        to_pil_image(image).save(path, format="PNG")
    return path
