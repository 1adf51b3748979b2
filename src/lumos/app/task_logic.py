"""Plain-Python logic of the app's detection and segmentation views (no Streamlit: testable directly).

The views use the shipped synthetic models (``lumos.synthetic.detector`` / ``segmenter``, 64 x 64 inputs, layer
``features.block5``) as ``lumos explain --task`` does; targets come from :mod:`lumos.tasks`, drawing from
:mod:`lumos.render.boxes` (the same helpers as the CLI's).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.errors import LumosError

TASKS = ("classification", "detection", "segmentation")
SIZE = 64  # the shipped synthetic models' input side
LAYER = "features.block5"
SCALE = 4  # images are shown 4x larger (256 px): 64 px is too small to read
# Example scenes: indices into make_scenes(12, seed=123), held out from training (seed 0); all their objects are found.
SCENE_SEED, SCENES = 123, {"scene 1": 9, "scene 2": 10, "scene 3": 2}
# Methods that cannot explain a box or a region: CAM needs a linear head's classes, rollouts need attention.
UNSUPPORTED = ("cam", "rollout", "grad_rollout")


def parse_task(argv: Sequence[str]) -> str:
    """The ``--task`` among the script arguments (``classification`` when absent); unknown arguments are ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--task", default="classification")
    try:
        ns, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # pragma: no cover - argparse on a malformed value
        return "classification"
    return ns.task.strip().lower()


def check_task(task: str) -> str:
    if task not in TASKS:
        raise LumosError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    return task


@dataclass
class TaskModel:
    """A shipped synthetic model for one task, with its class names, layer and input size."""

    task: str
    model: torch.nn.Module
    names: list[str]  # the detector's classes; the segmenter's with "background" first (class 0)
    layer: str = LAYER
    size: int = SIZE


def load_task_model(task: str) -> TaskModel:
    """The shipped detector (``detection``) or segmenter (``segmentation``), in eval mode on the CPU."""
    from lumos.synthetic.data import CLASS_NAMES

    if check_task(task) == "detection":
        from lumos.synthetic.detector import load_tinydetector

        return TaskModel(task, load_tinydetector(), list(CLASS_NAMES))
    if task == "segmentation":
        from lumos.synthetic.segmenter import load_tinysegmenter

        return TaskModel(task, load_tinysegmenter(), ["background", *CLASS_NAMES])
    raise LumosError("The classification view uses the app's classification model, not a task model.")


def scene_image(name: str) -> Image.Image:
    """An example scene (``SCENES``) as a 64 x 64 RGB image."""
    from lumos.synthetic.scenes import make_scenes

    if name not in SCENES:
        raise LumosError(f"Unknown example scene '{name}'; use one of {', '.join(SCENES)}.")
    image = make_scenes(max(SCENES.values()) + 1, seed=SCENE_SEED).images[SCENES[name]]
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def scene_png(name: str) -> bytes:
    buf = io.BytesIO()
    scene_image(name).save(buf, format="PNG")
    return buf.getvalue()


def task_input(tm: TaskModel, image: Image.Image) -> tuple[Image.Image, torch.Tensor]:
    """The image resized to the model's input (what is shown) and its (1, 3, size, size) tensor in [0, 1]."""
    small = image.convert("RGB")
    if small.size != (tm.size, tm.size):
        small = small.resize((tm.size, tm.size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return small, x


def task_methods() -> list[str]:
    """The methods the task views offer: every registered one that can explain a box or a region."""
    from lumos.app.logic import available_methods

    return [m for m in available_methods() if m not in UNSUPPORTED]


# ------------------------------------------------------------------------------------------- detection


@dataclass
class Detections:
    """One image's detections, best first: boxes (n, 4) in model-input pixels, labels (n,), scores (n,)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)


def find_boxes(tm: TaskModel, image: Image.Image, score_threshold: float = 0.5, max_boxes: int = 10) -> Detections:
    """The detections scoring at least ``score_threshold`` (class-wise NMS at 0.5), as ``lumos explain --task``."""
    from lumos.tasks import detections

    _, x = task_input(tm, image)
    with torch.no_grad():
        (boxes, labels, scores), = detections(tm.model(x), score_threshold, 0.5, max_boxes)
    return Detections(boxes, labels, scores)


def box_choices(det: Detections, names: Sequence[str]) -> list[str]:
    """One line per box for the list: ``box 0: disc 0.87`` (numbered from 0 as on the picture, the CLI's files and
    ``DetectionTarget.box(k)``; best first)."""
    from lumos.render.boxes import label_name

    return [f"box {k}: {label_name(int(det.labels[k]), names)} {float(det.scores[k]):.2f}"
            for k in range(len(det))]


def boxes_image(tm: TaskModel, image: Image.Image, det: Detections) -> Image.Image:
    """The input image, ``SCALE`` times larger, with every box outlined and labelled "#k class score"."""
    from lumos.render.boxes import draw_boxes

    small, _ = task_input(tm, image)
    return draw_boxes(small, det.boxes, det.labels, det.scores, tm.names, SCALE, numbered=True)


@dataclass
class TaskResult:
    """One explanation of one box or class region (plain arrays: cache-friendly)."""

    method: str
    map: np.ndarray  # (size, size)
    kind: str  # Explanation.kind: layer, pixel or region
    layer: str | None
    shortfall: str | None = None  # the method stopped at its cap before meeting its tolerance (see caption)


def _explain(tm: TaskModel, image: Image.Image, method: str, target: Any,
             settings: dict[str, Any] | None) -> TaskResult:
    from lumos.api import explain
    from lumos.engine import quiet_blank_maps
    from lumos.shortfall import gather_shortfalls

    if method in UNSUPPORTED:
        raise LumosError(f"{method} cannot explain a box or a region; choose another method.")
    _, x = task_input(tm, image)
    with quiet_blank_maps(), gather_shortfalls(say=False) as short:  # the page's caption says them
        ex = explain(tm.model, x, method, target=target, layer=tm.layer, **dict(settings or {}))
    layer = ex.layer if isinstance(ex.layer, str) or ex.layer is None else ", ".join(ex.layer)
    return TaskResult(method, ex.maps[0].detach().float().cpu().numpy(), ex.kind, layer,
                      "; ".join(s.caption() for s in short) or None)


def explain_box(tm: TaskModel, image: Image.Image, det: Detections, k: int, method: str = "gradcam",
                settings: dict[str, Any] | None = None) -> TaskResult:
    """Box ``k``'s explanation (its class score, IoU-matched: ``lumos.tasks.DetectionTarget``). A box explained
    alone has the same map as with the image's other boxes."""
    from lumos.tasks import DetectionTarget

    if not 0 <= k < len(det):
        raise LumosError(f"There is no box {k}: the image has {len(det)} detections (box 0 to {len(det) - 1}).")
    return _explain(tm, image, method, DetectionTarget(det.boxes[k:k + 1], det.labels[k:k + 1]), settings)


def render_box(tm: TaskModel, image: Image.Image, det: Detections, k: int, result: TaskResult,
               colormap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """Box ``k``'s map over the image (``SCALE`` times larger), the box drawn on it."""
    from lumos.render.boxes import explained_box

    small, _ = task_input(tm, image)
    return explained_box(small, result.map, det.boxes[k], int(det.labels[k]), float(det.scores[k]), tm.names,
                         SCALE, kind=result.kind, colormap=colormap, alpha=alpha)


# ---------------------------------------------------------------------------------------- segmentation


def predicted_mask(tm: TaskModel, image: Image.Image) -> torch.Tensor:
    """The predicted class of every pixel, (size, size)."""
    _, x = task_input(tm, image)
    with torch.no_grad():
        return tm.model(x).argmax(1)[0]


def class_choices(pred: torch.Tensor, names: Sequence[str], background: int = 0) -> list[tuple[int, str]]:
    """(class, "disc: 6% of pixels") for each class predicted in the image but ``background``, largest first."""
    from lumos.render.boxes import label_name

    classes, counts = pred.unique(return_counts=True)
    found = sorted(((int(n), int(c)) for c, n in zip(classes, counts, strict=True) if int(c) != background),
                   reverse=True)
    return [(c, f"{label_name(c, names)}: {_share(n / pred.numel())} of pixels") for n, c in found]


def _share(fraction: float) -> str:
    """A predicted region's share of the image, never "0%" for a region that is there: 20%, 0.4%, <0.1%."""
    if fraction >= 0.01:
        return f"{fraction:.0%}"
    return f"{fraction:.1%}" if fraction >= 0.001 else "<0.1%"


def segments_image(tm: TaskModel, image: Image.Image, pred: torch.Tensor, background: int = 0) -> Image.Image:
    """The input image, ``SCALE`` times larger, each predicted class region tinted with its class colour
    (``lumos.render.boxes.PALETTE`` of class - 1: the detector's colour for the same shape)."""
    small, _ = task_input(tm, image)
    rgb = np.asarray(small, dtype=np.float32)
    p = pred.numpy()
    for c in np.unique(p):
        if c != background:
            rgb[p == c] = 0.45 * rgb[p == c] + 0.55 * np.asarray(region_colour(int(c)), np.float32)
    out = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    return out.resize((out.width * SCALE, out.height * SCALE), Image.NEAREST)


def region_colour(category: int) -> tuple[int, int, int]:
    """The tint of class ``category``'s region in ``segments_image`` (the detector's colour for the same shape)."""
    from lumos.render.boxes import PALETTE

    return PALETTE[(int(category) - 1) % len(PALETTE)]


def legend_html(classes: Sequence[tuple[int, str]], names: Sequence[str]) -> str:
    """The key to ``segments_image``'s tints: a colour swatch and the class name for each listed class
    (``class_choices``), so a region's colour is never left to guess."""
    from html import escape

    from lumos.render.boxes import label_name

    items = "".join(
        f"<span style='display:inline-flex;align-items:center;gap:0.3rem;margin-right:0.9rem'>"
        f"<span style='display:inline-block;width:0.9rem;height:0.9rem;border-radius:2px;"
        f"background:rgb{region_colour(c)}'></span>{escape(label_name(c, names))}</span>"
        for c, _ in classes
    )
    return f"<div data-testid='lumos-region-key' style='font-size:0.85rem;margin-top:-0.5rem'>{items}</div>"


def explain_class(tm: TaskModel, image: Image.Image, category: int, method: str = "gradcam",
                  settings: dict[str, Any] | None = None) -> TaskResult:
    """The explanation of ``category`` over its predicted region (``lumos.tasks.SegmentationTarget``)."""
    from lumos.tasks import SegmentationTarget

    return _explain(tm, image, method, SegmentationTarget(int(category)), settings)


def render_class(tm: TaskModel, image: Image.Image, pred: torch.Tensor, category: int, result: TaskResult,
                 colormap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """The class region's map over the image (``SCALE`` times larger), the region outlined."""
    from lumos.render.boxes import explained_region

    small, _ = task_input(tm, image)
    return explained_region(small, result.map, (pred == category).numpy(), SCALE, kind=result.kind,
                            colormap=colormap, alpha=alpha)


def result_key(task: str, image_hash: str, what: Any, method: str, settings: dict[str, Any] | None) -> str:
    """What one task explanation depends on: the task's model, the image, the box (or class), the method and its
    settings."""
    return json.dumps(["task", task, image_hash, what, method, dict(sorted((settings or {}).items()))], default=str)
