"""Explain many images with several methods and write the pictures: the job behind ``lumos explain``/``demo``.

Library code: it logs and reports progress through a callback, never prints. A bad image is recorded as
a failure and the others still go through.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lumos.errors import LumosError
from lumos.explainer import Explainer, Prediction
from lumos.explanation import Explanation
from lumos.render import draw_map, gallery

log = logging.getLogger(__name__)
SAVE_FORMATS = ("png", "npy")


@dataclass
class ImageResult:
    """What was produced for one image."""

    name: str
    image: Image.Image
    prediction: Prediction
    overlays: dict[str, list[Image.Image]] = field(default_factory=dict)
    captions: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RunReport:
    """Outcome of a run: results per image, failures (name, reason) and files written."""

    results: list[ImageResult] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    stems: dict[str, str] = field(default_factory=dict)  # image name -> output file stem

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


def _caption(ex: Explanation, j: int, labels: Sequence[str] | None) -> str:
    if ex.targets is None:
        return f"score {float(ex.scores[j]):.3g}"
    cls = int(ex.targets[j])
    name = labels[cls] if labels is not None else f"class {cls}"
    return f"{name} {float(ex.probs[j]):.2f}"


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
) -> RunReport:
    """Explain images in batches with an :class:`~lumos.explainer.Explainer`; write overlays (and .npy maps).

    ``items`` yields (name, image) or (name, loader); a loader that raises ``LumosError`` becomes a
    failure of that image only. ``on_image(name, prediction, error)`` is called once per image and
    ``on_method(name, seconds)`` once per method and batch.
    """
    report = RunReport()
    batch: list[tuple[str, Image.Image]] = []

    def flush() -> None:
        if batch:
            _run_batch(batch, explainer, out, save, colormap, alpha, report, on_image, on_method)
            batch.clear()

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
               max_side: int | None = None) -> Image.Image:
    """Map ``j`` drawn for reading at the image size, its long side capped at ``max_side`` pixels.

    Layer and region maps (CAMs, occlusion, RISE) become a heat overlay on the photo; pixel attributions
    (``ex.kind == "pixel"``) become grayscale saliency, as in the papers, since their detail hides under a photo.
    ``max_side=None`` uses ``$LUMOS_MAX_SIDE`` or 4096 (see :func:`lumos.io.default_max_side`); 0: no cap.
    """
    from lumos.io import default_max_side, fit_size

    size = fit_size(image.size, default_max_side() if max_side is None else max_side)
    return draw_map(image, ex.maps[j], ex.kind, colormap, alpha, size=size)


def _run_batch(batch, explainer, out, save, colormap, alpha, report, on_image, on_method):
    result = explainer([im for _, im in batch], on_method=on_method)
    results = [ImageResult(n, im, p) for (n, im), p in zip(batch, result.predictions, strict=True)]
    labels = explainer.labels
    for name, ex in result.explanations.items():
        for j in range(len(ex)):
            res = results[int(ex.image_index[j])]
            res.overlays.setdefault(name, []).append(render_map(res.image, ex, j, colormap, alpha))
            res.captions.setdefault(name, []).append(_caption(ex, j, labels))
        if out is not None and "npy" in save:
            for i, res in enumerate(results):
                path = out / f"{report.stem(res.name)}_{_safe(name)}.npy"
                np.save(path, _at_image_size(ex.maps[ex.image_index == i], res.image))
                report.written.append(path)
    for res in results:
        if out is not None and "png" in save:
            for method, images in res.overlays.items():
                for k, img in enumerate(images):
                    suffix = f"_top{k + 1}" if len(images) > 1 else ""
                    path = out / f"{report.stem(res.name)}_{_safe(method)}{suffix}.png"
                    img.save(path, compress_level=1)
                    report.written.append(path)
        report.results.append(res)
        if on_image:
            on_image(res.name, res.prediction, None)


def write_gallery(report: RunReport, path: Path, methods: Sequence[str]) -> Path:
    """One PNG: rows = images, columns = methods (first overlay of each), titled by class and probability."""
    rows = report.results
    if not rows:
        raise LumosError("No image was explained, so there is no gallery to draw.")
    columns = {m: [r.overlays[m][0] for r in rows] for m in methods}
    cell_titles = [[r.captions[m][0] for m in methods] for r in rows]
    row_titles = [f"{r.name}: {r.prediction.top[0][1]} {r.prediction.top[0][2]:.2f}" for r in rows]
    gallery([r.image for r in rows], columns, row_titles=row_titles, cell_titles=cell_titles, out=path)
    return path
