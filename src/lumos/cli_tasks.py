"""Detection and segmentation outputs for ``lumos explain --task detection|segmentation``.

:func:`run_task` is the whole job behind the flag (shipped synthetic models, images from files, one line per
user mistake); the CLI only has to call it.

:func:`explain_detection` draws the image's boxes (class, score), writes one overlay per box (its box drawn
on it) and a gallery; :func:`explain_segmentation` does the same per predicted class region. Both take a
model already returning the dense detection / segmentation tensor (see :mod:`lumos.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lumos.api import explain
from lumos.errors import LumosError
from lumos.io import load_image
from lumos.render import gallery, overlay, to_pil_image
from lumos.tasks import DetectionTarget, SegmentationTarget, detections

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def _name(label: int, names: Sequence[str] | None) -> str:
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def draw_boxes(image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None,
               names: Sequence[str] | None = None, scale: int = 1) -> Image.Image:
    """``image`` (upscaled ``scale`` times, nearest) with each box outlined and labelled "class score"."""
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(1, scale // 2))
        text = _name(int(label), names) + ("" if scores is None else f" {float(scores[k]):.2f}")
        draw.text((x0 + 2, max(0, y0 - 11)), text, fill=colour)
    return out


def explain_detection(
    model: torch.nn.Module, x: torch.Tensor, out_dir: str | Path, *, method: str = "gradcam",
    layer: str = "auto", score_threshold: float = 0.5, max_boxes: int | None = 10,
    names: Sequence[str] | None = None, scale: int = 4, stem: str = "image", **settings: object,
) -> list[Path]:
    """Explain every detection of one image (1, 3, H, W) scoring at least ``score_threshold``: writes
    ``<stem>_boxes.png``, ``<stem>_box<k>.png`` per box and the gallery ``<stem>_detections.png``; returns the paths."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise LumosError(f"explain_detection takes one image (1, 3, H, W); got {tuple(x.shape)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        (boxes, labels, scores), = detections(model(x), score_threshold, 0.5, max_boxes)
    if not len(boxes):
        raise LumosError(f"No detection scores {score_threshold} or more; lower --score.")
    ex = explain(model, x, method, target=DetectionTarget(boxes, labels), layer=layer, **settings)
    image = to_pil_image(x[0])
    paths = [out_dir / f"{stem}_boxes.png"]
    draw_boxes(image, boxes, labels, scores, names, scale).save(paths[0])
    cells, titles = [], []
    for k in range(len(boxes)):
        big = overlay(image.resize((image.width * scale, image.height * scale), Image.BILINEAR), ex.maps[k])
        cell = draw_boxes(big, boxes[k:k + 1] * scale, labels[k:k + 1], scores[k:k + 1], names, 1)
        paths.append(out_dir / f"{stem}_box{k}.png")
        cell.save(paths[-1])
        cells.append(cell)
        titles.append(f"box {k}: {_name(int(labels[k]), names)} {float(scores[k]):.2f}")
    paths.append(out_dir / f"{stem}_detections.png")
    gallery([draw_boxes(image, boxes, labels, scores, names, scale)], [cells], col_titles=["detections", *titles],
            out=paths[-1], cell_size=2.2)
    return paths


def explain_segmentation(
    model: torch.nn.Module, x: torch.Tensor, out_dir: str | Path, *, method: str = "gradcam",
    layer: str = "auto", names: Sequence[str] | None = None, background: int | None = 0, scale: int = 4,
    stem: str = "image", **settings: object,
) -> list[Path]:
    """Explain each class predicted in one image (its predicted region): ``<stem>_class<c>.png`` per class and
    the gallery ``<stem>_segments.png``; ``background`` (a class index or None) is skipped."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise LumosError(f"explain_segmentation takes one image (1, 3, H, W); got {tuple(x.shape)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        pred = model(x).argmax(1)[0]
    classes = [c for c in pred.unique().tolist() if c != background]
    if not classes:
        raise LumosError("The model predicts no class but the background in this image.")
    image = to_pil_image(x[0])
    big = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    paths, cells, titles = [], [], []
    for c in classes:
        ex = explain(model, x, method, target=SegmentationTarget(c), layer=layer, **settings)
        cell = overlay(big, ex.maps[0])
        region = Image.fromarray(((pred == c).numpy() * 255).astype("uint8")).resize(big.size, Image.NEAREST)
        outline = ImageDraw.Draw(cell)
        for xy in _edge_points(region):
            outline.point(xy, fill=(255, 255, 255))
        paths.append(out_dir / f"{stem}_class{c}.png")
        cell.save(paths[-1])
        cells.append(cell)
        titles.append(f"{_name(c, names)} region")
    paths.append(out_dir / f"{stem}_segments.png")
    gallery([big], [cells], col_titles=["image", *titles], out=paths[-1], cell_size=2.2)
    return paths


def _edge_points(mask: Image.Image) -> list[tuple[int, int]]:
    """Pixels of a binary mask image on its region's border (drawn as the region's outline)."""
    m = torch.from_numpy(np.asarray(mask) > 0)
    inner = m.clone()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    ys, xs = (m & ~inner).nonzero(as_tuple=True)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


TASKS = ("detection", "segmentation")


def run_task(task: str, images: Sequence[str | Path], out_dir: str | Path, *, method: str = "gradcam",
             score_threshold: float = 0.5, max_boxes: int | None = 10, size: int = 64) -> list[Path]:
    """Explain image files with the shipped synthetic detector or segmenter (images resized to ``size``):
    per image, the files of :func:`explain_detection` / :func:`explain_segmentation` named after it."""
    from lumos.synthetic.data import CLASS_NAMES

    if task not in TASKS:
        raise LumosError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    if task == "detection":
        from lumos.synthetic.detector import load_tinydetector
        model = load_tinydetector()
    else:
        from lumos.synthetic.segmenter import load_tinysegmenter
        model = load_tinysegmenter()
    paths: list[Path] = []
    for image in images:
        pil = load_image(image).resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        stem = Path(image).stem
        if task == "detection":
            paths += explain_detection(model, x, out_dir, method=method, layer="features.block5",
                                       score_threshold=score_threshold, max_boxes=max_boxes, names=CLASS_NAMES,
                                       stem=stem)
        else:
            paths += explain_segmentation(model, x, out_dir, method=method, layer="features.block5",
                                          names=["background", *CLASS_NAMES], stem=stem)
    return paths
