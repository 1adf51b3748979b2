"""Score several explanation methods on one batch (any model), and the synthetic ground-truth benchmark.

``evaluate_methods`` is the engine behind ``lumos evaluate``: maps from each method (plus a ``random``
baseline), then faithfulness metrics, localisation metrics when ground truth is given, and optionally the
cascading randomisation test. ``synthetic_benchmark`` runs it on ``lumos.synthetic`` data with the
bundled TinyCNN, whose object masks are known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lumos.errors import LumosError
from lumos.evaluate._common import check_images, check_masks, check_model, resolve_classes, scoring
from lumos.evaluate.faithfulness import AverageDropIncrease, Deletion, Insertion
from lumos.evaluate.localisation import EnergyPointingGame, PointingGame, RelevanceMass
from lumos.evaluate.sanity import CascadingRandomisation, CascadingResult

log = logging.getLogger(__name__)

RANDOM = "random"
SYNTHETIC_MODELS = ("tinycnn", "vit")

#: True when a higher value is better.
DIRECTIONS: dict[str, bool] = {
    "pointing_game": True,
    "energy_pointing_game": True,
    "relevance_mass": True,
    "deletion_auc": False,
    "insertion_auc": True,
    "avg_drop": False,
    "avg_increase": True,
    "sanity_spearman": False,
    "sanity_ssim": False,
}


@dataclass
class EvaluationReport:
    """``rows[method][metric]`` = mean over images; ``curves[method]`` = mean deletion and insertion curves;
    ``per_image[method][metric]`` = the per-image values; ``sanity[method]`` = cascading randomisation;
    ``failures[method]`` = why a method could not run; ``meta`` = settings."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    per_image: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sanity: dict[str, CascadingResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: ``tie_order[method][metric]`` = the mean AUC with tied pixels taken in raster order instead of the seeded
    #: random order, for methods whose maps are mostly plateaus (:data:`PLATEAU_SHARE`); ``plateaus[method]`` =
    #: how many of its defined maps are such plateaus
    tie_order: dict[str, dict[str, float]] = field(default_factory=dict)
    plateaus: dict[str, int] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows.values():
            seen.update(dict.fromkeys(row))
        return list(seen)

    def best(self, decimals: int | None = 3) -> dict[str, str]:
        """Per metric (by :data:`DIRECTIONS`, NaN ignored), the method that is *strictly* best and better than
        the ``random`` baseline (where random has that metric). Values are compared rounded to ``decimals``
        places, as the table shows them (None: exactly). A tie for first place, or a best that does not beat
        random, gives no entry: every method at avg increase 0.000 has no best. Nor does a best that holds only
        in the seeded random order of tied pixels (:meth:`tie_dependent`; :meth:`withheld` names those)."""
        return self._best(decimals)[0]

    def withheld(self, decimals: int | None = 3) -> dict[str, str]:
        """Per metric, the method that would be best but for :meth:`tie_dependent` (no star in the table)."""
        return self._best(decimals)[1]

    def _best(self, decimals: int | None) -> tuple[dict[str, str], dict[str, str]]:
        def shown(v: float) -> float:
            return v if decimals is None else round(v, decimals)

        out, withheld = {}, {}
        baseline = self.rows.get(RANDOM, {})
        for metric in self.metrics:
            higher = DIRECTIONS.get(metric, True)
            vals = {m: shown(r[metric]) for m, r in self.rows.items()
                    if m != RANDOM and metric in r and r[metric] == r[metric]}
            if not vals:
                continue
            top = max(vals.values()) if higher else min(vals.values())
            winners = [m for m, v in vals.items() if v == top]
            base = baseline.get(metric, float("nan"))
            beats = base != base or (top > shown(base) if higher else top < shown(base))
            if len(winners) == 1 and beats:
                if self.tie_dependent(metric, winners[0], decimals):
                    withheld[metric] = winners[0]
                else:
                    out[metric] = winners[0]
        return out, withheld

    def tie_dependent(self, metric: str, method: str, decimals: int | None = 3) -> bool:
        """Whether ``method`` is strictly best on ``metric`` only because of how tied pixels are ordered: with
        them in raster order (:attr:`tie_order`, for every method re-measured so; the others' AUCs barely depend
        on it) it would not be strictly better than every other method."""
        alt = self.tie_order.get(method, {}).get(metric)
        if alt is None:
            return False
        higher = DIRECTIONS.get(metric, True)
        shown = (lambda v: v) if decimals is None else (lambda v: round(v, decimals))
        others = [shown(self.tie_order.get(m, {}).get(metric, r[metric])) for m, r in self.rows.items()
                  if m != method and metric in r and r[metric] == r[metric]]
        return any((v >= shown(alt)) if higher else (v <= shown(alt)) for v in others)


def method_maps(model: nn.Module, images: torch.Tensor, method: str, classes: torch.Tensor,
                layer: Any = "auto", seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """(B, H, W) maps of ``method`` (or ``"random"``: uniform noise) for ``classes`` (B,)."""
    if method == RANDOM:
        g = torch.Generator().manual_seed(seed)
        b, _, h, w = images.shape
        return torch.rand(b, h, w, generator=g).to(images.device)
    from lumos.api import method_class
    from lumos.methods.base import LayerMethod

    cls = method_class(method)
    explainer = cls(model, layer, **kwargs) if issubclass(cls, LayerMethod) else cls(model, **kwargs)
    maps = explainer(images, classes).maps
    if maps.shape[0] != images.shape[0]:
        raise LumosError(f"{method} returned {maps.shape[0]} maps for {images.shape[0]} images.")
    return maps.detach()


#: a map is "a plateau" when its largest set of equal values covers more than this share of its pixels; a method
#: gets its AUCs re-measured in raster tie order when at least :data:`PLATEAU_MAPS` of its defined maps are
PLATEAU_SHARE = 0.5
PLATEAU_MAPS = 0.1


def plateau_maps(curve: Any) -> int:
    """How many defined maps of ``curve`` (a :class:`CurveResult`) are plateaus; 0 when fewer than
    :data:`PLATEAU_MAPS` of them are."""
    if curve.plateau is None:
        return 0
    defined = ~curve.auc.isnan()
    count = int(((curve.plateau > PLATEAU_SHARE) & defined).sum())
    return count if count and count >= PLATEAU_MAPS * int(defined.sum()) else 0


def _mean(t: torch.Tensor) -> float:
    t = t.float()
    ok = ~t.isnan()
    return float(t[ok].mean()) if ok.any() else float("nan")


def mean_curve(curves: torch.Tensor) -> list[float]:
    """The mean curve over the images whose curve is defined (a constant map's is NaN)."""
    return torch.nanmean(curves.float(), 0).tolist()


def evaluate_methods(
    model: nn.Module,
    images: torch.Tensor,
    methods: Sequence[str],
    targets: Any = None,
    masks: torch.Tensor | None = None,
    *,
    layer: Any = "auto",
    steps: int = 100,
    batch_size: int = 64,
    tolerance: float = 15.0,
    random_baseline: bool = True,
    sanity: bool = False,
    sanity_images: int = 1,
    sanity_steps: int | None = 6,
    seed: int = 0,
    on_method: Callable[[str], None] | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvaluationReport:
    """Evaluate each method on ``images`` (model input space) and return an :class:`EvaluationReport`.

    Faithfulness (deletion / insertion AUC with ``steps``, average drop / increase) always; pointing game
    (with ``tolerance`` pixels), energy pointing game and relevance mass when ``masks`` (B, H, W) or boxes
    (B, 4) are given; with ``sanity`` the cascading randomisation on the first ``sanity_images`` images
    (maps recorded at ``sanity_steps`` points). A method that fails is reported in ``failures`` (and logged at
    INFO level, with the traceback at DEBUG), the others still run.
    ``method_kwargs`` maps a method name to extra constructor arguments (e.g. IG ``steps``).
    """
    model = check_model(model)
    x = check_images(images)
    gt = check_masks(masks, x) if masks is not None else None
    with scoring(model):
        classes = resolve_classes(model, x, targets)
    names = list(dict.fromkeys(methods)) + ([RANDOM] if random_baseline and RANDOM not in methods else [])
    deletion = Deletion(steps=steps, batch_size=batch_size)
    insertion = Insertion(steps=steps, batch_size=batch_size)
    raster = (Deletion(steps=steps, batch_size=batch_size, seed=None),
              Insertion(steps=steps, batch_size=batch_size, seed=None))  # ties in raster order: plateau maps only
    drop = AverageDropIncrease(batch_size=batch_size)
    report = EvaluationReport(meta={"steps": steps, "tolerance": tolerance, "images": int(x.shape[0]),
                                    "layer": str(layer), "seed": seed})
    for name in names:
        if on_method is not None:
            on_method(name)
        try:
            kwargs = dict((method_kwargs or {}).get(name, {}))
            maps = method_maps(model, x, name, classes, layer=layer, seed=seed, **kwargs)
            per: dict[str, torch.Tensor] = {}
            if gt is not None:
                per["pointing_game"] = PointingGame(tolerance=tolerance)(maps=maps, masks=gt)
                per["energy_pointing_game"] = EnergyPointingGame()(maps=maps, masks=gt)
                per["relevance_mass"] = RelevanceMass()(maps=maps, masks=gt)
            d = deletion(model, x, maps, classes)
            i = insertion(model, x, maps, classes)
            per["deletion_auc"], per["insertion_auc"] = d.auc, i.auc
            plateaus = plateau_maps(d)
            if plateaus:  # the AUCs may come from the tie rule more than from the map: measure the other order
                report.plateaus[name] = plateaus
                report.tie_order[name] = {f"{curve.kind}_auc": _mean(curve(model, x, maps, classes).auc)
                                          for curve in raster}
            r = drop(model, x, maps, classes)
            per["avg_drop"] = r.drop  # NaN where the map is constant (undefined), as are the AUCs
            per["avg_increase"] = r.increase.float().masked_fill(~r.defined, float("nan"))
            if sanity and name != RANDOM:
                k = min(sanity_images, x.shape[0])
                cascade = CascadingRandomisation(
                    lambda mdl, xx, cc, _n=name, _kw=kwargs: method_maps(mdl, xx, _n, cc, layer=layer, **_kw),
                    max_steps=sanity_steps,
                )(model, x[:k], targets=classes[:k])
                report.sanity[name] = cascade
                per_s = {"sanity_spearman": cascade.spearman[-1], "sanity_ssim": cascade.ssim[-1]}
            else:
                per_s = {}
        except LumosError as err:  # the reason goes into report.failures; the caller decides how to show it,
            report.failures[name] = str(err)  # so it is logged at INFO only (not a second warning)
            log.info("method %s failed: %s", name, err)
            continue
        except Exception as err:  # a method that cannot run on this model must not stop the others
            report.failures[name] = f"{type(err).__name__}: {err}"
            log.info("method %s failed: %s", name, report.failures[name], exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        per.update(per_s)
        report.rows[name] = {k: _mean(v) for k, v in per.items()}
        report.per_image[name] = {k: [float(t) for t in v.float()] for k, v in per.items()}
        report.curves[name] = {
            "fractions": d.fractions.tolist(),
            "deletion": mean_curve(d.curves),
            "insertion": mean_curve(i.curves),
        }
    return report


def synthetic_benchmark(
    methods: Sequence[str] | None = None,
    n: int = 100,
    seed: int = 123,
    *,
    steps: int = 64,
    batch_size: int = 128,
    tolerance: float = 2.0,
    sanity: bool = False,
    on_method: Callable[[str], None] | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    model: str = "tinycnn",
) -> EvaluationReport:
    """Every method (default: ``lumos.methods(general=True)``; for the ViT all of them) plus ``random`` on ``n``
    synthetic images (seed 123 is held out from training) with the bundled TinyCNN, explaining the true class at
    ``features.block4``;
    ``model="vit"``: the bundled TinyViT, CAMs at its token layer ``blocks.0`` (16 x 16 grid).

    The tolerance defaults to 2 px: one CAM cell spans 4 px of the 64 x 64 images (the usual 15 px is
    for 224 x 224 photos). ``device``: where the model and images go (``lumos.explainer.resolve_device``;
    None: the CPU).
    """
    from lumos.api import methods as all_methods
    from lumos.explainer import resolve_device
    from lumos.synthetic import load_tinycnn, make_dataset

    if model not in SYNTHETIC_MODELS:
        raise LumosError(f"The synthetic benchmark runs model {' or '.join(SYNTHETIC_MODELS)}, not '{model}'.")
    where = torch.device("cpu") if device is None else resolve_device(device)
    data = make_dataset(n, seed=seed)
    names = all_methods(general=model != "vit") if methods is None else methods
    layer = "features.block4"
    if model == "vit":
        from lumos.synthetic.vit import CAM_LAYER, load_tinyvit, token_map

        layer, net = CAM_LAYER, load_tinyvit().to(where)
        method_kwargs = {m: {"layout": token_map, **(method_kwargs or {}).get(m, {})} for m in names}
    else:
        net = load_tinycnn().to(where)
    report = evaluate_methods(
        net, data.images.to(where), names, data.labels.to(where),
        data.masks.to(where),
        layer=layer, steps=steps, batch_size=batch_size, tolerance=tolerance, sanity=sanity,
        sanity_images=4, sanity_steps=None, on_method=on_method, method_kwargs=method_kwargs,
    )
    report.meta.update({"benchmark": "synthetic", "n": n, "data_seed": seed, "model": model})
    return report
