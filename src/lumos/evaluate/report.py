"""Write an :class:`~lumos.evaluate.benchmark.EvaluationReport`: text table, CSV, JSON, curve and sanity PNGs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from lumos.errors import LumosError
from lumos.evaluate.benchmark import DIRECTIONS, EvaluationReport

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
    """Header and rows of strings (method × metric); the best value per column carries ``mark``."""
    metrics = report.metrics
    best = report.best()
    top = {m: report.rows[b][m] for m, b in best.items()}
    rows = []
    for method, row in report.rows.items():
        cells = [method]
        for m in metrics:
            v = row.get(m, float("nan"))
            text = "-" if v != v else f"{v:.3f}"
            cells.append(text + (mark if m in top and v == top[m] else ""))
        rows.append(cells)
    return ["method", *map(header, metrics)], rows


def format_table(report: EvaluationReport) -> str:
    """A plain-text table (best per column marked ``*``)."""
    head, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


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
        "metrics": report.rows,
        "per_image": report.per_image,
        "curves": report.curves,
        "sanity": {
            name: {"layers": s.layers, "spearman": s.spearman.mean(1).tolist(), "ssim": s.ssim.mean(1).tolist()}
            for name, s in report.sanity.items()
        },
        "failures": report.failures,
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
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
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
            panels.append((f"{layer}\nρ={float(s.spearman[j, 0]):.2f}", s.maps[j + 1, 0].cpu().numpy()))
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
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as err:
        raise LumosError(f"Cannot write {path}: {err.strerror or err}.") from None
    finally:
        plt.close(fig)
