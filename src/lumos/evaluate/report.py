"""Write an :class:`~lumos.evaluate.benchmark.EvaluationReport`: text table, a plain-language reading (which
method to use for this model), CSV, JSON, curve and sanity PNGs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lumos.errors import LumosError
from lumos.evaluate.benchmark import DIRECTIONS, RANDOM, EvaluationReport
from lumos.methods import display_name

LABELS = {
    "pointing_game": "pointing game",
    "energy_pointing_game": "energy PG",
    "relevance_mass": "relevance mass",
    "deletion_auc": "deletion AUC",
    "insertion_auc": "insertion AUC",
    "avg_drop": "avg drop",
    "avg_increase": "avg increase",
    "sanity_spearman": "rand. Spearman",
    "sanity_ssim": "rand. SSIM",
}


def header(metric: str) -> str:
    """Column title with the better direction: ``deletion AUC ↓``."""
    return f"{LABELS.get(metric, metric)} {'↑' if DIRECTIONS.get(metric, True) else '↓'}"


def table_rows(report: EvaluationReport, mark: str = "*") -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings (method display names × metric); a column's value carries ``mark`` only when
    its method is strictly best there and better than random (:meth:`EvaluationReport.best`)."""
    metrics = report.metrics
    best = report.best()
    rows = []
    for method, row in report.rows.items():
        cells = [display_name(method)]
        for m in metrics:
            v = row.get(m, float("nan"))
            text = "-" if v != v else f"{v:.3f}"
            cells.append(text + (mark if best.get(m) == method else ""))
        rows.append(cells)
    return ["method", *map(header, metrics)], rows


STAR_NOTE = "(* = strictly best in its column and better than random; no star for a tie)"


def undefined_note(report: EvaluationReport, unit: str = "images") -> str | None:
    """One line naming the methods with constant (blank) maps, whose deletion AUC and other map-dependent scores are
    undefined (NaN) and left out of the table's means; None when there are none. The means of such a method cover
    fewer items than the others', which the table alone would not show."""
    parts = []
    for method, per in report.per_image.items():
        values = per.get("deletion_auc")
        if values:
            blank = sum(1 for v in values if v != v)
            if blank:
                parts.append(f"{method} {blank} of {len(values)}")
    if not parts:
        return None
    return (f"Constant (blank) maps, undefined and left out of the means: {', '.join(parts)} {unit}.")


def tie_note(report: EvaluationReport) -> str | None:
    """One line per deletion/insertion column whose best method gets no star because its lead holds only in the
    seeded random order of tied pixels (:meth:`EvaluationReport.tie_dependent`); None when there is none."""
    lines = []
    for metric, method in report.withheld().items():
        shown = report.rows[method][metric]
        alt = report.tie_order[method][metric]
        word = "highest" if DIRECTIONS.get(metric, True) else "lowest"
        lines.append(f"{LABELS.get(metric, metric)}: no star for {display_name(method)}: its {shown:.3f} depends on "
                     f"the order of tied pixels ({alt:.3f} in raster order, not the {word} there); "
                     f"{report.plateaus[method]} of its maps are one value over more than half the image "
                     f"(docs/evaluation.md).")
    return "\n".join(lines) or None


def format_table(report: EvaluationReport) -> str:
    """A plain-text table (a column's strict best, when it beats random, marked ``*``)."""
    head, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


# -- the reading: which method to use for this model ---------------------------------------------------------
FAITHFULNESS = ("deletion_auc", "insertion_auc", "avg_drop", "avg_increase")
LOCALISATION = ("pointing_game", "energy_pointing_game", "relevance_mass")
SANITY_LIMIT = 0.5  # rank correlation with the original map after full randomisation above this: a failed check


@dataclass
class Reading:
    """What the table says, in words. Names are registered method names.

    ``most_faithful`` / ``best_localised``: the methods with the best mean rank over the faithfulness /
    localisation metrics (several when tied; empty when the report has no such metric or no method beats
    random); ``not_above_random``: methods that are better than the random baseline on no more metrics than
    they are worse; ``fails_sanity``: methods whose map stays similar (Spearman > 0.5) when the model's weights
    are all randomised; ``recommended``: among the others, the best mean of the two ranks (several when tied).
    """

    most_faithful: list[str] = field(default_factory=list)
    best_localised: list[str] = field(default_factory=list)
    not_above_random: list[str] = field(default_factory=list)
    fails_sanity: list[str] = field(default_factory=list)
    recommended: list[str] = field(default_factory=list)
    images: int | None = None
    benchmark: str | None = None
    faithful_on: list[str] = field(default_factory=lambda: list(FAITHFULNESS))  # the faithfulness metrics present


#: how :func:`format_reading` names the faithfulness metrics
_FAITHFUL_WORDS = {"deletion_auc": "deletion", "insertion_auc": "insertion", "avg_drop": "average drop/increase",
                   "avg_increase": "average drop/increase"}


def _ranks(report: EvaluationReport, methods: list[str], metrics: tuple[str, ...]) -> dict[str, float]:
    """Mean rank (1 = best; ties share the mean of their places, values compared as the table shows them)
    of each method over the ``metrics`` it has a value for; methods with none are left out."""
    total: dict[str, list[float]] = {m: [] for m in methods}
    for metric in metrics:
        higher = DIRECTIONS.get(metric, True)
        vals = {m: round(report.rows[m][metric], 3) for m in methods
                if metric in report.rows[m] and report.rows[m][metric] == report.rows[m][metric]}
        for m, v in vals.items():
            better = sum(1 for w in vals.values() if (w > v if higher else w < v))
            same = sum(1 for w in vals.values() if w == v)
            total[m].append(better + (same + 1) / 2)
    return {m: sum(r) / len(r) for m, r in total.items() if r}


def _beats_random(report: EvaluationReport, method: str,
                  metrics: tuple[str, ...] = (*FAITHFULNESS, *LOCALISATION)) -> bool | None:
    """Better than random on more of ``metrics`` than worse (None: no random baseline to compare with)."""
    base = report.rows.get(RANDOM)
    if base is None:
        return None
    wins = losses = 0
    for metric in metrics:
        a, b = report.rows[method].get(metric, float("nan")), base.get(metric, float("nan"))
        if a != a or b != b:
            continue
        a, b = round(a, 3), round(b, 3)
        if a != b:
            wins += (a > b) == DIRECTIONS.get(metric, True)
            losses += (a > b) != DIRECTIONS.get(metric, True)
    return wins > losses


def _top(scores: dict[str, float]) -> list[str]:
    if not scores:
        return []
    low = min(scores.values())
    return [m for m, v in scores.items() if v <= low + 1e-9]


def read_report(report: EvaluationReport) -> Reading:
    """The plain-language reading of ``report``: which method is most faithful and best localised *for this
    model and these images*, which do not beat random, which fail the sanity check, and which to use."""
    methods = [m for m in report.rows if m != RANDOM]
    images = report.meta.get("images")
    reading = Reading(images=len(images) if isinstance(images, list) else images,
                      benchmark=report.meta.get("benchmark"))
    reading.not_above_random = [m for m in methods if _beats_random(report, m) is False]
    reading.fails_sanity = [m for m in methods if report.rows[m].get("sanity_spearman", 0.0) > SANITY_LIMIT]
    trusted = [m for m in methods if m not in reading.not_above_random]
    faithful = _ranks(report, trusted, FAITHFULNESS)
    localised = _ranks(report, trusted, LOCALISATION)
    # named best on a kind of metric only when also better than random on that kind (not just overall)
    reading.most_faithful = [m for m in _top(faithful) if _beats_random(report, m, FAITHFULNESS) is not False]
    reading.best_localised = [m for m in _top(localised) if _beats_random(report, m, LOCALISATION) is not False]
    reading.faithful_on = [k for k in FAITHFULNESS if any(k in report.rows[m] for m in methods)]
    usable = [m for m in trusted if m not in reading.fails_sanity]
    overall = {m: (faithful[m] + localised[m]) / 2 if m in localised else faithful[m]
               for m in usable if m in faithful}
    reading.recommended = _top(overall)
    return reading


def _names(methods: list[str], joiner: str = "and") -> str:
    shown = [display_name(m) for m in methods]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} {joiner} {shown[-1]}"


def format_reading(reading: Reading, how: Callable[[list[str]], str] | None = None) -> list[str]:
    """The reading as short lines for a person. ``how(names)`` says how to ask for the recommended methods
    (the command line passes ``--method NAME``); by default their registered names."""
    how = how or (lambda names: ", ".join(names))
    lines = []
    if reading.most_faithful:
        tied = " (tied)" if len(reading.most_faithful) > 1 else ""
        words = list(dict.fromkeys(_FAITHFUL_WORDS[k] for k in reading.faithful_on))
        on = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
        lines.append(f"Most faithful here: {_names(reading.most_faithful)}{tied} (best average rank on {on}: the "
                     "pixels its maps mark matter most to the model).")
    if reading.best_localised:
        tied = " (tied)" if len(reading.best_localised) > 1 else ""
        lines.append(f"Best localised: {_names(reading.best_localised)}{tied} (best average rank on the pointing game, "
                     "energy and relevance mass: its maps fall on the object itself).")
    if reading.not_above_random:
        lines.append(f"Not better than random maps here: {_names(reading.not_above_random)}; do not trust "
                     f"{'its' if len(reading.not_above_random) == 1 else 'their'} maps for this model.")
    if reading.fails_sanity:
        lines.append(f"Fails the sanity check: {_names(reading.fails_sanity)} (the map barely changes when the "
                     "model's weights are randomised: it shows the image more than the model).")
    if reading.recommended:
        lines.append(f"Recommended for this model: {_names(reading.recommended, 'or')} "
                     f"({how(reading.recommended)}).")
    else:
        lines.append("No method can be recommended here: none is better than random maps (and passes the sanity "
                     "check) on this model and these images.")
    if reading.benchmark is None and reading.images is not None and reading.images < 10:
        lines.append(f"Based on {reading.images} image(s): a rough guide; evaluate 10 or more for a firmer answer.")
    return lines


def _open(path: Path, mode: str = "w"):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode, newline="", encoding="utf-8")
    except OSError as err:
        raise LumosError(f"Cannot write {path}: {err.strerror or err}.") from None


def write_csv(report: EvaluationReport, path: str | Path) -> Path:
    """One row per method, one column per metric (means over images)."""
    path = Path(path)
    metrics = report.metrics
    with _open(path) as f:
        w = csv.writer(f)
        w.writerow(["method", *metrics])
        for method, row in report.rows.items():
            w.writerow([method, *(row.get(m, "") for m in metrics)])
    return path


def _clean(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def to_dict(report: EvaluationReport) -> dict:
    """Everything in the report as JSON-ready data (NaN becomes null)."""
    return _clean({
        "meta": report.meta,
        "directions": {m: "higher" if DIRECTIONS.get(m, True) else "lower" for m in report.metrics},
        "best": report.best(),
        "reading": asdict(read_report(report)),
        "metrics": report.rows,
        "per_image": report.per_image,
        "curves": report.curves,
        "sanity": {
            name: {"layers": s.layers, "spearman": torch.nanmean(s.spearman, 1).tolist(),
                   "ssim": torch.nanmean(s.ssim, 1).tolist()}
            for name, s in report.sanity.items()
        },
        "failures": report.failures,
        "tie_order": report.tie_order,
        "plateaus": report.plateaus,
        "withheld": report.withheld(),
    })


def write_json(report: EvaluationReport, path: str | Path) -> Path:
    path = Path(path)
    with _open(path) as f:
        json.dump(to_dict(report), f, indent=2)
    return path


def plot_curves(report: EvaluationReport, path: str | Path) -> Path:
    """Mean deletion and insertion curves of every method side by side, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colours = plt.get_cmap("tab20" if len(report.curves) > 10 else "tab10")
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for j, (method, c) in enumerate(report.curves.items()):
            auc = report.rows[method].get(f"{kind}_auc", float("nan"))
            style = {"color": "0.5", "linestyle": "--"} if method == "random" else {"color": colours(j)}
            ax.plot(c["fractions"], c[kind], label=f"{method} ({auc:.3f})", **style)
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the target class")
        finish_curve_axes(ax)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_sanity(report: EvaluationReport, path: str | Path, image: np.ndarray | None = None) -> Path:
    """Adebayo-style figure: one row per method, the original map then the map after each cascading
    randomisation step (first image), titled with the layer and the Spearman correlation."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not report.sanity:
        raise LumosError("The report has no sanity-check results; run with sanity=True.")
    path = Path(path)
    names = list(report.sanity)
    cols = max(len(s.layers) for s in report.sanity.values()) + 1 + (image is not None)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.6 * cols, 1.7 * len(names) + 0.4), dpi=110, squeeze=False)
    for r, name in enumerate(names):
        s = report.sanity[name]
        panels: list[tuple[str, np.ndarray]] = []
        if image is not None:
            panels.append(("image", image))
        panels.append(("original", s.maps[0, 0].cpu().numpy()))
        for j, layer in enumerate(s.layers):
            rho = float(s.spearman[j, 0])
            shown = "ρ undefined (blank)" if rho != rho else f"ρ={rho:.2f}"  # a constant map has no ranks
            panels.append((f"{layer}\n{shown}", s.maps[j + 1, 0].cpu().numpy()))
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                title, arr = panels[c]
                ax.imshow(arr, cmap=None if arr.ndim == 3 else "jet", vmin=None if arr.ndim == 3 else 0)
                ax.set_title(title, fontsize=6)
        first = axes[r][0]
        first.text(-0.1, 0.5, name, transform=first.transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("cascading randomisation (output layers first, left to right)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def finish_curve_axes(ax) -> None:
    """The common frame of a deletion/insertion plot: fractions 0..1, scores 0..1, grid, legend."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure (its folder made if needed) and close it; an unwritable path is a one-line error."""
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as err:
        raise LumosError(f"Cannot write {path}: {err.strerror or err}.") from None
    finally:
        plt.close(fig)
