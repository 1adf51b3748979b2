"""Multi-panel figures: feature-map grids and method-comparison galleries.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through ``pyplot``, so no
global matplotlib state (backend, current figure, figure registry) is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

from lumos.render._convert import ImageLike, _as_numpy, get_colormap, save_png, to_pil_image
from lumos.render.maps import normalize_map


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
) -> tuple[Image.Image, list[int]]:
    """Grid of the top-``n`` channels (by mean activation) of a CxHxW activation tensor.

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
    fig = _figure(cols * cell_size, rows * (cell_h + (0.25 if titles else 0.0)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(chosen):
            continue
        ax.imshow(normalize_map(arr[chosen[k]]), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        if titles:
            ax.set_title(f"ch {chosen[k]}", fontsize=9, pad=2)
    fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2)
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
) -> Figure:
    """Comparison grid: one row per image, the original first, then one column per method.

    ``columns`` is ``cells[row][col]`` (a list of per-row lists) or ``{method name: [one image per row]}``.
    ``col_titles`` and each row of ``cell_titles`` hold one entry per method column, or one more to
    include the original-image column (which is otherwise titled ``image_title``). ``images=None`` drops
    the original column. If ``out`` is given the figure is saved there as PNG (parent dirs created).
    The figure is not registered with pyplot, so it needs no closing; it is returned either way.
    """
    cells, names = _cells_from_columns(columns)
    originals = None if images is None else list(images)
    n_rows = len(originals) if originals is not None else len(cells)
    if cells and len(cells) != n_rows:
        raise ValueError(f"got {n_rows} images but {len(cells)} rows of cells; they must match")
    n_methods = len(cells[0]) if cells else 0
    if any(len(row) != n_methods for row in cells):
        raise ValueError("every row of cells must have the same number of columns")
    has_image = originals is not None
    if n_rows == 0 or n_methods + int(has_image) == 0:
        raise ValueError("gallery needs at least one row and one column")
    if names is not None and col_titles is None:
        col_titles = names
    heads = _fit_titles(col_titles, n_methods, has_image, "col_titles")
    if has_image and heads[0] is None:
        heads[0] = image_title
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"row_titles has {len(row_titles)} entries; expected {n_rows} (one per row)")
    if cell_titles is not None and len(cell_titles) != n_rows:
        raise ValueError(f"cell_titles has {len(cell_titles)} rows; expected {n_rows}")

    grid = [
        ([to_pil_image(originals[r])] if originals is not None else []) + [to_pil_image(c) for c in cells[r]]
        for r in range(n_rows)
    ]
    n_cols = len(grid[0])
    first = grid[0][0]
    aspect = first.height / first.width
    any_cell_title = cell_titles is not None and any(t for row in cell_titles for t in row if t)
    title_h = 0.25 * int(any(heads)) + 0.25 * int(any_cell_title)
    fig = _figure(n_cols * cell_size + (0.4 if row_titles else 0.0), n_rows * (cell_size * aspect + title_h))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        caps = _fit_titles(cell_titles[r], n_methods, has_image, f"cell_titles[{r}]") if cell_titles else None
        for c in range(n_cols):
            ax = axes[r, c]
            _blank(ax)
            ax.imshow(np.asarray(grid[r][c]), interpolation="antialiased")
            head = heads[c] if r == 0 else None
            cap = caps[c] if caps else None
            if cap:
                ax.set_title(str(cap), fontsize=10, pad=3)
            if head and cap:  # bold method name above the cell caption
                ax.annotate(
                    str(head), xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 18),
                    textcoords="offset points", ha="center", va="bottom", fontsize=11, fontweight="bold",
                )
            elif head:
                ax.set_title(str(head), fontsize=11, fontweight="bold", pad=3)
        if row_titles:
            axes[r, 0].set_ylabel(str(row_titles[r]), fontsize=11)
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.4)
    if out is not None:
        save_png(fig, out, dpi=dpi)
    return fig
