"""Per-box benchmark of explanation methods on a detector: the shipped TinyDetector on held-out synthetic scenes.

Which boxes: on each scene the detector's detections (score >= 0.5, class-wise NMS at 0.3) are matched to the
ground-truth objects: an object is *found* when a detection of its class overlaps its box with IoU >= 0.5 (the
best such detection, each used once). Every found object's detected box is explained (a
:class:`lumos.tasks.DetectionTarget`: the box's class score, IoU-matched on every perturbed copy) and scored
against that object (one row per box in ``per_image``):

- ``pointing_game``: the map's maximum lies within ``tolerance`` pixels of the object's ground-truth box (the
  convention of the classification benchmark: 2 px on 64 x 64 images, one CAM cell is 4 px).
- ``energy_pointing_game``: share of the map's positive energy inside the object's box.
- ``relevance_mass``: share of the map's positive energy inside the object's mask.
- ``discrimination``: over the other ground-truth objects B of the scene, the share for which the box's map puts
  more energy on its own object A than on B (per-instance discrimination; NaN for a scene's only object).
- ``deletion_auc``: area under the box's score while pixels are set to 0 in the map's order (``steps`` steps;
  the box is followed by IoU matching, 0 once it is gone): lower is better.

A ``random`` row (uniform noise maps) is the baseline. The result is an
:class:`~lumos.evaluate.benchmark.EvaluationReport`, so the table, reading, CSV and JSON writers apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lumos.errors import LumosError
from lumos.evaluate._common import check_positive
from lumos.evaluate.benchmark import RANDOM, EvaluationReport, _mean, mean_curve, plateau_maps
from lumos.evaluate.faithfulness import CurveResult, Deletion
from lumos.evaluate.localisation import PointingGame, RelevanceMass

log = logging.getLogger(__name__)

DETECTION_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "scorecam", "occlusion", "rise")
#: Settings that suit 64 x 64 scenes (docs/detection.md); ``method_kwargs`` override them.
DETECTION_SETTINGS: dict[str, dict[str, Any]] = {"occlusion": {"window": 8, "stride": 4},
                                                  "rise": {"n_masks": 500, "cell": 8}}
DETECTION_LAYER = "features.block5"
MATCH_IOU = 0.5


@dataclass
class FoundBoxes:
    """One row per explained box: the scene it is in, the detection (box, class, score) and the ground-truth
    object it was matched to (its slot in the scene, box and mask)."""

    scene: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    slot: torch.Tensor
    gt_boxes: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.scene.shape[0])


def match_boxes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
                masks: torch.Tensor, *, score_threshold: float = 0.5, nms_iou: float = 0.3,
                iou: float = MATCH_IOU) -> FoundBoxes:
    """The detections of ``model`` on ``images`` that find a ground-truth object (``labels`` (n, M), -1 = empty
    slot; ``boxes`` (n, M, 4); ``masks`` (n, M, H, W)): same class and IoU >= ``iou``, best IoU first, each
    detection used once."""
    from lumos.tasks import box_iou, detections

    rows: list[tuple[int, torch.Tensor, int, float, int]] = []
    with torch.no_grad():
        found = detections(model(images), score_threshold, nms_iou)
    for i, (det_boxes, det_labels, det_scores) in enumerate(found):
        slots = (labels[i] >= 0).nonzero()[:, 0]
        if not len(det_boxes) or not len(slots):
            continue
        overlap = box_iou(boxes[i, slots].to(det_boxes), det_boxes)  # (objects, detections)
        overlap = overlap * (labels[i, slots, None].to(det_labels) == det_labels[None]).float()
        used_det: set[int] = set()
        used_obj: set[int] = set()
        for flat in overlap.flatten().argsort(descending=True, stable=True).tolist():
            o, d = divmod(flat, overlap.shape[1])
            if overlap[o, d] < iou:
                break
            if d in used_det or o in used_obj:
                continue
            used_det.add(d)
            used_obj.add(o)
            rows.append((i, det_boxes[d], int(det_labels[d]), float(det_scores[d]), int(slots[o])))
    rows.sort(key=lambda r: (r[0], r[4]))
    scene = torch.tensor([r[0] for r in rows], dtype=torch.long)
    slot = torch.tensor([r[4] for r in rows], dtype=torch.long)
    h, w = images.shape[-2:]
    return FoundBoxes(
        scene=scene,
        boxes=torch.stack([r[1] for r in rows]).cpu() if rows else torch.zeros(0, 4),
        labels=torch.tensor([r[2] for r in rows], dtype=torch.long),
        scores=torch.tensor([r[3] for r in rows]),
        slot=slot,
        gt_boxes=boxes[scene, slot].cpu() if rows else torch.zeros(0, 4),
        masks=masks[scene, slot].cpu() if rows else torch.zeros(0, h, w, dtype=torch.bool),
    )


# -- per-box localisation -----------------------------------------------------------------------------------
def discrimination(maps: torch.Tensor, own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Per map (n, H, W): the share of the ``others`` masks (n, M, H, W; all-False = no object) on which the map
    puts strictly less positive energy than on its ``own`` mask (n, H, W); NaN when there is no other object."""
    pos = maps.float().clamp_min(0)
    total = pos.flatten(1).sum(1).clamp_min(1e-12)
    on_own = (pos * own).flatten(1).sum(1) / total
    on_other = (pos[:, None] * others).flatten(2).sum(2) / total[:, None]
    valid = others.flatten(2).any(2)
    wins = ((on_own[:, None] > on_other) & valid).sum(1).float()
    count = valid.sum(1)
    return torch.where(count > 0, wins / count.clamp_min(1), torch.full_like(wins, float("nan")))


def box_localisation(maps: torch.Tensor, found: FoundBoxes, scene_masks: torch.Tensor,
                     tolerance: float = 2.0) -> dict[str, torch.Tensor]:
    """Pointing game, energy in the box and in the mask, and discrimination of each box's map (n, H, W);
    ``scene_masks`` (scenes, M, H, W) are every object's mask (the other objects of a box's scene)."""
    others = scene_masks[found.scene].clone()
    others[torch.arange(len(found)), found.slot] = False
    return {
        "pointing_game": PointingGame(tolerance=tolerance)(maps=maps, masks=found.gt_boxes),
        "energy_pointing_game": RelevanceMass()(maps=maps, masks=found.gt_boxes),
        "relevance_mass": RelevanceMass()(maps=maps, masks=found.masks),
        "discrimination": discrimination(maps, found.masks, others),
    }


# -- maps ---------------------------------------------------------------------------------------------------
def box_maps(model: nn.Module, images: torch.Tensor, found: FoundBoxes, method: str, *, layer: Any = DETECTION_LAYER,
             group: int = 32, seed: int = 0, **settings: Any) -> torch.Tensor:
    """(boxes, H, W) maps of ``method`` (or ``"random"``: uniform noise) for every found box. Scenes with the same
    number of boxes are explained together, ``group`` at a time (one forward, a gradient pass per box rank);
    a method that takes one box at a time (SmoothGrad) gets one call per box rank."""
    from lumos.api import explain
    from lumos.targets import TargetError
    from lumos.tasks import DetectionTarget

    n, (h, w) = len(found), images.shape[-2:]
    if method == RANDOM:
        return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)).to(images.device)
    out = torch.zeros(n, h, w, device=images.device)
    scenes, counts = found.scene.unique(return_counts=True)
    for k in counts.unique().tolist():
        same = scenes[counts == k]
        for chunk in same.split(group):
            rows = torch.cat([(found.scene == s).nonzero()[:, 0] for s in chunk.tolist()])  # scene-major, k each
            target = DetectionTarget(found.boxes[rows].view(-1, k, 4), found.labels[rows].view(-1, k))
            x = images[chunk.to(images.device)]
            try:
                maps = explain(model, x, method, target=target, layer=layer, **settings).maps
            except TargetError:
                if k == 1:
                    raise
                maps = torch.stack([explain(model, x, method, target=target.box(j), layer=layer, **settings).maps
                                    for j in range(k)], 1).flatten(0, 1)
            if maps.shape[0] != len(rows):
                raise LumosError(f"{method} returned {maps.shape[0]} maps for {len(rows)} boxes.")
            out[rows.to(out.device)] = maps.detach().float().to(out.device)
    return out


def box_deletion(model: nn.Module, images: torch.Tensor, found: FoundBoxes, maps: torch.Tensor, *,
                 steps: int = 64, batch_size: int = 128, seed: int | None = 0) -> CurveResult:
    """Deletion curves of each box's score (a :class:`~lumos.evaluate.faithfulness.CurveResult`, one row per box):
    its scene's pixels set to 0 in the order of its map (tied pixels by ``seed``, None: raster order); the box is
    followed by IoU matching."""
    from lumos.tasks import DetectionTarget

    target = DetectionTarget(found.boxes[:, None], found.labels[:, None])
    x = images[found.scene.to(images.device)]
    return Deletion(steps=steps, batch_size=batch_size, seed=seed)(model, x, maps, target)


def score_methods(
    names: Sequence[str], settings: Mapping[str, Mapping[str, Any]], *, what: str,
    probe: Callable[[str, Mapping[str, Any]], object], maps_of: Callable[[str, Mapping[str, Any]], torch.Tensor],
    localise: Callable[[torch.Tensor], dict[str, torch.Tensor]], delete: Callable[..., CurveResult],
    meta: dict[str, Any], on_method: Callable[[str], None] | None = None, skip_unsupported: bool = False,
) -> EvaluationReport:
    """The loop shared by the task benchmarks: ``probe`` each method on one item (one that fails is a one-line
    :class:`LumosError` "NAME cannot explain ``what``", or with ``skip_unsupported`` a ``report.failures``
    entry), then per method its maps, ``localise(maps)`` and ``delete(maps)`` (a CurveResult) per item; a method
    whose maps are mostly plateaus is also scored with ``delete(maps, seed=None)`` (ties in raster order:
    :meth:`EvaluationReport.tie_dependent`)."""
    failures: dict[str, str] = {}
    for name in names:
        if name == RANDOM:
            continue
        try:
            probe(name, settings[name])
        except Exception as err:
            why = str(err) if isinstance(err, LumosError) else f"{type(err).__name__}: {err}"
            if not skip_unsupported:
                raise LumosError(f"{name} cannot explain {what}: {why}") from None
            failures[name] = why
            log.info("method %s cannot explain %s: %s", name, what, why)
    report = EvaluationReport(failures=failures, meta={**meta, "settings": dict(settings)})
    for name in [m for m in names if m not in failures]:
        if on_method is not None:
            on_method(name)
        maps = maps_of(name, settings[name])
        if not torch.isfinite(maps).all():
            raise LumosError(f"{name} gave non-finite maps explaining {what}.")
        per = localise(maps.cpu())
        curve = delete(maps)
        per["deletion_auc"] = curve.auc.cpu()
        plateaus = plateau_maps(curve)
        if plateaus:
            report.plateaus[name] = plateaus
            report.tie_order[name] = {"deletion_auc": _mean(delete(maps, seed=None).auc.cpu())}
        report.rows[name] = {k: _mean(v) for k, v in per.items()}
        report.per_image[name] = {k: [float(t) for t in v.float()] for k, v in per.items()}
        report.curves[name] = {"fractions": curve.fractions.tolist(), "deletion": mean_curve(curve.curves)}
    return report


def method_settings(names: Sequence[str], method_kwargs: Mapping[str, Mapping[str, Any]] | None
                    ) -> dict[str, dict[str, Any]]:
    """Each method's settings: :data:`DETECTION_SETTINGS` overridden by ``method_kwargs``."""
    return {m: {**DETECTION_SETTINGS.get(m, {}), **(method_kwargs or {}).get(m, {})} for m in names}


def evaluate_boxes(
    model: nn.Module, images: torch.Tensor, found: FoundBoxes, scene_masks: torch.Tensor,
    methods: Sequence[str], *, layer: Any = DETECTION_LAYER, steps: int = 64, batch_size: int = 128,
    tolerance: float = 2.0, seed: int = 0, random_baseline: bool = True,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None, on_method: Callable[[str], None] | None = None,
    skip_unsupported: bool = False,
) -> EvaluationReport:
    """Score every method (plus ``random``) on the ``found`` boxes of ``images`` (see the module docstring).

    Every method is first run on one box: one that cannot explain a box of this detector is a one-line
    :class:`LumosError` naming it, before the long work (with ``skip_unsupported``: its reason goes into
    ``report.failures`` and the others run)."""
    from lumos.api import explain
    from lumos.tasks import DetectionTarget

    check_positive("steps", steps)
    if not len(found):
        raise LumosError("The detector found none of the ground-truth objects: no box to explain.")
    names = list(dict.fromkeys(methods)) + ([RANDOM] if random_baseline and RANDOM not in methods else [])
    first = DetectionTarget(found.boxes[:1], found.labels[:1])
    x0 = images[found.scene[:1].to(images.device)]
    meta = {"steps": steps, "tolerance": tolerance, "images": int(found.scene.unique().numel()), "boxes": len(found),
            "layer": str(layer), "seed": seed, "match_iou": MATCH_IOU,
            "box_scene": found.scene.tolist(), "box_label": found.labels.tolist()}
    return score_methods(
        names, method_settings(names, method_kwargs), what="a detector box", meta=meta, on_method=on_method,
        skip_unsupported=skip_unsupported,
        probe=lambda name, kw: explain(model, x0, name, target=first, layer=layer, **kw),
        maps_of=lambda name, kw: box_maps(model, images, found, name, layer=layer, seed=seed, **kw),
        localise=lambda maps: box_localisation(maps, found, scene_masks, tolerance),
        delete=lambda maps, seed=0: box_deletion(model, images, found, maps, steps=steps, batch_size=batch_size,
                                                 seed=seed),
    )


def detection_benchmark(
    methods: Sequence[str] | None = None,
    n: int = 100,
    seed: int = 123,
    *,
    steps: int = 64,
    batch_size: int = 128,
    tolerance: float = 2.0,
    layer: Any = DETECTION_LAYER,
    score_threshold: float = 0.5,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    on_method: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    skip_unsupported: bool = False,
) -> EvaluationReport:
    """The per-box benchmark of the shipped TinyDetector on ``n`` synthetic scenes (seed 123: held out from
    training), layer ``features.block5``, methods ``DETECTION_METHODS`` by default (occlusion window 8 stride 4,
    RISE 500 masks of cell 8). Detections at ``score_threshold`` matched to objects at IoU >= 0.5. The other
    arguments are :func:`evaluate_boxes`'s; ``device``: where the model and images go (None: the CPU)."""
    from lumos.explainer import resolve_device
    from lumos.synthetic.detector import load_tinydetector
    from lumos.synthetic.scenes import make_scenes

    check_positive("n", n)
    where = torch.device("cpu") if device is None else resolve_device(device)
    scenes = make_scenes(n, seed=seed)
    model = load_tinydetector().to(where)
    images = scenes.images.to(where)
    found = match_boxes(model, images, scenes.labels, scenes.boxes, scenes.masks, score_threshold=score_threshold)
    report = evaluate_boxes(model, images, found, scenes.masks, DETECTION_METHODS if methods is None else methods,
                            layer=layer, steps=steps, batch_size=batch_size, tolerance=tolerance,
                            method_kwargs=method_kwargs, on_method=on_method, skip_unsupported=skip_unsupported)
    report.meta.update({"benchmark": "synthetic-detection", "n": n, "data_seed": seed, "model": "tinydetector",
                        "objects": int((scenes.labels >= 0).sum()), "score_threshold": score_threshold})
    return report


def plot_deletion(report: EvaluationReport, path: str | Path) -> Path:
    """Mean deletion curve of the explained boxes' scores (or class regions' probabilities) per method, AUC in
    the legend (random dashed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lumos.evaluate.report import finish_curve_axes, save_figure

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    cmap = plt.get_cmap("tab20")
    colours = [cmap(i) for i in range(20) if i not in (14, 15)]  # tab20's greys are random's
    for j, (method, c) in enumerate(report.curves.items()):
        auc = report.rows[method].get("deletion_auc", float("nan"))
        style = {"color": "0.5", "linestyle": "--"} if method == RANDOM else {"color": colours[(2 * j) % 18]}
        ax.plot(c["fractions"], c["deletion"], label=f"{method} ({auc:.3f})", **style)
    boxes = report.meta.get("benchmark") != "synthetic-segmentation"
    ax.set_title(f"{'box' if boxes else 'class-region'} deletion (lower AUC is better)")
    ax.set_xlabel("fraction of pixels removed (map order)")
    ax.set_ylabel("score of the explained box (IoU-matched)" if boxes else "mean class probability over the region")
    finish_curve_axes(ax)
    fig.tight_layout()
    save_figure(fig, path)
    return path
