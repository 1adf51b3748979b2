"""Per-class-region benchmark of explanation methods on a segmenter: the shipped TinySegmenter on held-out
synthetic scenes (the segmentation sibling of :mod:`lumos.evaluate.detection_benchmark`).

Which regions: per scene and class, the pixels the segmenter predicts as the class (its ``argmax``) when they
overlap the class's ground-truth pixels with IoU >= 0.5. Each such region is explained as
:class:`lumos.tasks.SegmentationTarget` (the sum of the class's logits over its predicted pixels) and scored
against the class's ground truth (one row per region in ``per_image``):

- ``pointing_game``: the map's maximum lies within ``tolerance`` pixels of the class's ground-truth pixels.
- ``energy_pointing_game``: share of the map's positive energy inside the tight box around those pixels.
- ``relevance_mass``: share of the map's positive energy on those pixels.
- ``discrimination``: over the other classes present in the scene, the share on whose ground-truth pixels the
  map puts less energy than on its own class's (NaN when the scene has one class).
- ``deletion_auc``: area under the mean probability (softmax) of the class over its predicted region while
  pixels are set to 0 in the map's order: lower is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lumos.errors import LumosError
from lumos.evaluate._common import check_positive
from lumos.evaluate.benchmark import RANDOM, EvaluationReport
from lumos.evaluate.detection_benchmark import DETECTION_METHODS, discrimination, method_settings, score_methods
from lumos.evaluate.faithfulness import CurveResult, Deletion
from lumos.evaluate.localisation import EnergyPointingGame, PointingGame, RelevanceMass
from lumos.targets import to_probabilities

SEGMENTATION_LAYER = "features.block5"
MATCH_IOU = 0.5


@dataclass
class FoundRegions:
    """One row per explained class region: its scene, class, ground-truth pixels and predicted region."""

    scene: torch.Tensor
    category: torch.Tensor
    masks: torch.Tensor
    regions: torch.Tensor

    def __len__(self) -> int:
        return int(self.scene.shape[0])


def match_regions(model: nn.Module, images: torch.Tensor, semantic: torch.Tensor, *, background: int = 0,
                  iou: float = MATCH_IOU) -> FoundRegions:
    """The classes (but ``background``) of each scene whose predicted pixels overlap the ground-truth pixels
    (``semantic`` (n, H, W) class per pixel) with IoU >= ``iou``."""
    with torch.no_grad():
        out = model(images)
    pred = out.argmax(1).cpu()
    rows = []
    for i in range(images.shape[0]):
        for c in semantic[i].unique().tolist():
            gt, pr = semantic[i] == c, pred[i] == c
            union = (gt | pr).sum()
            if c != background and union and float((gt & pr).sum() / union) >= iou:
                rows.append((i, c, gt, pr))
    h, w = images.shape[-2:]
    empty = torch.zeros(0, h, w, dtype=torch.bool)
    return FoundRegions(
        scene=torch.tensor([r[0] for r in rows], dtype=torch.long),
        category=torch.tensor([r[1] for r in rows], dtype=torch.long),
        masks=torch.stack([r[2] for r in rows]) if rows else empty,
        regions=torch.stack([r[3] for r in rows]) if rows else empty,
    )


class RegionProbability:
    """A callable target: per image, the mean softmax probability of its class (``categories`` (B,)) over its
    fixed ``regions`` (B, H, W) of a (B, classes, H, W) output (what a region's deletion curve follows)."""

    def __init__(self, categories: torch.Tensor, regions: torch.Tensor) -> None:
        self.categories, self.regions = categories, regions

    def select(self, index: torch.Tensor) -> RegionProbability:
        return RegionProbability(self.categories[index.cpu()], self.regions[index.cpu()])

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 4 or output.shape[0] != self.categories.shape[0]:
            raise LumosError(f"RegionProbability needs a ({self.categories.shape[0]}, classes, H, W) output; "
                             f"got {tuple(output.shape)}.")
        b, _, h, w = output.shape
        cats = self.categories.to(output.device)[:, None, None, None].expand(b, 1, h, w)
        p = to_probabilities(output, "softmax").gather(1, cats)[:, 0]  # the one probability decision (targets)
        region = self.regions.to(output.device, p.dtype)
        return (p * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def region_maps(model: nn.Module, images: torch.Tensor, found: FoundRegions, method: str, *,
                layer: Any = SEGMENTATION_LAYER, group: int = 32, seed: int = 0, **settings: Any) -> torch.Tensor:
    """(regions, H, W) maps of ``method`` (or ``"random"``) for every found region; the scenes holding one class
    are explained together, ``group`` at a time."""
    from lumos.api import explain
    from lumos.tasks import SegmentationTarget

    n, (h, w) = len(found), images.shape[-2:]
    if method == RANDOM:
        return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)).to(images.device)
    out = torch.zeros(n, h, w, device=images.device)
    for c in found.category.unique().tolist():
        for rows in (found.category == c).nonzero()[:, 0].split(group):
            x = images[found.scene[rows].to(images.device)]
            maps = explain(model, x, method, target=SegmentationTarget(c), layer=layer, **settings).maps
            out[rows.to(out.device)] = maps.detach().float().to(out.device)
    return out


def region_localisation(maps: torch.Tensor, found: FoundRegions, semantic: torch.Tensor, tolerance: float = 2.0,
                        background: int = 0) -> dict[str, torch.Tensor]:
    """Pointing game, energy in the box and on the pixels, and discrimination of each region's map (n, H, W)."""
    classes = int(semantic.max()) + 1
    others = semantic[found.scene][:, None] == torch.arange(classes)[None, :, None, None]  # (n, classes, H, W)
    others[torch.arange(len(found)), found.category] = False
    others[:, background] = False
    return {
        "pointing_game": PointingGame(tolerance=tolerance)(maps=maps, masks=found.masks),
        "energy_pointing_game": EnergyPointingGame(use_box=True)(maps=maps, masks=found.masks),
        "relevance_mass": RelevanceMass()(maps=maps, masks=found.masks),
        "discrimination": discrimination(maps, found.masks, others),
    }


def region_deletion(model: nn.Module, images: torch.Tensor, found: FoundRegions, maps: torch.Tensor, *,
                    steps: int = 64, batch_size: int = 128, seed: int | None = 0) -> CurveResult:
    """Deletion curves (one row per region) of the class's mean probability over its predicted region (tied
    pixels ordered by ``seed``; None: raster order)."""
    target = RegionProbability(found.category, found.regions)
    x = images[found.scene.to(images.device)]
    return Deletion(steps=steps, batch_size=batch_size, seed=seed)(model, x, maps, target)


def segmentation_benchmark(
    methods: Sequence[str] | None = None,
    n: int = 100,
    seed: int = 123,
    *,
    steps: int = 64,
    batch_size: int = 128,
    tolerance: float = 2.0,
    layer: Any = SEGMENTATION_LAYER,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    on_method: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    skip_unsupported: bool = False,
    random_baseline: bool = True,
) -> EvaluationReport:
    """The per-class-region benchmark of the shipped TinySegmenter on ``n`` synthetic scenes (seed 123: held out),
    layer ``features.block5``, the detection benchmark's default methods and settings (see the module docstring;
    the arguments are :func:`lumos.evaluate.detection_benchmark.detection_benchmark`'s)."""
    from lumos.api import explain
    from lumos.explainer import resolve_device
    from lumos.synthetic.scenes import make_scenes
    from lumos.synthetic.segmenter import load_tinysegmenter
    from lumos.tasks import SegmentationTarget

    check_positive("n", n)
    check_positive("steps", steps)
    where = torch.device("cpu") if device is None else resolve_device(device)
    scenes = make_scenes(n, seed=seed)
    model = load_tinysegmenter().to(where)
    images = scenes.images.to(where)
    found = match_regions(model, images, scenes.semantic)
    if not len(found):
        raise LumosError("The segmenter matched none of the ground-truth class regions: nothing to explain.")
    chosen = DETECTION_METHODS if methods is None else methods
    names = list(dict.fromkeys(chosen)) + ([RANDOM] if random_baseline and RANDOM not in chosen else [])
    x0, first = images[found.scene[:1].to(where)], SegmentationTarget(int(found.category[0]))
    gt_regions = sum(int((scenes.semantic[i].unique() > 0).sum()) for i in range(n))
    meta = {"benchmark": "synthetic-segmentation", "n": n, "data_seed": seed, "model": "tinysegmenter",
            "steps": steps, "tolerance": tolerance, "images": int(found.scene.unique().numel()),
            "regions": len(found), "objects": gt_regions, "layer": str(layer), "match_iou": MATCH_IOU,
            "region_scene": found.scene.tolist(), "region_class": found.category.tolist()}
    return score_methods(
        names, method_settings(names, method_kwargs), what="a segmentation class region", meta=meta,
        on_method=on_method, skip_unsupported=skip_unsupported,
        probe=lambda name, kw: explain(model, x0, name, target=first, layer=layer, **kw),
        maps_of=lambda name, kw: region_maps(model, images, found, name, layer=layer, **kw),
        localise=lambda maps: region_localisation(maps, found, scenes.semantic, tolerance),
        delete=lambda maps, seed=0: region_deletion(model, images, found, maps, steps=steps, batch_size=batch_size,
                                                    seed=seed),
    )
