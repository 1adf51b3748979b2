"""Explain many images with several methods and write the pictures: the job behind ``lumos explain``/``demo``.

Library code: it logs and reports progress through a callback, never prints. A bad image is recorded as
a failure and the others still go through.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from lumos.engine import blank_maps
from lumos.errors import LumosError, NonFiniteError, each_alone_on_nonfinite
from lumos.explainer import Explainer, Prediction
from lumos.explanation import Explanation
from lumos.methods import display_name
from lumos.render import (
    DEFAULT_SCALE,
    MapScale,
    check_scale,
    color_scale,
    color_scales,
    draw_map,
    gallery,
    map_scales,
    picture,
    save_png,
)
from lumos.shortfall import gather_shortfalls
from lumos.targets import TOPK

log = logging.getLogger(__name__)
SAVE_FORMATS = ("png", "npy")
#: zlib strategy for overlay PNGs: on photos ~20% faster to encode and ~15% smaller than the default at level 1
HUFFMAN_ONLY = 2


@dataclass
class ImageResult:
    """What was produced for one image, per method one entry per map (its classes, best first).

    ``captions`` are the picture captions (class and probability, then the map's peak on its colour scale
    and any note), ``scales`` how each map was drawn (:class:`~lumos.render.MapScale`: the display values,
    raw peak, top of the scale), ``classes`` the class each map explains (None for callable targets).
    ``references`` holds, when an explicitly chosen class is not the image's top class, the top class's map
    (drawn and captioned on the same scale) that galleries show beside it.
    """

    name: str
    image: Image.Image
    prediction: Prediction
    overlays: dict[str, list[Image.Image]] = field(default_factory=dict)
    captions: dict[str, list[str]] = field(default_factory=dict)
    scales: dict[str, list[MapScale]] = field(default_factory=dict)
    classes: dict[str, list[int | None]] = field(default_factory=dict)
    references: dict[str, tuple[Image.Image, str]] = field(default_factory=dict)  # top class's map, for comparison
    drawing: dict[str, list[tuple[Explanation, int]]] = field(default_factory=dict, repr=False)  # maps to draw


def _background_priority() -> None:
    """Lower this writer thread's scheduling priority (Linux, where a thread id is a valid ``setpriority``
    target): PNG encoding then fills the cores the model leaves idle (decoding, preprocessing, Python) instead
    of slowing its forward passes. Elsewhere the thread keeps the normal priority."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as err:  # e.g. a sandbox refusing it: the pictures are the same, only slower
            log.debug("writer thread priority unchanged: %s", err)


#: Write errors that stop a run (every later file would fail too); others fail their own file only
WHOLE_RUN_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass
class RunReport:
    """Outcome of a run: results per image, failures (name, reason) and files written; ``scale`` and
    ``colormap`` say how the pictures were drawn (galleries draw their colour bars from them)."""

    results: list[ImageResult] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    stems: dict[str, str] = field(default_factory=dict)  # image name -> output file stem
    blank: dict[str, list[str]] = field(default_factory=dict)  # method -> "image (class)" of maps zero everywhere
    scale: str = DEFAULT_SCALE
    colormap: str = "jet"
    _pending: list[tuple[Future, Path | None]] = field(default_factory=list, repr=False)
    _writer: ThreadPoolExecutor | None = field(default=None, repr=False)
    _drawn: list[tuple[list, int, Future]] = field(default_factory=list, repr=False)

    def _submit(self, job: Callable[..., object], path: Path | None, *args: object) -> Future:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lumos-writer",
                                              initializer=_background_priority)
        future = self._writer.submit(job, *args)
        self._pending.append((future, path))
        return future

    def write(self, path: Path, save: Callable[[Path], object]) -> None:
        """Encode and write a file on one of two background threads (PNG and .npy encoding release the GIL, so
        it overlaps the next batch's model work, and the last batch's files are written two at a time);
        a file that cannot be written becomes a failure in :meth:`wait`."""
        self._submit(save, path, path)
        self.written.append(path)

    def write_failed(self, path: Path, err: OSError) -> None:
        """A file that could not be written: one failure line, and it is not counted as written."""
        self.failures.append((str(path), f"Cannot write {path}: {err.strerror or err}."))
        if path in self.written:
            self.written.remove(path)

    def draw(self, slot: list, k: int, draw: Callable[[], Image.Image], path: Path | None = None) -> None:
        """Draw a picture (and write it as PNG to ``path``) on a background thread; :meth:`wait` puts it in
        ``slot[k]``. Overlays are drawn with Pillow and numpy, which release the GIL for the pixel work."""
        def job() -> Image.Image:
            picture = draw()
            if path is not None:
                picture.save(path, compress_level=1, compress_type=HUFFMAN_ONLY)
            return picture

        self._drawn.append((slot, k, self._submit(job, path)))
        if path is not None:
            self.written.append(path)

    def wait(self) -> None:
        """Wait for every pending picture and write; the first failed one raises (after all have finished)."""
        pending, self._pending = self._pending, []
        errors = [(f.exception(), path) for f, path in pending]
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        drawn, self._drawn = self._drawn, []
        for slot, k, future in drawn:
            if future.exception() is None:
                slot[k] = future.result()
        alone = [(e, p) for e, p in errors
                 if p is not None and isinstance(e, OSError) and e.errno not in WHOLE_RUN_WRITE_ERRORS]
        for err, path in alone:  # a file that cannot be written fails alone; the others are kept
            self.write_failed(path, err)
        first = next((e for e, path in errors if e is not None and (e, path) not in alone), None)
        if first is not None:
            raise first

    def stem(self, name: str) -> str:
        """Output file stem for an image: its file name without extension, made unique within the run."""
        if name not in self.stems:
            base = _safe(Path(name).stem)
            stem, n = base, 1
            taken = {s.casefold() for s in self.stems.values()}  # Cat.png and cat.png clash on macOS/Windows
            while stem.casefold() in taken:
                n += 1
                stem = f"{base}_{n}"
            self.stems[name] = stem
        return self.stems[name]


def parse_list(text: str, allowed: Sequence[str] | None = None, what: str = "value") -> list[str]:
    """Split ``"a,b c"`` into items; with ``allowed``, items are matched case-insensitively (``PNG`` is ``png``)
    and unknown items are a one-line error."""
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not items:
        raise LumosError(f"No {what} given.")
    if allowed is not None:
        canonical = {a.lower(): a for a in allowed}
        for item in items:
            if item.lower() not in canonical:
                raise LumosError(f"Unknown {what} '{item}'; use one or more of: {', '.join(allowed)}.")
        items = [canonical[item.lower()] for item in items]
    return items


# Not allowed in file names somewhere: path separators, control characters, Windows' reserved <>:"|?*, and
# lone surrogates (undecodable bytes in a POSIX name, which could not be printed).
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*\ud800-\udfff]+')
_MAX_STEM_BYTES = 150  # leaves room for "_2_integrated_gradients_top10.png" within the usual 255-byte limit


def _safe(text: str) -> str:
    """``text`` usable in a file name: letters of any script kept, unsafe characters replaced by ``_``,
    at most 150 UTF-8 bytes; ``x`` if nothing is left."""
    safe = _UNSAFE.sub("_", text).strip("_ .")
    while len(safe.encode("utf-8")) > _MAX_STEM_BYTES:
        safe = safe[:-1]
    return safe.rstrip("_ .") or "x"


def _class_slug(name: str) -> str:
    """A class name for a file name: ``Egyptian cat`` -> ``Egyptian-cat`` (at most 60 bytes)."""
    slug = _safe("-".join(name.split()))
    while len(slug.encode("utf-8")) > 60:
        slug = slug[:-1]
    return slug.rstrip("-_ .") or "x"


def _label(labels: Sequence[str] | None, cls: int | None) -> str:
    if cls is None:
        return "the target"
    return labels[cls] if labels is not None and 0 <= cls < len(labels) else f"class {cls}"


def _share(rel: float) -> str:
    return "<1%" if rel * 100 < 1 else f"{rel * 100:.0f}%"


def _caption(ex: Explanation, j: int, labels: Sequence[str] | None, scale: MapScale | None = None,
             rank: int = 0, per_image: int = 1) -> str:
    """The caption of map ``j``: ``[top-2: ]class probability``, then (with ``scale``) its raw peak on its
    colour scale, and a note when the map is the same as another class's (the method ignores the class)."""
    cls = None if ex.targets is None else int(ex.targets[j])
    if cls is None:
        head = f"score {float(ex.scores[j]):.3g}"
    elif ex.probs is None:
        head = f"{_label(labels, cls)} score {float(ex.scores[j]):.3g}"
    else:
        head = f"{_label(labels, cls)} {float(ex.probs[j]):.2f}"
    lines = [f"top-{rank + 1}: {head}" if per_image > 1 else head]
    if scale is None:
        return lines[0]
    if math.isfinite(scale.peak):
        peak = f"peak {scale.peak:.3g}"
        rel = scale.relative
        if scale.mode == "per-map":
            lines.append(f"{peak} (own scale)")
        elif scale.mode == "none" or not math.isfinite(rel):
            lines.append(peak)
        elif scale.top_class is not None and scale.top_class != cls:
            lines.append(f"{peak} = {_share(rel)} of {_label(labels, scale.top_class)}'s")
        elif rel < 0.9995:
            lines.append(f"{peak} = {_share(rel)} of the scale")
        else:  # this map sets the scale; say so only when others share it
            lines.append(f"{peak} = top of scale" if per_image > 1 or scale.top_class != cls else peak)
    if scale.same_as is not None:
        lines.append(f"same map as {_label(labels, scale.same_as)}: ignores the class")
    if scale.note:
        lines.append(scale.note)
    return "\n".join(lines)


def explain_images(
    explainer: Explainer,
    items: Iterable[tuple[str, Image.Image | Callable[[], Image.Image]]],
    *,
    out: Path | None = None,
    save: Sequence[str] = ("png",),
    colormap: str = "jet",
    alpha: float = 0.5,
    batch_size: int = 8,
    on_image: Callable[[str, Prediction | None, str | None], None] | None = None,
    on_method: Callable[[str, float], None] | None = None,
    scale: str = DEFAULT_SCALE,
    captions: bool = False,
) -> RunReport:
    """Explain images in batches with an :class:`~lumos.explainer.Explainer`; write overlays (and .npy maps).

    ``items`` yields (name, image) or (name, loader); a loader that raises ``LumosError`` becomes a
    failure of that image only. ``on_image(name, prediction, error)`` is called once per image and
    ``on_method(name, seconds)`` once per method and batch.

    ``scale`` is how pictures are coloured (:func:`lumos.render.map_scales`): ``"shared"`` (default) puts the
    maps of one image and method on one scale -- its top-k classes, or an explicitly chosen class together
    with the image's top class (whose map is then computed too, one more run of each method, so a class the
    model gives 0.00 is drawn on the top class's scale) -- ``"per-map"`` scales each map on its own,
    ``"none"`` draws the method's maps as they are. ``captions=True`` writes each PNG with its caption (class,
    probability, peak) and colour bar under the map. Top-k PNGs are named ``STEM_METHOD_topK_CLASS.png``.
    """
    try:
        scale = check_scale(scale)
    except ValueError as err:
        raise LumosError(str(err)) from None
    report = RunReport(scale=scale, colormap=colormap)
    batch: list[tuple[str, Image.Image]] = []

    def run(indices: list[int]) -> list[None]:
        _run_batch([batch[i] for i in indices], explainer, out, save, colormap, alpha, report, on_image, on_method,
                   captions)
        return []

    def fail(i: int, err: NonFiniteError) -> list[None]:  # that image only: the batch's others are written
        report.failures.append((batch[i][0], f"{batch[i][0]}: {err}"))
        if on_image:
            on_image(batch[i][0], None, str(err))
        return []

    def flush() -> None:
        if batch:
            each_alone_on_nonfinite(run, list(range(len(batch))), fail)
            batch.clear()

    try:
        with gather_shortfalls():  # a method's cap, said once for the run rather than once per batch
            for name, source in items:
                try:
                    image = source() if callable(source) else source
                except LumosError as err:
                    report.failures.append((name, str(err)))
                    if on_image:
                        on_image(name, None, str(err))
                    continue
                batch.append((name, image))
                if len(batch) >= batch_size:
                    flush()
            flush()
    finally:
        report.wait()
    return report


def _at_image_size(maps: torch.Tensor, image: Image.Image, max_side: int | None = None) -> np.ndarray:
    """(k, h, w) maps at model resolution -> float32 (k, H, W) at the image size, like the overlays.

    The size is capped like the overlays' (long side at most ``max_side``; None: ``$LUMOS_MAX_SIDE`` or 4096,
    0: no cap), so a huge photo does not give a huge ``.npy``.
    """
    from lumos.io import default_max_side, fit_size

    width, height = fit_size(image.size, default_max_side() if max_side is None else max_side)
    maps = maps.detach().float().cpu()
    if tuple(maps.shape[-2:]) != (height, width):
        maps = torch.nn.functional.interpolate(maps[:, None], size=(height, width), mode="bilinear",
                                               align_corners=False)[:, 0]
    return maps.numpy()


def render_map(image: Image.Image, ex: Explanation, j: int, colormap: str = "jet", alpha: float = 0.5,
               max_side: int | None = None, *, scale: MapScale | None = None) -> Image.Image:
    """Map ``j`` drawn for reading at the image size, its long side capped at ``max_side`` pixels.

    Layer and region maps (CAMs, occlusion, RISE) become a heat overlay on the photo; pixel attributions
    (``ex.kind == "pixel"``) become grayscale saliency, as in the papers, since their detail hides under a photo.
    ``scale`` (from :func:`lumos.render.map_scales`) draws the map's display values on their fixed range
    (0..1, -1..1 signed); without it the map is scaled on its own. ``max_side=None`` uses ``$LUMOS_MAX_SIDE``
    or 4096 (see :func:`lumos.io.default_max_side`); 0: no cap.
    """
    from lumos.io import default_max_side, fit_size

    size = fit_size(image.size, default_max_side() if max_side is None else max_side)
    if scale is None:
        return draw_map(image, ex.maps[j], ex.kind, colormap, alpha, size=size)
    vmin = -1.0 if scale.signed else 0.0
    return draw_map(image, scale.values, ex.kind, colormap, alpha, size=size, vmin=vmin, vmax=1.0)


def _explicit_class(explainer: Explainer) -> bool:
    """Whether the run explains a class chosen by the user (not the top-1 or top-k classes)."""
    target = explainer.spec.target
    return target is not None and not (isinstance(target, str) and TOPK.fullmatch(target.lower()))


def _references(explainer: Explainer, images: list[Image.Image], result, on_method) -> dict[str, Explanation]:
    """Per method, the maps of the images' top class for the images whose explained class is another one,
    so the explained map can share the top class's colour scale (``image_index`` refers to the batch)."""
    first = next(iter(result.explanations.values()))
    if not _explicit_class(explainer) or first.targets is None:
        return {}
    need = [i for i, p in enumerate(result.predictions)
            if p.top and int(p.top[0][0]) != int(first.targets[int((first.image_index == i).nonzero()[0, 0])])]
    if not need:
        return {}
    import time

    x = explainer.preprocess(images)
    refs = {}
    for name, method in explainer.methods(x).items():
        start = time.perf_counter()
        ref = method(x[need], None).cpu()
        ref.image_index = torch.tensor(need)
        refs[name] = ref
        if on_method is not None:
            on_method(name, time.perf_counter() - start)
    return refs


def _run_batch(batch, explainer, out, save, colormap, alpha, report, on_image, on_method, captions=False):
    images = [im for _, im in batch]
    result = explainer(images, on_method=on_method)
    results = [ImageResult(n, im, p) for (n, im), p in zip(batch, result.predictions, strict=True)]
    labels = explainer.labels
    refs = _references(explainer, images, result, on_method) if report.scale == "shared" else {}
    for name, ex in result.explanations.items():
        scales = map_scales(ex, report.scale, refs.get(name))
        if name in refs:  # the top class's map on the same scale, for the gallery
            ref = refs[name]
            for j, s in enumerate(map_scales(ref, report.scale, reference=ex)):
                res = results[int(ref.image_index[j])]
                caption = _caption(ref, j, labels, replace(s, same_as=None))
                res.references[name] = (render_map(res.image, ref, j, colormap, alpha, scale=s),
                                        f"top class: {caption}")
        index = [int(i) for i in ex.image_index]
        blank = blank_maps(ex.maps)
        for j in range(len(ex)):
            res = results[index[j]]
            rank, per_image = index[:j].count(index[j]), index.count(index[j])
            res.overlays.setdefault(name, []).append(None)  # drawn below: now (captions) or in the background
            res.drawing.setdefault(name, []).append((ex, j))
            caption = _caption(ex, j, labels, scales[j], rank, per_image)
            if blank[j]:
                cls = None if ex.targets is None else int(ex.targets[j])
                report.blank.setdefault(name, []).append(f"{res.name} ({_label(labels, cls)})")
                caption += "\nzero everywhere: nothing to draw"
            res.captions.setdefault(name, []).append(caption)
            res.scales.setdefault(name, []).append(scales[j])
            res.classes.setdefault(name, []).append(None if ex.targets is None else int(ex.targets[j]))
        if out is not None and "npy" in save:
            for i, res in enumerate(results):
                path = out / f"{report.stem(res.name)}_{_safe(name)}.npy"
                arr = _at_image_size(ex.maps[ex.image_index == i], res.image)
                report.write(path, lambda p, arr=arr: np.save(p, arr))
    for res in results:
        png = out is not None and "png" in save
        for method, maps in res.drawing.items():
            slot = res.overlays[method]
            for k, (ex, j) in enumerate(maps):
                path = out / f"{report.stem(res.name)}_{_safe(method)}{_top_suffix(res, method, k, labels)}.png" \
                    if png else None
                s = res.scales[method][k]

                def draw(res=res, ex=ex, j=j, s=s) -> Image.Image:
                    return render_map(res.image, ex, j, colormap, alpha, scale=s)

                if captions and path is not None:  # matplotlib figures are drawn on this thread
                    slot[k] = draw()
                    try:
                        picture(slot[k], res.captions[method][k], color_scale(s.mode, s.kind, s.signed, colormap),
                                out=path)
                        report.written.append(path)
                    except OSError as err:
                        if err.errno in WHOLE_RUN_WRITE_ERRORS:
                            raise
                        report.write_failed(path, err)
                else:
                    report.draw(slot, k, draw, path)
        res.drawing.clear()
        report.results.append(res)
        if on_image:
            on_image(res.name, res.prediction, None)


def _top_suffix(res: ImageResult, method: str, k: int, labels: Sequence[str] | None) -> str:
    """``_top2_tiger-cat`` for the second of several maps per image (the class it explains), else nothing."""
    if len(res.overlays[method]) == 1:
        return ""
    cls = res.classes[method][k]
    return f"_top{k + 1}" + ("" if cls is None else f"_{_class_slug(_label(labels, cls))}")


def _ignores_class(report: RunReport, method: str) -> bool:
    return any(s.same_as is not None for r in report.results for s in r.scales.get(method, []))


def short_names(names: Sequence[str]) -> list[str]:
    """Each path cut to its shortest ending that no other name shares (``a/x/cat.png``, ``b/x/cat.png`` ->
    ``a/x/cat.png``, ``b/x/cat.png``; ``/data/photos/cat.png`` alone -> ``cat.png``), for titles."""
    parts = [Path(n).parts or (n,) for n in names]
    out = []
    for i, p in enumerate(parts):
        k = 1
        while k < len(p) and any(q[-k:] == p[-k:] for j, q in enumerate(parts) if j != i):
            k += 1
        out.append(str(Path(*p[-k:])) if len(p) > 1 else names[i])
    return out


def write_gallery(report: RunReport, path: Path, methods: Sequence[str]) -> Path:
    """One PNG (see :func:`gallery_figure`) written to ``path``; returns the path."""
    save_png(gallery_figure(report, methods), path)
    return path


def gallery_figure(report: RunReport, methods: Sequence[str]) -> Figure:
    """Per image its original and one row per explained class (all top-k; an explicitly chosen class is
    followed by the image's top class on the same scale), one column per method.

    Cells are captioned with class, probability and peak; colour bars say what the colours mean on the run's
    scale; a note names methods that ignore the class. Drawn by :func:`lumos.render.gallery`.
    """
    rows = report.results
    if not rows:
        raise LumosError("No image was explained, so there is no gallery to draw.")
    cells, cell_titles, per_image = [], [], []
    for r in rows:
        k = max(len(r.overlays[m]) for m in methods)
        with_ref = all(m in r.references for m in methods)
        per_image.append(k + int(with_ref))
        for i in range(k):
            cells.append([r.overlays[m][i] if i < len(r.overlays[m]) else Image.new("RGB", r.overlays[m][0].size,
                                                                                   "white") for m in methods])
            cell_titles.append([r.captions[m][i] if i < len(r.captions[m]) else "" for m in methods])
        if with_ref:  # an explicitly chosen class, then the top class on the same scale
            cells.append([r.references[m][0] for m in methods])
            cell_titles.append([r.references[m][1] for m in methods])
    names = short_names([r.name for r in rows])
    row_titles = [f"{n}: {r.prediction.top[0][1]} {r.prediction.top[0][2]:.2f}" if r.prediction.top else n
                  for n, r in zip(names, rows, strict=True)]
    bars = color_scales([s for r in rows for m in methods for s in r.scales.get(m, [])], report.colormap)
    agnostic = [display_name(m) for m in methods if _ignores_class(report, m)]
    note = None
    if agnostic:
        note = (f"{', '.join(agnostic)} ignore{'s' if len(agnostic) == 1 else ''} the class: the maps for different "
                "classes of one image are the same map.")
    return gallery([r.image for r in rows], cells, row_titles=row_titles, col_titles=[display_name(m) for m in methods],
                   cell_titles=cell_titles, rows_per_image=per_image, colorbars=bars, note=note)
