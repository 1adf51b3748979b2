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
from PIL import Image

from lumos.api import explain
from lumos.errors import LumosError
from lumos.io import load_image
from lumos.render import gallery, to_pil_image
from lumos.render.boxes import draw_boxes, explained_box, explained_region
from lumos.render.boxes import label_name as _name
from lumos.tasks import DetectionTarget, SegmentationTarget, detections


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
    overview = draw_boxes(image, boxes, labels, scores, names, scale, numbered=True)
    overview.save(paths[0])
    cells, titles = [], []
    for k in range(len(boxes)):
        cell = explained_box(image, ex.maps[k], boxes[k], int(labels[k]), float(scores[k]), names, scale,
                             kind=ex.kind)
        paths.append(out_dir / f"{stem}_box{k}.png")
        cell.save(paths[-1])
        cells.append(cell)
        titles.append(f"box {k}: {_name(int(labels[k]), names)} {float(scores[k]):.2f}")
    paths.append(out_dir / f"{stem}_detections.png")
    gallery([overview], [cells], col_titles=["detections", *titles], out=paths[-1], cell_size=2.2)
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
        cell = explained_region(image, ex.maps[0], pred == c, scale, kind=ex.kind)
        paths.append(out_dir / f"{stem}_class{c}.png")
        cell.save(paths[-1])
        cells.append(cell)
        titles.append(f"{_name(c, names)} region")
    paths.append(out_dir / f"{stem}_segments.png")
    gallery([big], [cells], col_titles=["image", *titles], out=paths[-1], cell_size=2.2)
    return paths


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
