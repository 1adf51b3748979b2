"""Turning one map into pixels: colormaps, overlays, signed and grayscale renderings."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Colormap
from PIL import Image

from lumos.render._convert import ImageLike, MapLike, get_colormap, to_numpy_map, to_pil_image

Size = tuple[int, int]  # (width, height), as in PIL


def normalize_map(map: MapLike, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale a map linearly so ``vmin -> 0`` and ``vmax -> 1``, clipping outside; float32 HxW.

    ``vmin``/``vmax`` default to the map's own min/max. A constant map (``vmax == vmin``) gives zeros.
    """
    m = to_numpy_map(map)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    if vmin is not None and vmax is not None and vmin > vmax:
        raise ValueError(f"vmin ({vmin:g}) must not be greater than vmax ({vmax:g})")
    if not hi > lo:
        return np.zeros_like(m)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _resize(m: np.ndarray, size: Size | None) -> np.ndarray:
    """Bilinear (Pillow) resize of a float map to ``size=(width, height)``."""
    if size is None or (m.shape[1], m.shape[0]) == tuple(size):
        return m
    width, height = (int(s) for s in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be a positive (width, height), got {size!r}")
    resized = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _check_percentile(p: float) -> float:
    if not 0.0 < float(p) <= 100.0:
        raise ValueError(f"clip_percentile must be in (0, 100], got {p!r}")
    return float(p)


_ROWS = 256  # rows per strip when colouring and blending: temporaries stay small for any image size


def _lut(cmap: Colormap) -> np.ndarray:
    """The colormap's N x 3 uint8 colour table (what ``cmap(i, bytes=True)`` returns for index ``i``)."""
    return np.ascontiguousarray(cmap(np.arange(cmap.N), bytes=True)[:, :3])


def _lut_colors(unit: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 colours, with matplotlib's binning (index ``floor(x * N)``, 1.0 in the last bin)."""
    n = lut.shape[0]
    idx = np.multiply(unit, np.float32(n), dtype=np.float32)  # one temporary, clipped in place: ~3x faster
    np.clip(idx, 0, n - 1, out=idx)
    # small unsigned indices and np.take: ~10x faster than fancy indexing with intp on a photo-sized map
    return np.take(lut, idx.astype(np.uint8 if n <= 256 else np.intp), axis=0)


def _apply_colormap(unit: np.ndarray, colormap: str | Colormap) -> np.ndarray:
    """Map values in [0, 1] to HxWx3 uint8 colours, exactly as ``cmap(x, bytes=True)`` does.

    Works through a uint8 colour table in strips of rows, so a large map needs ~3 bytes per pixel
    (plus the map itself), not the ~30 of matplotlib's float RGBA path.
    """
    lut = _lut(get_colormap(colormap))
    out = np.empty((*unit.shape, 3), dtype=np.uint8)
    for r in range(0, unit.shape[0], _ROWS):
        out[r:r + _ROWS] = _lut_colors(unit[r:r + _ROWS], lut)
    return out


def colorize(
    map: MapLike,
    colormap: str | Colormap = "jet",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Colour a 2-D map with a matplotlib colormap; returns HxWx3 uint8.

    The map is scaled with :func:`normalize_map` (its own min/max unless ``vmin``/``vmax`` are given);
    pass ``vmin=0, vmax=1`` to show an already-normalised map on an absolute scale.
    """
    cmap = get_colormap(colormap)  # fail on a bad name before any work
    return _apply_colormap(normalize_map(map, vmin, vmax), cmap)


def overlay(
    image: ImageLike,
    map: MapLike,
    colormap: str | Colormap = "jet",
    alpha: float = 0.5,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """Blend a colourised map over ``image``; returns an RGB image of the image's original size.

    The map is normalised (see :func:`colorize`), resized bilinearly to the image size, colourised and
    blended as ``(1 - alpha) * image + alpha * heatmap`` (alpha in steps of 1/256): ``alpha=0`` is the image,
    ``alpha=1`` the heatmap.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    lut = _lut(get_colormap(colormap))
    pil = to_pil_image(image)
    unit = _resize(normalize_map(map, vmin, vmax), pil.size)
    base = np.asarray(pil)  # uint8 H x W x 3
    out = np.empty_like(base)
    # uint16 fixed point (alpha in steps of 1/256; exact at 0, 1/2 and 1, rounded to the nearest level): ~10x
    # faster than float32; one strip of rows at a time
    add = np.uint16(round(float(alpha) * 256))
    keep = np.uint16(256) - add
    for r in range(0, base.shape[0], _ROWS):
        blended = base[r:r + _ROWS] * keep + _lut_colors(unit[r:r + _ROWS], lut) * add + np.uint16(128)
        out[r:r + _ROWS] = blended >> 8
    return Image.fromarray(out)


def signed_map_image(
    map: MapLike,
    colormap: str | Colormap = "bwr",
    *,
    vmax: float | None = None,
    clip_percentile: float | None = None,
    size: Size | None = None,
) -> Image.Image:
    """Render a signed attribution with a diverging colormap, symmetric around zero.

    Zero maps to the colormap's centre, ``+vmax`` to its top end and ``-vmax`` to its bottom end;
    ``vmax`` defaults to ``max(|map|)``, or to that percentile of ``|map|`` if ``clip_percentile`` is
    given (e.g. 99). ``size=(width, height)`` resizes the map bilinearly first.
    """
    cmap = get_colormap(colormap)
    m = _resize(to_numpy_map(map), size)
    if vmax is None and clip_percentile is not None:
        vmax = float(np.percentile(np.abs(m), _check_percentile(clip_percentile)))
    scale = float(np.abs(m).max()) if vmax is None else float(vmax)
    if scale < 0:
        raise ValueError(f"vmax must be non-negative, got {vmax!r}")
    unit = np.full_like(m, 0.5) if scale == 0 else 0.5 + 0.5 * np.clip(m / scale, -1.0, 1.0)
    return Image.fromarray(_apply_colormap(unit, cmap))


def grayscale_map_image(
    map: MapLike,
    *,
    absolute: bool = False,
    clip_percentile: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    size: Size | None = None,
) -> Image.Image:
    """Render a saliency map in grayscale (white = most salient), mode ``"L"``.

    ``absolute=True`` takes ``|map|`` first (gradient saliency, Simonyan et al.); ``clip_percentile``
    (e.g. 99, as in SmoothGrad) caps ``vmax`` at that percentile so a few outliers do not wash out the
    rest. Otherwise scaled by min/max (or ``vmin``/``vmax``). ``size=(width, height)`` resizes first.
    """
    m = to_numpy_map(map)
    if absolute:
        m = np.abs(m)
    if clip_percentile is not None and vmax is None:
        vmax = float(np.percentile(m, _check_percentile(clip_percentile)))
    unit = _resize(normalize_map(m, vmin, vmax), size)
    return Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8))


def draw_map(
    image: ImageLike,
    map: MapLike,
    kind: str = "layer",
    colormap: str | Colormap = "jet",
    alpha: float = 0.5,
    size: tuple[int, int] | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """How lumos draws a map everywhere (CLI, app, tracker), by what the map is (``Explanation.kind``).

    ``"layer"`` and ``"region"`` maps (CAMs, occlusion, RISE): a heat overlay on the image. ``"pixel"``
    attributions: saliency on its own, grayscale (signed maps red/blue), since their detail hides under a
    photo. ``size`` (width, height) defaults to the image's size.

    Each map is scaled on its own (min to max; symmetric for signed maps) unless ``vmin``/``vmax`` fix the
    colour range: pass the values of a :class:`~lumos.render.scales.MapScale` with ``vmin=0, vmax=1`` (signed
    pixel maps: ``vmax=1``) to draw maps on a shared scale.
    """
    pil = to_pil_image(image)
    size = tuple(size or pil.size)  # type: ignore[assignment]
    if kind == "pixel":
        if float(np.min(to_numpy_map(map))) < 0:
            return signed_map_image(map, size=size, vmax=vmax).convert("RGB")
        return grayscale_map_image(map, size=size, vmin=vmin, vmax=vmax).convert("RGB")
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return overlay(pil, map, colormap, alpha, vmin=vmin, vmax=vmax)
