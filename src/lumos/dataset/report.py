"""The data set report: where the model looks, per class, read from a store chunk by chunk.

Per class (the image's label when it has one, else the predicted class): the mean map over its images and over
its misclassified images, a heat image of where the maps peak, and the mean share of map mass *outside the
object* -- outside the object's box when the store has boxes, else in the border ring (outer 1/8 of each side).
Classes are ranked by that share, and so are the images (the top ones drawn with their maps). A class whose maps
sit outside its objects, at the same place on every image, is a shortcut: a watermark, a tag, a border.

Memory is bounded by one chunk: sums per class and a short heap of the worst images are all that is kept.
"""

from __future__ import annotations

import heapq
import html
import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumos.dataset.batch import decode_map
from lumos.dataset.store import Store, pyarrow
from lumos.errors import LumosError

__all__ = ["ClassSummary", "DatasetReport", "NothingToReport", "dataset_report", "write_report"]

PEAK_GRID = 8  # the peak-location heat image is PEAK_GRID x PEAK_GRID cells
_COLUMNS = ["index", "path", "label", "label_index", "error", "target_kind", "method", "pred", "pred_name", "target",
            "target_name", "map", "map_h", "map_w", "map_lo", "map_hi", "peak_x", "peak_y", "mass_outside_box",
            "mass_border", "prob"]


class NothingToReport(LumosError):
    """The store holds no map to report (no finished chunk, every row failed, or none of the asked kind)."""


@dataclass
class ClassSummary:
    """One class's numbers: images, misclassified, mean share of map mass outside the object, where its mean
    map peaks (x, y as fractions of the side), and the maps behind the pictures (not in the JSON)."""

    name: str
    images: int = 0
    misclassified: int = 0
    outside: float = 0.0
    mean_map_peak: tuple[float, float] = (0.5, 0.5)
    mean_map: np.ndarray | None = field(default=None, repr=False)
    wrong_map: np.ndarray | None = field(default=None, repr=False)
    peaks: np.ndarray | None = field(default=None, repr=False)


@dataclass
class DatasetReport:
    """The report of one method and target kind: classes ranked by mass outside the object (most first),
    the images with the most mass outside it, and what "outside" means here. ``errors``: images without a map
    of this method and kind (unreadable, or a NaN score)."""

    method: str
    target_kind: str
    outside_measure: str
    images: int
    errors: int
    classes: list[ClassSummary]
    top_images: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        skip = {"mean_map", "wrong_map", "peaks"}
        return {"method": self.method, "target_kind": self.target_kind, "outside_measure": self.outside_measure,
                "images": self.images, "errors": self.errors,
                "top_images": [{k: v for k, v in t.items() if k != "_map"} for t in self.top_images],
                "classes": [{k: v for k, v in asdict(c).items() if k not in skip} for c in self.classes]}


class _Acc:
    def __init__(self) -> None:
        self.n = 0
        self.wrong = 0
        self.outside = 0.0
        self.map_sum: np.ndarray | None = None
        self.wrong_sum: np.ndarray | None = None
        self.peaks = np.zeros((PEAK_GRID, PEAK_GRID))


def dataset_report(store: str | os.PathLike[str], *, method: str | None = None, target_kind: str | None = None,
                   top: int = 8) -> DatasetReport:
    """Read ``store`` and summarise ``method``'s maps (default: the first method) for ``target_kind``
    (default: the first the run made, e.g. ``predicted``); ``top`` images with the most mass outside.

    A store with no such map (no finished chunk, every row failed, no image with a label for ``label``) raises
    :class:`NothingToReport`, naming the store and why."""
    pyarrow()  # a one-line error naming the extra when it is missing
    import pyarrow.parquet as pq

    st = Store(store)
    manifest = st.manifest()
    methods, kinds = manifest.get("methods", []), manifest.get("target_kinds", [])
    method = method or (methods[0] if methods else None)
    target_kind = target_kind or (kinds[0] if kinds else None)
    if method not in methods:
        raise LumosError(f"The store has no maps of method '{method}'; it has {', '.join(methods)}.")
    if target_kind not in kinds:
        raise LumosError(f"The store has no '{target_kind}' maps; it has {', '.join(kinds)}.")
    dtype = manifest.get("map_dtype", "uint8")
    labels = manifest.get("labels") or []
    files = st.chunk_files()
    if not files:
        raise NothingToReport(f"Nothing to report from {st.root}: it holds no finished chunk yet (run "
                              "explain-dataset first).")
    accs: dict[int, _Acc] = {}
    worst: list[tuple[float, int, dict[str, Any]]] = []
    images = errors = rows = 0
    failed_images: set[int] = set()  # images with no map of this method and kind: unreadable, or a NaN score
    first_error = None
    has_box = None
    for f in files:
        df = pq.read_table(f, columns=_COLUMNS).to_pandas()
        rows += len(df)
        bad = df[df["error"].notna()]
        errors += len(bad)
        if first_error is None and errors:
            first_error = str(bad["error"].iloc[0])
        mine = bad["method"].isna() | (bad["method"] == method)  # an unreadable image has one row, no method
        mine &= bad["target_kind"].isna() | (bad["target_kind"] == target_kind)
        failed_images.update(bad.loc[mine, "index"].astype(int).tolist())
        df = df[df["error"].isna() & (df["method"] == method) & (df["target_kind"] == target_kind)]
        if has_box is None and len(df):
            has_box = bool(df["mass_outside_box"].notna().any())
        for row in df.itertuples(index=False):
            r = row._asdict()
            images += 1
            known = r["label_index"] is not None and not np.isnan(r["label_index"])
            cls = int(r["label_index"]) if known else int(r["pred"])
            acc = accs.setdefault(cls, _Acc())
            m = decode_map(r, dtype)
            outside = r["mass_outside_box"] if has_box else r["mass_border"]
            outside = float(outside) if outside is not None and not np.isnan(outside) else 0.0
            acc.n += 1
            acc.outside += outside
            acc.map_sum = m.astype(np.float64) if acc.map_sum is None else acc.map_sum + m
            if known and int(r["pred"]) != cls:
                acc.wrong += 1
                acc.wrong_sum = m.astype(np.float64) if acc.wrong_sum is None else acc.wrong_sum + m
            gy = min(int(r["peak_y"] * PEAK_GRID), PEAK_GRID - 1)
            gx = min(int(r["peak_x"] * PEAK_GRID), PEAK_GRID - 1)
            acc.peaks[gy, gx] += 1
            entry = {"index": int(r["index"]), "path": r["path"], "class": _name(labels, cls),
                     "predicted": r["pred_name"], "explained": r["target_name"],
                     "outside": round(outside, 4), "_map": m}
            item = (outside, -int(r["index"]), entry)
            if len(worst) < top:
                heapq.heappush(worst, item)
            elif top:
                heapq.heappushpop(worst, item)
    if not images:
        raise NothingToReport(_nothing(st.root, method, target_kind, rows, errors, first_error))
    classes = []
    for cls, acc in accs.items():
        mean = acc.map_sum / acc.n
        py, px = np.unravel_index(int(np.argmax(mean)), mean.shape)
        classes.append(ClassSummary(
            name=_name(labels, cls), images=acc.n, misclassified=acc.wrong, outside=round(acc.outside / acc.n, 4),
            mean_map_peak=(round((px + 0.5) / mean.shape[1], 4), round((py + 0.5) / mean.shape[0], 4)),
            mean_map=mean, wrong_map=None if acc.wrong_sum is None else acc.wrong_sum / acc.wrong,
            peaks=acc.peaks / acc.n))
    classes.sort(key=lambda c: -c.outside)
    measure = "outside the object's box" if has_box else "in the border ring (outer 1/8 of each side)"
    top_images = [e for _, _, e in sorted(worst, key=lambda t: (-t[0], -t[1]))]
    return DatasetReport(method, target_kind, measure, images, len(failed_images), classes, top_images)


def _nothing(root: Path, method: str, kind: str, rows: int, errors: int, first_error: str | None) -> str:
    """Why a store has no map of ``method`` and ``kind`` to report, in one line."""
    if rows and errors == rows:
        first = (first_error or "?").rstrip(".")
        return f"Nothing to report from {root}: {errors} of {rows} rows failed (the first: {first})."
    why = "; an image without a label has no label map" if kind == "label" else ""
    return f"Nothing to report from {root}: no {kind}-class map of {method} ({rows} rows, {errors} failed{why})."


def _name(labels: list[str], cls: int) -> str:
    return labels[cls] if 0 <= cls < len(labels) else f"class {cls}"


def write_report(report: DatasetReport, out: str | os.PathLike[str]) -> list[Path]:
    """``report.png`` (mean maps, misclassified mean maps, peak locations per class; the top images),
    ``report.html`` (the picture and the tables) and ``report.json`` in the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = _figure(report, out / "report.png")
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_html(report, png.name), encoding="utf-8")
    return [png, out / "report.html", out / "report.json"]


def _figure(report: DatasetReport, path: Path) -> Path:
    from lumos.render import save_png

    save_png(report_figure(report), path, dpi=110)
    return path


def report_figure(report: DatasetReport) -> Any:
    """The report picture: per class its mean map, misclassified mean map and peak places; the top images."""
    from matplotlib.figure import Figure

    from lumos.io import load_image
    from lumos.render import draw_map

    classes = report.classes
    n = max(len(classes), 1)
    n_top = len(report.top_images)
    cols = max(n, min(n_top, 6))
    fig = Figure(figsize=(2.0 * cols, 2.25 * (4 if n_top else 3) + 0.6))
    title = (f"{report.method} maps ({report.target_kind} class) over {report.images} images: classes ranked by "
             f"mass {report.outside_measure}")
    fig.suptitle(textwrap.fill(title, width=max(30, int(2.0 * cols * 11))), fontsize=10)  # ~11 chars/inch at 10 pt
    grid = fig.add_gridspec(4 if n_top else 3, cols, hspace=0.55, wspace=0.15)
    for j, c in enumerate(classes):
        rows = [(c.mean_map, f"{c.name} ({c.images})\nmean map, {c.outside:.0%} outside"),
                (c.wrong_map, f"misclassified ({c.misclassified})"),
                (c.peaks, "where maps peak")]
        for i, (arr, title) in enumerate(rows):
            ax = fig.add_subplot(grid[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
            if arr is None:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            ax.imshow(arr, cmap="inferno" if i == 2 else "jet", vmin=0, interpolation="nearest" if i == 2 else
                      "bilinear", extent=(0, 1, 1, 0))
    for j, entry in enumerate(report.top_images[:cols]):
        ax = fig.add_subplot(grid[3, j])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{entry['class']}: {entry['outside']:.0%} outside\n{Path(entry['path']).name}", fontsize=7)
        try:
            image = load_image(entry["path"])
        except LumosError:
            continue
        ax.imshow(np.asarray(draw_map(image, entry["_map"]) if "_map" in entry else image))
    return fig


def _html(report: DatasetReport, png: str) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{i + 1}</td><td>{e(c.name)}</td><td>{c.images}</td><td>{c.misclassified}</td>"
                   f"<td>{c.outside:.1%}</td><td>({c.mean_map_peak[0]:.2f}, {c.mean_map_peak[1]:.2f})</td></tr>"
                   for i, c in enumerate(report.classes))
    tops = "".join(f"<tr><td>{e(t['path'])}</td><td>{e(t['class'])}</td><td>{e(str(t['predicted']))}</td>"
                   f"<td>{t['outside']:.1%}</td></tr>" for t in report.top_images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lumos data set report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}</style>
</head><body><h1>Where {e(report.method)} says the model looks</h1>
<p>{report.images} images ({report.errors} could not be explained: unreadable, or a NaN score); maps of the
{e(report.target_kind)} class.
"Outside" is the share of each map's mass {e(report.outside_measure)}. A class whose maps lie outside its objects,
peaking at the same place on every image, points at a shortcut.</p>
<img src="{e(png)}" style="max-width:100%">
<h2>Classes, most mass outside the object first</h2>
<table><tr><th>rank</th><th>class</th><th>images</th><th>misclassified</th><th>outside</th>
<th>mean map peak (x, y)</th></tr>{rows}</table>
<h2>Images with the most mass outside the object</h2>
<table><tr><th>image</th><th>class</th><th>predicted</th><th>outside</th></tr>{tops}</table>
</body></html>
"""
