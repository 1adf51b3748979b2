"""Colour scales for pictures: which value gets the top colour, so maps that are compared are drawn comparably.

Methods finish every map on its own (``Explanation.maps`` is min-max or percentile scaled per map), so a
class the model gives 0.00 probability can look as red as the top class. :func:`map_scales` rebuilds each
map in the method's own units from ``Explanation.raw`` and puts the maps that are compared on one scale:

- ``"shared"`` (the default): the maps of one image and one method (all its classes, plus the top class's map
  when a caller passes it as ``reference``) share one zero-based scale whose top is the largest peak among
  them. A weak map looks weak; the caption can say how weak (:attr:`MapScale.relative`).
- ``"per-map"``: each map from its own minimum to its own peak (the look of ``Explanation.maps``); colours
  are not comparable between maps.
- ``"none"``: ``Explanation.maps`` as the method finished them, on the fixed range 0..1 (-1..1 when signed).

Works on anything shaped like an :class:`~lumos.explanation.Explanation` (``maps``, ``raw``, ``kind``,
``params``, ``targets``, ``image_index``); numpy, torch and ``lumos.explanation`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.colors import Colormap

from lumos.explanation import reduce_channels, upper_quantile, upsample

SCALES = ("shared", "per-map", "none")
DEFAULT_SCALE = "shared"
_ALIASES = {"shared": "shared", "per-map": "per-map", "per_map": "per-map", "permap": "per-map", "map": "per-map",
            "none": "none", "off": "none"}


def check_scale(scale: str) -> str:
    """The canonical name of a scale choice (``per_map`` is ``per-map``); a one-line ``ValueError`` otherwise."""
    key = str(scale).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"scale={scale!r} is not known; use one of {', '.join(SCALES)}.")
    return _ALIASES[key]


@dataclass(frozen=True)
class MapScale:
    """How one map is drawn.

    ``values`` (H x W float32, the map's resolution) are what the colours show: 0..1, or -1..1 for signed
    pixel attributions (``signed``). ``peak`` is the map's own peak in the method's units (the largest value
    of a CAM or region map after its ReLU; for pixel attributions the value their percentile clip maps to
    1). ``top`` is the value drawn with the top colour: the shared peak (``"shared"``), the map's own peak
    (``"per-map"``) or NaN (``"none"``). ``top_class`` is the class whose map set ``top`` (shared scale).
    ``same_as`` is a better-ranked class of the image (or the reference's top class) whose map is the same
    map: the method ignores the class.
    """

    values: np.ndarray
    peak: float
    top: float
    mode: str
    kind: str = "layer"
    signed: bool = False
    top_class: int | None = None
    same_as: int | None = None
    note: str | None = None

    @property
    def relative(self) -> float:
        """``peak / top``: 1 for the map that sets the scale, near 0 for a map that is weak beside it."""
        if not (math.isfinite(self.top) and self.top > 0):
            return float("nan")
        return self.peak / self.top


@dataclass(frozen=True)
class ColorScale:
    """A colour bar: ``colormap`` from ``vmin`` to ``vmax``, with a label saying what the colours mean."""

    colormap: str | Colormap
    vmin: float
    vmax: float
    label: str
    ticks: tuple[float, ...] | None = None


def _params(ex: Any) -> dict[str, Any]:
    params = dict(getattr(ex, "params", None) or {})
    base = params.get("base_params")
    if isinstance(base, dict) and ex.kind != "pixel":  # smoothgrad over a CAM: the CAM finishes the maps
        params = {**params, **base}
    return params


def _units(ex: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U, peaks): maps in the method's own units at the maps' resolution, and each map's peak.

    None when the raw maps have no common unit (several fused layers, each min-max scaled before averaging).
    """
    raw = ex.raw
    if isinstance(raw, tuple | list):
        if len(raw) != 1:
            return None
        raw = raw[0]
    if not isinstance(raw, torch.Tensor):
        return None
    raw = raw.detach().float().cpu()
    size = tuple(ex.maps.shape[-2:])
    params = _params(ex)
    if ex.kind == "pixel":
        u = reduce_channels(raw, params.get("reduce", "absmax")) if raw.ndim == 4 else raw
        mag = u.flatten(1).abs()
        if params.get("normalize", "percentile") == "percentile" and mag.shape[1] > 1:
            peaks = upper_quantile(mag, float(params.get("clip", 99.5)) / 100.0)[:, 0]
            peaks = torch.where(peaks > 0, peaks, mag.amax(1))
        else:
            peaks = mag.amax(1)
        return u, peaks
    if raw.ndim != 3:
        return None
    u = raw.relu() if params.get("relu", True) else raw
    u = upsample(u, size, params.get("upsample", "bilinear") if ex.kind == "layer" else "bilinear")
    return u, u.flatten(1).amax(1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(max(a.abs().max(), b.abs().max()))
    return scale == 0.0 or bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def _index(ex: Any) -> list[int]:
    idx = getattr(ex, "image_index", None)
    return list(range(len(ex.maps))) if idx is None else [int(i) for i in idx]


def _classes(ex: Any) -> list[int | None]:
    t = getattr(ex, "targets", None)
    return [None] * len(ex.maps) if t is None else [int(c) for c in t]


def map_scales(ex: Any, scale: str = DEFAULT_SCALE, reference: Any = None) -> list[MapScale]:
    """One :class:`MapScale` per map of ``ex``, on the chosen ``scale`` (see the module docstring).

    ``reference`` is an explanation of the same images by the same method for their top class (one map per
    image, ``image_index`` matching ``ex``'s): with ``"shared"`` its peaks join each image's scale, so a map
    of an explicitly chosen class is drawn on the top class's scale. Maps of one image that equal one of its
    better-ranked class maps (or the reference's) are marked ``same_as``: the method ignores the class.
    """
    mode = check_scale(scale)
    n = len(ex.maps)
    images, classes = _index(ex), _classes(ex)
    finished = ex.maps.detach().float().cpu()
    units = _units(ex)
    ref_units = _units(reference) if reference is not None and reference.kind == ex.kind else None
    ref_of: dict[int, int] = {}
    if ref_units is not None:
        ref_of = {img: j for j, img in enumerate(_index(reference))}
        ref_classes = _classes(reference)

    same_as: list[int | None] = [None] * n
    if units is not None:
        u = units[0]
        for j in range(n):
            for i in range(j):  # an earlier (better ranked) class of the same image with the same map
                if images[i] == images[j] and classes[i] is not None and classes[i] != classes[j] \
                        and _same(u[i], u[j]):
                    same_as[j] = classes[i]
                    break
            r = ref_of.get(images[j])
            if same_as[j] is None and r is not None and ref_classes[r] not in (None, classes[j]) \
                    and tuple(ref_units[0][r].shape) == tuple(u[j].shape) and _same(u[j], ref_units[0][r]):
                same_as[j] = ref_classes[r]

    out = []
    for j in range(n):
        if units is None:  # no common unit: fall back to the finished map, with a note
            values, signed = _per_map_finished(finished[j], ex.kind)
            out.append(MapScale(values, float("nan"), float("nan"), "per-map", ex.kind, signed,
                                note="fused layers have no common unit: each map on its own scale"))
            continue
        u, peaks = units
        signed = ex.kind == "pixel" and bool((u[j] < 0).any())
        peak = float(peaks[j])
        if mode == "none":
            values, signed = _per_map_finished(finished[j], ex.kind, rescale=False)
            out.append(MapScale(values, peak, float("nan"), mode, ex.kind, signed, same_as=same_as[j]))
            continue
        if mode == "per-map":
            group, top_class = [j], classes[j]
        else:
            group = [i for i in range(n) if images[i] == images[j]]
        tops = [(float(peaks[i]), classes[i]) for i in group]  # best-ranked first: it wins a tie
        r = ref_of.get(images[j]) if mode == "shared" else None
        if r is not None:
            tops.insert(0, (float(ref_units[1][r]), ref_classes[r]))  # the top class wins a tie
        top, top_class = max(tops, key=lambda t: t[0])
        if ex.kind == "pixel":
            lo = -1.0 if signed else 0.0
            values = (u[j] / top).clamp(lo, 1.0) if top > 0 else torch.zeros_like(u[j])
        else:
            if mode == "per-map":
                lo_value = float(u[j].min())
            else:
                lo_value = min(0.0, min(float(u[i].min()) for i in group))
            span = top - lo_value
            values = ((u[j] - lo_value) / span).clamp(0.0, 1.0) if span > 0 else torch.zeros_like(u[j])
        out.append(MapScale(values.numpy().astype(np.float32), peak, top, mode, ex.kind, signed,
                            top_class=top_class, same_as=same_as[j]))
    return out


def _per_map_finished(m: torch.Tensor, kind: str, rescale: bool = True) -> tuple[np.ndarray, bool]:
    """A finished map as display values: min-max (``rescale``) or as it is, clipped to 0..1 (-1..1 signed)."""
    signed = kind == "pixel" and bool((m < 0).any())
    if signed:
        top = float(m.abs().max()) if rescale else 1.0
        values = (m / top).clamp(-1.0, 1.0) if top > 0 else torch.zeros_like(m)
    elif rescale:
        lo, hi = float(m.min()), float(m.max())
        values = ((m - lo) / (hi - lo)) if hi > lo else torch.zeros_like(m)
    else:
        values = m.clamp(0.0, 1.0)
    return values.numpy().astype(np.float32), signed


_LABELS = {
    "shared": "colour: {what} \u00f7 the peak of the image's strongest class map (per method)",
    "per-map": "colour: each map from its own minimum to its own peak, so colours are not comparable between maps",
    "none": "colour: the method's {what}s as it finished them (each map scaled by the method)",
}


def color_scale(mode: str, kind: str = "layer", signed: bool = False, colormap: str | Colormap = "jet") -> ColorScale:
    """The colour bar for maps of ``kind`` drawn on ``mode`` (as :func:`lumos.render.draw_map` colours them:
    CAM and region maps with ``colormap``, pixel attributions in grayscale, signed ones red/blue)."""
    mode = check_scale(mode)
    label = _LABELS[mode].format(what="attribution" if kind == "pixel" else "map value")
    if kind == "pixel" and signed:
        return ColorScale("bwr", -1.0, 1.0, label + "; blue is negative", (-1.0, 0.0, 1.0))
    if kind == "pixel":
        return ColorScale("gray", 0.0, 1.0, label, (0.0, 0.5, 1.0))
    return ColorScale(colormap, 0.0, 1.0, label, (0.0, 0.5, 1.0))


def color_scales(scales: Sequence[MapScale], colormap: str | Colormap = "jet") -> list[ColorScale]:
    """The distinct colour bars a set of maps needs (one per mode and drawing: heat, grayscale, signed)."""
    seen: dict[tuple[str, str, bool], ColorScale] = {}
    for s in scales:
        drawing = "pixel" if s.kind == "pixel" else "heat"
        key = (s.mode, drawing, s.signed)
        if key not in seen:
            seen[key] = color_scale(s.mode, s.kind, s.signed, colormap)
    return list(seen.values())
