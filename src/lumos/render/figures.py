"""Multi-panel figures: feature-map grids and method-comparison galleries.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through ``pyplot``, so no
global matplotlib state (backend, current figure, figure registry) is touched.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from PIL import Image

from lumos.render._convert import ImageLike, _as_numpy, get_colormap, save_png, to_pil_image
from lumos.render.maps import normalize_map
from lumos.render.scales import ColorScale


def _activations_array(activations: Any) -> np.ndarray:
    arr = _as_numpy(activations).astype(np.float32, copy=False)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(
            f"activations must be CxHxW for one image and one layer, got shape {tuple(arr.shape)}"
        )
    return arr


def top_channels(activations: torch.Tensor | np.ndarray, n: int = 16) -> list[int]:
    """Indices of the ``n`` channels with the highest mean activation, highest first (ties: lower index)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    arr = _activations_array(activations)
    means = np.nan_to_num(arr.reshape(arr.shape[0], -1).mean(axis=1), nan=-np.inf)
    order = np.argsort(-means, kind="stable")
    return [int(i) for i in order[:n]]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _figure_to_pil(fig: Figure, dpi: float) -> Image.Image:
    fig.set_dpi(dpi)
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _blank(ax: Axes) -> None:
    """Hide ticks and frame but keep the axes so a ylabel can still show."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def feature_grid(
    activations: torch.Tensor | np.ndarray,
    n: int = 16,
    cols: int | None = None,
    colormap: str | Colormap = "viridis",
    titles: bool = True,
    *,
    cell_size: float = 1.6,
    dpi: int = 100,
    out: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> tuple[Image.Image, list[int]]:
    """Grid of the top-``n`` channels (by mean activation) of a CxHxW activation tensor, with an optional
    ``title`` above it (e.g. the image and layer).

    Each channel is min/max-normalised on its own and labelled with its channel index. Returns
    ``(image, channel_indices)``; ``channel_indices`` are in grid order (row-major). If ``out`` is given
    the image is also saved there as PNG.
    """
    cmap = get_colormap(colormap)
    arr = _activations_array(activations)
    chosen = top_channels(arr, n)
    cols = cols or math.ceil(math.sqrt(len(chosen)))
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    rows = math.ceil(len(chosen) / cols)
    h, w = arr.shape[1:]
    cell_h = cell_size * h / w
    head = 0.35 if title else 0.0
    fig = _figure(cols * cell_size, rows * (cell_h + (0.25 if titles else 0.0)) + head)
    axes = fig.subplots(rows, cols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(chosen):
            continue
        ax.imshow(normalize_map(arr[chosen[k]]), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        if titles:
            ax.set_title(f"ch {chosen[k]}", fontsize=9, pad=2)
    fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2, rect=(0, 0, 1, 1 - head / fig.get_figheight()))
    image = _figure_to_pil(fig, dpi)
    if out is not None:
        save_png(image, out)
    return image, chosen


def _cells_from_columns(
    columns: Sequence[Sequence[ImageLike]] | Mapping[str, Sequence[ImageLike]] | None,
) -> tuple[list[list[ImageLike]], list[str] | None]:
    if columns is None:
        return [], None
    if isinstance(columns, Mapping):
        names = [str(k) for k in columns]
        per_column = [list(v) for v in columns.values()]
        lengths = {len(c) for c in per_column}
        if len(lengths) > 1:
            raise ValueError(f"every column must have one image per row; got lengths {sorted(lengths)}")
        n_rows = lengths.pop() if lengths else 0
        return [[col[r] for col in per_column] for r in range(n_rows)], names
    return [list(row) for row in columns], None


def _fit_titles(titles: Sequence[Any] | None, n_methods: int, has_image: bool, what: str) -> list[Any]:
    """Titles for all displayed columns; method-only lists get ``None`` for the image column."""
    n_total = n_methods + int(has_image)
    if titles is None:
        return [None] * n_total
    titles = list(titles)
    if len(titles) == n_total:
        return titles
    if has_image and len(titles) == n_methods:
        return [None, *titles]
    raise ValueError(
        f"{what} has {len(titles)} entries; expected {n_methods} (one per method column)"
        + (f" or {n_total} (including the image column)" if has_image else "")
    )


# -- text that fits: measured, wrapped, shortened --------------------------------------------------------
_PT = 72.0  # points per inch
_LINE = 1.25  # line height in font sizes (matplotlib's 1.2 line spacing plus the descent)
_ELLIPSIS = "\u2026"


@functools.lru_cache(maxsize=1)
def _measurer() -> RendererAgg:
    return RendererAgg(8, 8, _PT)  # at 72 dpi one pixel is one point


@functools.lru_cache(maxsize=4096)
def _width_pt(text: str, size: float, weight: str = "normal") -> float:
    """Width of one line of ``text`` in points, as matplotlib lays it out (no mathtext)."""
    if not text:
        return 0.0
    w, _, _ = _measurer().get_text_width_height_descent(text, FontProperties(size=size, weight=weight), ismath=False)
    return float(w)


def _break_word(word: str, width: float, size: float, weight: str) -> list[str]:
    """Pieces of a word too long for a line, broken after ``_ - . /`` where possible, else anywhere."""
    pieces = []
    while word and _width_pt(word, size, weight) > width:
        cut = 1
        while cut < len(word) and _width_pt(word[:cut + 1], size, weight) <= width:
            cut += 1
        soft = max((word.rfind(ch, 0, cut) for ch in "_-./ "), default=-1) + 1
        if soft >= max(2, cut // 2):
            cut = soft
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word] if word else pieces


def fit_text(text: str, width_in: float, size: float, weight: str = "normal", max_lines: int = 3) -> str:
    """``text`` wrapped to ``width_in`` inches at ``size`` points (measured, not guessed), long words broken,
    at most ``max_lines`` lines (the last one shortened with an ellipsis)."""
    width = max(width_in * _PT * 0.96, 4.0)  # a little slack: hinting differs between dpis
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width_pt(candidate, size, weight) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            pieces = _break_word(word, width, size, weight)
            lines.extend(pieces[:-1])
            line = pieces[-1] if pieces else ""
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _width_pt(last + _ELLIPSIS, size, weight) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + _ELLIPSIS
    return "\n".join(lines)


def _height_in(text: str | None, size: float) -> float:
    """Height of a (wrapped) text block in inches; 0 for no text."""
    if not text:
        return 0.0
    return (text.count("\n") + 1) * _LINE * size / _PT


def _place(fig: Figure, fw: float, fh: float, left: float, top: float, width: float, height: float,
           **kwargs: Any) -> Axes:
    """An axes at ``left``, ``top`` (inches from the figure's top-left corner), ``width`` x ``height`` inches."""
    return fig.add_axes((left / fw, 1.0 - (top + height) / fh, width / fw, height / fh), **kwargs)


# -- colour bars -----------------------------------------------------------------------------------------
_BAR_H, _BAR_FS, _TICK_FS = 0.13, 8.5, 8.0


def _bar_label(bar: ColorScale, width: float) -> str:
    return fit_text(bar.label, width, _BAR_FS, max_lines=4)


def _bar_height(label: str) -> float:
    return _BAR_H + 0.04 + _LINE * _TICK_FS / _PT + 0.03 + _height_in(label, _BAR_FS)


def _draw_bar(fig: Figure, fw: float, fh: float, left: float, top: float, width: float, bar: ColorScale,
              label: str) -> Axes:
    """A horizontal colour bar (an axes labelled ``<colorbar>``) with its ticks and, below them, its label."""
    cax = _place(fig, fw, fh, left, top, width, _BAR_H, label="<colorbar>")
    mappable = ScalarMappable(norm=Normalize(bar.vmin, bar.vmax), cmap=get_colormap(bar.colormap))
    cb = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    ticks = bar.ticks if bar.ticks is not None else (bar.vmin, (bar.vmin + bar.vmax) / 2, bar.vmax)
    cb.set_ticks(list(ticks), labels=[f"{t:g}" for t in ticks])
    cax.tick_params(labelsize=_TICK_FS, length=2, pad=1.5)
    label_top = top + _BAR_H + 0.04 + _LINE * _TICK_FS / _PT + 0.03
    fig.text((left + width / 2) / fw, 1.0 - label_top / fh, label, ha="center", va="top", fontsize=_BAR_FS,
             parse_math=False)
    return cax


def _bars_layout(bars: Sequence[ColorScale], fw: float, margin: float) -> tuple[float, int, list[str], float]:
    """Bar width, bars per line, wrapped labels and the total height of the colour-bar footer."""
    avail = max(fw - 2 * margin, 0.8)
    width = min(2.6, avail)
    per_line = max(1, int((avail + 0.4) // (width + 0.4)))
    labels = [_bar_label(b, width) for b in bars]
    height = 0.0
    for start in range(0, len(bars), per_line):
        height += max(_bar_height(label) for label in labels[start:start + per_line]) + 0.1
    return width, per_line, labels, height


def _draw_bars(fig: Figure, fw: float, fh: float, top: float, bars: Sequence[ColorScale], width: float,
               per_line: int, labels: list[str]) -> None:
    for start in range(0, len(bars), per_line):
        line = list(range(start, min(start + per_line, len(bars))))
        total = len(line) * width + (len(line) - 1) * 0.4
        left = (fw - total) / 2
        for n, i in enumerate(line):
            _draw_bar(fig, fw, fh, left + n * (width + 0.4), top, width, bars[i], labels[i])
        top += max(_bar_height(labels[i]) for i in line) + 0.1


# -- the gallery -----------------------------------------------------------------------------------------
_HEAD_FS, _CAP_FS, _ROW_FS, _NOTE_FS = 11.0, 9.5, 10.0, 9.0
_PAD, _GAP, _ROW_GAP, _GROUP_GAP, _LABEL_W = 0.12, 0.12, 0.1, 0.16, 1.5


def _group_sizes(rows_per_image: int | Sequence[int], n_images: int | None, n_cell_rows: int) -> list[int]:
    if isinstance(rows_per_image, int):
        if rows_per_image < 1:
            raise ValueError(f"rows_per_image must be at least 1, got {rows_per_image}")
        if n_images is None:
            if n_cell_rows % rows_per_image:
                raise ValueError(f"{n_cell_rows} rows of cells do not split into groups of {rows_per_image}")
            return [rows_per_image] * (n_cell_rows // rows_per_image)
        return [rows_per_image] * n_images
    sizes = [int(k) for k in rows_per_image]
    if any(k < 1 for k in sizes):
        raise ValueError(f"rows_per_image entries must be at least 1, got {sizes}")
    if n_images is not None and len(sizes) != n_images:
        raise ValueError(f"rows_per_image has {len(sizes)} entries; expected {n_images} (one per image)")
    return sizes


def gallery(
    images: Sequence[ImageLike] | None,
    columns: Sequence[Sequence[ImageLike]] | Mapping[str, Sequence[ImageLike]] | None,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cell_titles: Sequence[Sequence[str | None]] | None = None,
    out: str | os.PathLike[str] | None = None,
    cell_size: float = 3.0,
    *,
    image_title: str | None = "image",
    dpi: int = 150,
    rows_per_image: int | Sequence[int] = 1,
    colorbars: ColorScale | Sequence[ColorScale] | None = None,
    note: str | None = None,
) -> Figure:
    """Comparison grid: the original image first, then one column per method; one or more map rows per image.

    ``columns`` is ``cells[row][col]`` (a list of per-row lists) or ``{method name: [one image per row]}``.
    ``rows_per_image`` (an int, or one count per image) says how many map rows each image has (e.g. its top-k
    classes); the original is drawn once, beside the first. ``row_titles`` has one entry per image (drawn
    above the original, or in a left column when ``images=None``); ``cell_titles`` one list per map row.
    ``col_titles`` and each row of ``cell_titles`` hold one entry per method column, or one more to include
    the original-image column (which is otherwise titled ``image_title``). ``images=None`` drops the
    original column. ``colorbars`` (:class:`~lumos.render.scales.ColorScale`) are drawn under the grid, and
    ``note`` under them. Text is measured and wrapped (long words broken, at most a few lines, then
    shortened with an ellipsis), every row is as tall as its own cells, so nothing is clipped.
    If ``out`` is given the figure is saved there as PNG (parent dirs created). The figure is not
    registered with pyplot, so it needs no closing; it is returned either way.
    """
    cells, names = _cells_from_columns(columns)
    originals = None if images is None else list(images)
    has_image = originals is not None
    sizes = _group_sizes(rows_per_image, None if originals is None else len(originals), len(cells))
    n_rows = sum(sizes)
    if not cells and has_image:
        cells = [[] for _ in range(n_rows)]
    if len(cells) != n_rows:
        images_said = f"{len(originals)} images" if originals is not None else f"{len(sizes)} groups"
        raise ValueError(f"got {images_said} ({n_rows} rows of maps expected) but {len(cells)} rows of cells; "
                         "they must match")
    n_methods = len(cells[0]) if cells else 0
    if any(len(row) != n_methods for row in cells):
        raise ValueError("every row of cells must have the same number of columns")
    if n_rows == 0 or n_methods + int(has_image) == 0:
        raise ValueError("gallery needs at least one row and one column")
    if names is not None and col_titles is None:
        col_titles = names
    heads = _fit_titles(col_titles, n_methods, has_image, "col_titles")
    if has_image and heads[0] is None:
        heads[0] = image_title
    if row_titles is not None and len(row_titles) != len(sizes):
        raise ValueError(f"row_titles has {len(row_titles)} entries; expected {len(sizes)} (one per image)")
    if cell_titles is not None and len(cell_titles) != n_rows:
        raise ValueError(f"cell_titles has {len(cell_titles)} rows; expected {n_rows} (one per map row)")
    bars = [colorbars] if isinstance(colorbars, ColorScale) else list(colorbars or [])

    first_row = [sum(sizes[:g]) for g in range(len(sizes))]
    group_of = [g for g, k in enumerate(sizes) for _ in range(k)]
    w = float(cell_size)
    label_w = _LABEL_W if (row_titles is not None and not has_image) else 0.0
    x0 = _PAD + (label_w + _GAP if label_w else 0.0)
    n_cols = n_methods + int(has_image)
    fw = x0 + n_cols * w + (n_cols - 1) * _GAP + _PAD

    # what each cell shows: (image or None, wrapped caption or None)
    grid: list[list[tuple[Image.Image | None, str | None]]] = []
    for r in range(n_rows):
        caps = _fit_titles(cell_titles[r], n_methods, has_image, f"cell_titles[{r}]") if cell_titles else None
        row: list[tuple[Image.Image | None, str | None]] = []
        for c in range(n_cols):
            cap = caps[c] if caps else None
            if has_image and c == 0:
                g = group_of[r]
                if r != first_row[g]:
                    row.append((None, None))
                    continue
                title = row_titles[g] if row_titles is not None else None
                cap = "\n".join(str(t) for t in (title, cap) if t) or None
                pic = to_pil_image(originals[g])
                row.append((pic, fit_text(cap, w, _CAP_FS, max_lines=6) if cap else None))
                continue
            pic = to_pil_image(cells[r][c - int(has_image)])
            row.append((pic, fit_text(str(cap), w, _CAP_FS, max_lines=6) if cap else None))
        grid.append(row)
    head_text = [fit_text(str(h), w, _HEAD_FS, "bold", 3) if h else None for h in heads]
    row_text = ([fit_text(str(t), label_w, _ROW_FS, max_lines=8) for t in row_titles]
                if label_w and row_titles is not None else None)

    cap_pad = 3.0 / _PT
    cap_band = [max((_height_in(cap, _CAP_FS) for _, cap in row), default=0.0) for row in grid]
    cap_band = [b + cap_pad if b else 0.0 for b in cap_band]
    img_band = [max((w * p.height / p.width for p, _ in row if p is not None), default=0.0) for row in grid]
    head_gap = 2.0 / _PT
    head_band = max((_height_in(h, _HEAD_FS) for h in head_text), default=0.0)
    head_band = head_band + head_gap + (0.0 if cap_band[0] else cap_pad) if head_band else 0.0

    tops, y = [], _PAD + head_band
    for r in range(n_rows):
        if r and first_row[group_of[r]] == r:
            y += _GROUP_GAP
        tops.append(y + cap_band[r])
        y += cap_band[r] + img_band[r] + _ROW_GAP
    y -= _ROW_GAP
    if row_text is not None:  # a label column may be taller than its group
        for g, k in enumerate(sizes):
            end = tops[first_row[g] + k - 1] + img_band[first_row[g] + k - 1]
            y = max(y, end, tops[first_row[g]] + _height_in(row_text[g], _ROW_FS))
    footer_top = y + (0.14 if bars or note else 0.0)
    bar_w, per_line, bar_labels, bars_h = _bars_layout(bars, fw, 0.25) if bars else (0.0, 1, [], 0.0)
    note_text = fit_text(note, fw - 2 * _PAD, _NOTE_FS, max_lines=6) if note else None
    fh = footer_top + bars_h + _height_in(note_text, _NOTE_FS) + _PAD

    fig = _figure(fw, fh)
    for r in range(n_rows):
        for c in range(n_cols):
            pic, cap = grid[r][c]
            if pic is None:
                continue
            left = x0 + c * (w + _GAP)
            ax = _place(fig, fw, fh, left, tops[r], w, w * pic.height / pic.width)
            _blank(ax)
            ax.imshow(np.asarray(pic), interpolation="antialiased", aspect="auto")
            head = head_text[c] if r == 0 else None
            if cap:
                ax.set_title(cap, fontsize=_CAP_FS, pad=3, va="bottom", parse_math=False)
            if head and cap_band[0]:  # bold method name above the row's captions
                ax.annotate(
                    head, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, cap_band[0] * _PT + 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=_HEAD_FS, fontweight="bold",
                    parse_math=False, annotation_clip=False,
                )
            elif head:
                ax.set_title(head, fontsize=_HEAD_FS, fontweight="bold", pad=3, va="bottom", parse_math=False)
    if max(sizes) > 1:  # a thin rule between images that have several rows each
        for g in range(1, len(sizes)):
            r = first_row[g]
            y_rule = 1.0 - (tops[r] - cap_band[r] - (_GROUP_GAP + _ROW_GAP) / 2) / fh
            fig.add_artist(Line2D([_PAD / fw, 1.0 - _PAD / fw], [y_rule, y_rule], color="0.8", linewidth=0.8))
    if row_text is not None:
        for g in range(len(sizes)):
            fig.text(_PAD / fw, 1.0 - tops[first_row[g]] / fh, row_text[g], ha="left", va="top", fontsize=_ROW_FS,
                     parse_math=False)
    if bars:
        _draw_bars(fig, fw, fh, footer_top, bars, bar_w, per_line, bar_labels)
    if note_text:
        fig.text(_PAD / fw, 1.0 - (footer_top + bars_h) / fh, note_text, ha="left", va="top", fontsize=_NOTE_FS,
                 parse_math=False)
    if out is not None:
        save_png(fig, out, dpi=dpi)
    return fig


def picture(
    image: ImageLike,
    caption: str | None = None,
    colorbar: ColorScale | None = None,
    *,
    width_in: float = 5.0,
    min_width_px: int = 480,
    out: str | os.PathLike[str] | None = None,
) -> Figure:
    """One drawn map with its caption (e.g. class, probability, peak) and colour bar underneath.

    The image fills the figure's width; the figure is saved at the image's own resolution, or scaled up to
    ``min_width_px`` pixels wide so the text stays readable. ``fig.dpi`` is that resolution; with ``out`` the
    PNG is written at it. Returned as a Figure (no pyplot), like :func:`gallery`.
    """
    pic = to_pil_image(image)
    dpi = max(pic.width, int(min_width_px)) / width_in
    fw = width_in
    img_h = fw * pic.height / pic.width
    text = fit_text(caption, fw - 2 * _PAD, _CAP_FS + 0.5, max_lines=8) if caption else None
    y = img_h + (0.06 if text else 0.0)
    text_top = y
    y += _height_in(text, _CAP_FS + 0.5)
    bar_w, per_line, labels, bars_h = _bars_layout([colorbar], fw, 0.3) if colorbar else (0.0, 1, [], 0.0)
    bar_top = y + (0.1 if colorbar else 0.0)
    fh = bar_top + bars_h + (0.06 if (text or colorbar) else 0.0)
    fig = _figure(fw, fh)
    fig.set_dpi(dpi)
    ax = _place(fig, fw, fh, 0.0, 0.0, fw, img_h)
    ax.set_axis_off()
    ax.imshow(np.asarray(pic), interpolation="antialiased", aspect="auto")
    if text:
        fig.text(0.5, 1.0 - text_top / fh, text, ha="center", va="top", fontsize=_CAP_FS + 0.5, parse_math=False)
    if colorbar:
        _draw_bars(fig, fw, fh, bar_top, [colorbar], bar_w, per_line, labels)
    if out is not None:
        save_png(fig, out, dpi=round(dpi))
    return fig
