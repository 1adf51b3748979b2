"""Detection and segmentation outputs for ``lumos explain --task detection|segmentation``.

:func:`run_task` explains image files with the shipped synthetic models; :func:`explain_task` is the whole job
behind the flag (options checked, one line per unreadable image or user mistake, a summary, exit 1 when an image
failed) and :func:`explain_task_from_context` calls it with the ``lumos explain`` command's options.

:func:`explain_detection` draws the image's boxes (class, score), writes one overlay per box (its box drawn
on it) and a gallery; :func:`explain_segmentation` does the same per predicted class region. Both take a
model already returning the dense detection / segmentation tensor (see :mod:`lumos.tasks`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.api import explain
from lumos.errors import LumosError
from lumos.io import load_image
from lumos.render import gallery, to_pil_image
from lumos.render.boxes import draw_boxes, explained_box, explained_region
from lumos.render.boxes import label_name as _name
from lumos.shortfall import gather_shortfalls
from lumos.tasks import DetectionTarget, SegmentationTarget, detections


def explain_detection(
    model: torch.nn.Module, x: torch.Tensor, out_dir: str | Path, *, method: str = "gradcam",
    layer: str = "auto", score_threshold: float = 0.5, max_boxes: int | None = 10,
    names: Sequence[str] | None = None, scale: int = 4, stem: str = "image", label: int | None = None,
    save: Collection[str] = ("png",), colormap: str = "jet", alpha: float = 0.5, **settings: object,
) -> list[Path]:
    """Explain every detection of one image (1, 3, H, W) scoring at least ``score_threshold`` (of class ``label``
    only, when given): writes ``<stem>_boxes.png``, ``<stem>_box<k>.png`` per box and the gallery
    ``<stem>_detections.png`` (``"png"`` in ``save``) and each box's map as ``<stem>_box<k>.npy`` (``"npy"``, (H, W)
    float32 at the image's size); returns the paths."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise LumosError(f"explain_detection takes one image (1, 3, H, W); got {tuple(x.shape)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        output = model(x)
    if label is not None:  # that class's column only: its detections, whatever the other classes score
        output = output * torch.tensor([True] * 4 + [c == label for c in range(output.shape[2] - 4)],
                                       device=output.device)
    (boxes, labels, scores), = detections(output, score_threshold, 0.5, max_boxes)
    if not len(boxes):
        which = "No detection" if label is None else f"No detection of class {_name(label, names)}"
        raise LumosError(f"{which} scores {score_threshold} or more.")
    ex = explain(model, x, method, target=DetectionTarget(boxes, labels), layer=layer, **settings)
    paths: list[Path] = []
    if "npy" in save:
        for k in range(len(boxes)):
            paths.append(out_dir / f"{stem}_box{k}.npy")
            np.save(paths[-1], ex.maps[k].detach().float().cpu().numpy())
    if "png" not in save:
        return paths
    image = to_pil_image(x[0].cpu())
    paths.append(out_dir / f"{stem}_boxes.png")
    overview = draw_boxes(image, boxes.cpu(), labels.cpu(), scores.cpu(), names, scale, numbered=True)
    overview.save(paths[-1])
    cells, titles = [], []
    for k in range(len(boxes)):
        cell = explained_box(image, ex.maps[k].cpu(), boxes[k].cpu(), int(labels[k]), float(scores[k]), names,
                             scale, kind=ex.kind, colormap=colormap, alpha=alpha)
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
    stem: str = "image", category: int | None = None, save: Collection[str] = ("png",), colormap: str = "jet",
    alpha: float = 0.5, **settings: object,
) -> list[Path]:
    """Explain each class predicted in one image (its predicted region), or class ``category`` only:
    ``<stem>_class<c>.png`` per class and the gallery ``<stem>_segments.png`` (``"png"`` in ``save``), each map as
    ``<stem>_class<c>.npy`` (``"npy"``); ``background`` (a class index or None) is skipped unless asked for."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise LumosError(f"explain_segmentation takes one image (1, 3, H, W); got {tuple(x.shape)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        pred = model(x).argmax(1)[0]
    predicted = pred.unique().tolist()
    if category is not None:
        if category not in predicted:
            raise LumosError(f"The model predicts no pixel of class {_name(category, names)} in this image.")
        classes = [category]
    else:
        classes = [c for c in predicted if c != background]
    if not classes:
        raise LumosError("The model predicts no class but the background in this image.")
    maps = {c: explain(model, x, method, target=SegmentationTarget(c), layer=layer, **settings) for c in classes}
    paths: list[Path] = []
    if "npy" in save:
        for c, ex in maps.items():
            paths.append(out_dir / f"{stem}_class{c}.npy")
            np.save(paths[-1], ex.maps[0].detach().float().cpu().numpy())
    if "png" not in save:
        return paths
    image = to_pil_image(x[0].cpu())
    big = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    cells, titles = [], []
    for c, ex in maps.items():
        cell = explained_region(image, ex.maps[0].cpu(), (pred == c).cpu(), scale, kind=ex.kind, colormap=colormap,
                                alpha=alpha)
        paths.append(out_dir / f"{stem}_class{c}.png")
        cell.save(paths[-1])
        cells.append(cell)
        titles.append(f"{_name(c, names)} region")
    paths.append(out_dir / f"{stem}_segments.png")
    gallery([big], [cells], col_titles=["image", *titles], out=paths[-1], cell_size=2.2)
    return paths


TASKS = ("detection", "segmentation")
#: the layer of the shipped detector and segmenter (their trunk's last map) that ``layer="auto"`` stands for here
TASK_LAYER = "features.block5"
#: ``lumos explain`` options the task path cannot honour, and why
NOT_FOR_TASKS = {
    "--batch-size": "images are explained one at a time",
    "--scale": "each box or region map is drawn on its own colour scale",
    "--captions": "the gallery titles each box or region",
    "--output": "the shipped model has one output",
    "--probs": "boxes and regions are explained by their scores, not class probabilities",
    "--weights": "it runs the shipped synthetic model",
    "--mean": "it runs the shipped synthetic model",
    "--std": "it runs the shipped synthetic model",
    "--labels": "its class names are the shipped model's",
}


def task_model(task: str) -> tuple[torch.nn.Module, list[str]]:
    """The shipped synthetic detector or segmenter and its class names (index = label / output channel)."""
    from lumos.synthetic.data import CLASS_NAMES

    if task not in TASKS:
        raise LumosError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    if task == "detection":
        from lumos.synthetic.detector import load_tinydetector
        return load_tinydetector(), list(CLASS_NAMES)
    from lumos.synthetic.segmenter import load_tinysegmenter
    return load_tinysegmenter(), ["background", *CLASS_NAMES]


def task_class(text: str, names: Sequence[str]) -> int | None:
    """``--target`` for a task: ``top1`` (the default: every box or region) is None, else a class name or index
    of ``names``; anything else is a one-line error."""
    value = text.strip()
    if value.lower() == "top1":
        return None
    if value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < len(names):
            raise LumosError(f"--target {value} is out of range: the classes are 0..{len(names) - 1} "
                             f"({', '.join(names)}).")
        return index
    lowered = [n.lower() for n in names]
    if value.lower() in lowered:
        return lowered.index(value.lower())
    raise LumosError(f"--target {value!r} is not a class of this model; with --task give a class name or index "
                     f"({', '.join(f'{i} {n}' for i, n in enumerate(names))}), or leave it out to explain every one.")


def run_task(task: str, images: Sequence[str | Path], out_dir: str | Path, *, method: str = "gradcam",
             score_threshold: float = 0.5, max_boxes: int | None = 10, size: int = 64, layer: str = "auto",
             target: int | None = None, save: Collection[str] = ("png",), colormap: str = "jet", alpha: float = 0.5,
             device: torch.device | str = "cpu", settings: dict[str, Any] | None = None,
             failures: list[tuple[str, str]] | None = None) -> list[Path]:
    """Explain image files with the shipped synthetic detector or segmenter (images resized to ``size``):
    per image, the files of :func:`explain_detection` / :func:`explain_segmentation` named after it.

    ``layer="auto"`` is ``features.block5``; ``target`` a class index (its boxes / region only; None: all).
    An image that cannot be read or explained raises its one-line :class:`LumosError`, or, with a ``failures``
    list, is appended there as ``(image, reason)`` and the other images are still explained."""
    model, names = task_model(task)
    model = model.to(device)
    layer = TASK_LAYER if layer == "auto" else layer
    paths: list[Path] = []
    for image in images:
        try:
            pil = load_image(image).resize((size, size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(device)
            common = dict(method=method, layer=layer, names=names, stem=Path(image).stem, save=save,
                          colormap=colormap, alpha=alpha, **(settings or {}))
            if task == "detection":
                paths += explain_detection(model, x, out_dir, score_threshold=score_threshold, max_boxes=max_boxes,
                                           label=target, **common)
            else:
                paths += explain_segmentation(model, x, out_dir, category=target, **common)
        except LumosError as err:
            if failures is None:
                raise
            failures.append((str(image), " ".join(str(err).split())))
    return paths


def explain_task(task: str, images: Sequence[Path], out: Path, *, model: str | None = None, method: str = "gradcam",
                 target: str = "top1", layer: str = "auto", save: str = "png", settings: Sequence[str] | None = None,
                 size: int | None = None, device: str = "auto", colormap: str = "jet", alpha: float = 0.5,
                 given: Collection[str] = ()) -> None:
    """``lumos explain --task detection|segmentation``: per image the boxes (or class regions) drawn, one overlay
    per box (region) and a gallery, for the shipped synthetic detector or segmenter.

    Honoured: ``--method`` (a folder per method when several), ``--target`` (a class name or index: its boxes /
    region only), ``--layer``, ``--save png,npy``, ``--set``, ``--size`` (default 64), ``--device``, ``--colormap``,
    ``--alpha``; ``--gallery`` is always honoured (a gallery per image). ``given``: the options the user set; one
    the task path cannot honour (:data:`NOT_FOR_TASKS`) is a one-line error. An image that cannot be read or
    explained is one ``error:`` line and the others go on; then the summary, and exit 1 (``typer.Exit``) when
    any image failed or none was explained."""
    import typer

    from lumos.cli_common import _check_out, _make_dir, _writing, err_console, out_console, parse_methods
    from lumos.explainer import resolve_device
    from lumos.io import find_images
    from lumos.layers import resolve_layers
    from lumos.method_settings import parse_settings
    from lumos.render import get_colormap
    from lumos.runner import SAVE_FORMATS, parse_list

    if task not in TASKS:
        raise LumosError(f"Unknown --task '{task}'; use classification, {' or '.join(TASKS)}.")
    shipped = "tinydetector" if task == "detection" else "tinysegmenter"
    if "--model" in given and (model or "").lower() != shipped:
        raise LumosError(f"--task {task} explains the shipped synthetic {task} model (--model {shipped}); for your own "
                         "model use lumos.tasks from Python (docs/detection.md).")
    for option, why in NOT_FOR_TASKS.items():
        if option in given:
            raise LumosError(f"{option} is not available with --task {task}: {why}.")
    methods = parse_methods(method)
    method_settings = parse_settings(list(settings or []), methods)
    formats = parse_list(save, SAVE_FORMATS, what="save format")
    if not 0 <= alpha <= 1:
        raise LumosError(f"--alpha must be between 0 and 1, got {alpha}.")
    try:
        get_colormap(colormap)
    except ValueError as err:
        raise LumosError(f"--colormap: {err}.") from None
    if size is not None and size < 8:
        raise LumosError(f"--size must be at least 8 pixels, got {size}.")
    net, names = task_model(task)
    if "--target" in given and target.strip().lower() == "top1":
        what = "box" if task == "detection" else "class region"
        raise LumosError(f"--target top1 is for classification; --task {task} explains every {what} when --target "
                         f"is left out, or give a class name or index ({', '.join(names)}).")
    label = task_class(target, names)
    if layer != "auto":
        resolve_layers(net, layer)  # a layer that does not exist: one line, before any image
    where = resolve_device(device)
    _check_out(out)
    files, problems = find_images(images)
    failures = [(str(p), f"{p}: {why}") for p, why in problems]
    written: list[Path] = []
    explained: set[str] = set()
    if files:
        _make_dir(out)
    with gather_shortfalls():  # a method's cap is said once for the run, not once per image
        for m in methods:
            mine: list[tuple[str, str]] = []
            with _writing(out):
                written += run_task(task, files, out / m if len(methods) > 1 else out, method=m, size=size or 64,
                                    layer=layer, target=label, save=formats, colormap=colormap, alpha=alpha,
                                    device=where, settings=method_settings.get(m), failures=mine)
            failed = {image for image, _ in mine}
            explained |= {str(f) for f in files if str(f) not in failed}
            prefix = f"{m}: " if len(methods) > 1 else ""
            failures += [(image, prefix + (why if image in why else f"{image}: {why}")) for image, why in mine]
    for _, reason in failures:
        err_console.print(f"error: {reason}", highlight=False, markup=False)
    out_console.print(f"Explained {len(explained)} image(s) with {len(methods)} method(s): {len(written)} file(s) in "
                      f"{out}/" + (f"; {len(failures)} failed" if failures else ""), highlight=False, markup=False)
    if failures or not explained:
        raise typer.Exit(1)


#: ``lumos explain`` parameter -> its option, for :func:`explain_task_from_context`
_OPTIONS = {"model": "--model", "method": "--method", "target": "--target", "layer": "--layer", "out": "--out",
            "save": "--save", "colormap": "--colormap", "alpha": "--alpha", "batch_size": "--batch-size",
            "gallery": "--gallery", "scale": "--scale", "captions": "--captions", "settings": "--set",
            "output": "--output", "probs": "--probs", "weights": "--weights", "size": "--size", "mean": "--mean",
            "std": "--std", "labels": "--labels", "device": "--device", "task": "--task"}


def explain_task_from_context(ctx: Any) -> None:
    """:func:`explain_task` with the options of the running ``lumos explain`` command (its click/typer context:
    values from ``ctx.params``; the options the user set, by their parameter source)."""
    p = ctx.params
    given = set()
    for name, option in _OPTIONS.items():
        source = ctx.get_parameter_source(name) if name in p else None
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(option)
    explain_task(p["task"], list(p["images"]), p["out"], model=p["model"], method=p["method"], target=p["target"],
                 layer=p["layer"], save=p["save"], settings=p["settings"], size=p["size"], device=p["device"],
                 colormap=p["colormap"], alpha=p["alpha"], given=given)
