"""One batch of a data set run: decode images, explain them, turn the result into store rows.

The same code runs in every engine (the local DataLoader loop, each Ray actor), so the store does not depend on
where a batch ran. A row is one (image, target kind, method): the prediction and top-k, the explained class with
its score and probability, map statistics, and the map itself at layer resolution (see :mod:`.store`). An image
that cannot be read is one row with its ``error``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lumos.dataset.sources import Item
from lumos.engine import quiet_blank_maps
from lumos.errors import LumosError, NonFiniteError, each_alone_on_nonfinite
from lumos.explainer import Explainer, ExplainSpec, top_predictions
from lumos.targets import TOPK

__all__ = ["BatchWorker", "DecodedBatch", "Decoder", "decode_batch", "RunOptions", "TARGET_MODES", "spec_hash"]

TARGET_MODES = ("predicted", "label", "both")
MAP_DTYPES = ("uint8", "float16", "float32")
MAX_MAP_SIDE = 32  # pixel and region maps are pooled to at most this many cells a side
BORDER = 0.125  # the border ring is the outer 1/8 of each side; the centre is the middle half of each side


@dataclass(frozen=True)
class RunOptions:
    """How a run explains and stores, besides the spec: which class each map explains (``predicted``, the
    image's ``label``, ``both``, or ``class`` for the spec's fixed class), the map's stored precision and size
    (None: the layer's resolution for CAMs, else at most 32 a side) and the images per store chunk."""

    target: str = "predicted"
    map_dtype: str = "uint8"
    map_size: int | None = None
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.target not in (*TARGET_MODES, "class"):
            raise LumosError(f"Unknown target mode '{self.target}'; use {', '.join(TARGET_MODES)} or a class.")
        if self.map_dtype not in MAP_DTYPES:
            raise LumosError(f"Unknown map precision '{self.map_dtype}'; use {', '.join(MAP_DTYPES)}.")
        if self.map_size is not None and self.map_size < 1:
            raise LumosError(f"The map size must be a positive integer, got {self.map_size}.")
        if self.chunk_size < 1:
            raise LumosError(f"The chunk size must be a positive integer, got {self.chunk_size}.")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("predicted", "label") if self.target == "both" else (self.target,)


def spec_hash(spec: ExplainSpec, options: RunOptions) -> str:
    """What makes two runs' rows comparable: the spec (not the device it runs on) and the run options."""
    text = repr(replace(spec, device=None)) + repr(sorted(asdict(options).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_settings(spec: ExplainSpec, options: RunOptions) -> dict[str, str | None]:
    """The settings :func:`spec_hash` covers, by name, as text (None: not given), for saying which one differs."""
    model = spec.model
    target = spec.target if options.target == "class" else options.target
    kwargs = "; ".join(f"{m.name}: " + ", ".join(f"{k}={v!r}" for k, v in m.settings) for m in spec.methods
                       if m.settings)
    named: dict[str, Any] = {
        "model": model.name, "weights": model.weights, "input size": model.size, "mean": model.mean,
        "std": model.std, "labels": model.labels, "methods": ",".join(spec.method_names),
        "method settings": kwargs or None, "target": target, "layer": spec.layer, "output": spec.output,
        "probs": spec.probs, "top-k": spec.top_k, "map precision": options.map_dtype, "map size": options.map_size,
        "chunk size": options.chunk_size,
    }
    return {k: None if v is None else str(v) for k, v in named.items()}


def check_spec(spec: ExplainSpec, options: RunOptions) -> None:
    """A data set run keeps one map per image and target kind: top-k targets are refused, a fixed class goes
    with the ``class`` mode."""
    target = spec.target
    if isinstance(target, str) and TOPK.fullmatch(target.lower()) and int(TOPK.fullmatch(target.lower()).group(1)) > 1:
        raise LumosError(f"A data set run keeps one map per image: target '{target}' is not supported; use "
                         "predicted, label, both or a class.")
    if (target is not None) != (options.target == "class"):
        raise LumosError("A fixed class target goes with target mode 'class' (and only with it).")


class Decoder:
    """Path -> preprocessed (3, H, W) tensor and the image's (width, height); picklable (runs in workers)."""

    def __init__(self, preprocess: Any) -> None:
        self.preprocess = preprocess

    def __call__(self, path: str) -> tuple[torch.Tensor, tuple[int, int]]:
        from lumos.io import load_image

        image = load_image(path)
        return self.preprocess.one(image), image.size


@dataclass
class DecodedBatch:
    """A batch ready to explain: its items, the decoded images stacked (the readable ones, in order; None if
    none was) and per item its (width, height) or its error text."""

    items: list[Item]
    x: torch.Tensor | None
    info: list[tuple[int, int] | str]


def decode_one(decoder: Decoder, item: Item) -> tuple[torch.Tensor | None, tuple[int, int] | str]:
    """The item decoded, or its one-line error (a bad file never stops the run)."""
    try:
        return decoder(item.path)
    except LumosError as err:
        return None, str(err)


def stack(items: Sequence[Item], decoded: Sequence[tuple[torch.Tensor | None, tuple[int, int] | str]]) -> DecodedBatch:
    """Per-item decode results -> one :class:`DecodedBatch` (one tensor, so a worker process sends it at once)."""
    good = [t for t, _ in decoded if t is not None]
    return DecodedBatch(list(items), torch.stack(good) if good else None, [i for _, i in decoded])


def decode_batch(decoder: Decoder, items: Sequence[Item]) -> DecodedBatch:
    return stack(items, [decode_one(decoder, it) for it in items])


class BatchWorker:
    """Explains batches of decoded items into store rows with one :class:`Explainer` (loaded once)."""

    def __init__(self, spec: ExplainSpec, options: RunOptions, explainer: Explainer | None = None) -> None:
        check_spec(spec, options)
        self.spec, self.options = spec, options
        self.explainer = explainer if explainer is not None else Explainer(spec)
        self.decoder = Decoder(self.explainer.bundle.preprocess)
        self.labels = self.explainer.labels
        self._label_cache: dict[str, int | None] = {}

    @property
    def needs_labels(self) -> bool:
        """Whether the target explains labels (``label``, ``both``): then every label must be a class."""
        return "label" in self.options.kinds

    def label_index(self, label: str | None) -> int | None:
        """The class index of a label text (name or index), None without one. A label that is not a class is an
        error when the target needs labels, else None (the text is kept in the row, e.g. a folder ``2023``)."""
        if label is None:
            return None
        if label not in self._label_cache:
            try:
                self._label_cache[label] = self.find_label(label)
            except LumosError:
                if self.needs_labels:
                    raise
                self._label_cache[label] = None
        return self._label_cache[label]

    def find_label(self, label: str) -> int:
        """The class index of a label text (name or index); one that is not a class is a :class:`LumosError`."""
        if self.labels is None:
            raise LumosError(f"Label '{label}' cannot be matched: the model has no class names (not a classifier).")
        if hasattr(self.labels, "index_of"):
            return int(self.labels.index_of(label))
        text = label.strip()
        if text.isdigit() and int(text) < len(self.labels):
            return int(text)
        if text not in list(self.labels):
            raise LumosError(f"Unknown class name {text!r}.")
        return list(self.labels).index(text)

    def rows(self, batch: DecodedBatch) -> list[dict[str, Any]]:
        """Store rows of a batch, ordered by (image, target kind, method).

        An unreadable image is one error row. An image without a label gets no label map: with target ``both``
        it keeps its predicted-class map, with target ``label`` it is an error row (it has nothing to explain).
        """
        items = batch.items
        rows: list[dict[str, Any]] = []
        good = [i for i, d in enumerate(batch.info) if not isinstance(d, str)]
        at = {i: j for j, i in enumerate(good)}  # item -> row of batch.x
        label_idx = [self.label_index(it.label) for it in items]
        for i, d in enumerate(batch.info):
            if isinstance(d, str):
                rows.append(_base_row(items[i], label_idx[i]) | {"error": d})
        for kind in self.options.kinds:
            use = good
            if kind == "label":
                use = [i for i in good if label_idx[i] is not None]
                if self.options.target == "label":
                    rows += [_base_row(items[i], None) | {
                        "target_kind": kind, "error": f"{items[i].path} has no label, so its label cannot be "
                        "explained."} for i in good if label_idx[i] is None]
            if not use:
                continue
            assert batch.x is not None
            x = batch.x if len(use) == len(batch.x) else batch.x[[at[i] for i in use]]
            sizes: list[tuple[int, int]] = [batch.info[i] for i in use]  # type: ignore[misc]
            rows += self._explain_or_split(kind, [items[i] for i in use], [label_idx[i] for i in use], x, sizes)
        order = {k: n for n, k in enumerate(self.options.kinds)}
        methods = {m: n for n, m in enumerate(self.spec.method_names)}
        rows.sort(key=lambda r: (r["index"], order.get(r.get("target_kind"), -1), methods.get(r.get("method"), -1)))
        return rows

    def _explain_or_split(self, kind: str, items: list[Item], labels: list[int | None], x: torch.Tensor,
                          sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """:meth:`_explain`; an image on which the model gives a NaN or inf becomes an error row (with its target
        kind) and the batch's other images are explained, so the run goes on."""
        def run(idx: list[int]) -> list[dict[str, Any]]:
            return self._explain(kind, [items[j] for j in idx], [labels[j] for j in idx],
                                 x if len(idx) == len(items) else x[idx], [sizes[j] for j in idx])

        def fail(j: int, err: NonFiniteError) -> list[dict[str, Any]]:
            return [_base_row(items[j], labels[j]) | {"target_kind": kind, "error": f"{items[j].path}: {err}"}]

        return each_alone_on_nonfinite(run, list(range(len(items))), fail)

    def _explain(self, kind: str, items: list[Item], labels: list[int | None], x: torch.Tensor,
                 sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        explainer = self.explainer
        x = explainer.preprocess(x)
        target: Any = None if kind == "predicted" else self.spec.target if kind == "class" else torch.tensor(labels)
        rows = []
        predictions = None
        for name, method in explainer.methods(x).items():
            with quiet_blank_maps():  # counted from the store at the end of the run, not per batch
                ex = method(x, target).cpu()
            if predictions is None:
                predictions = top_predictions(ex.output, ex.probs_kind, self.labels, self.spec.top_k)
            stored = _stored_maps(ex, self.options)
            stats = _map_stats(ex.maps, [_relative_box(it.box, s) for it, s in zip(items, sizes, strict=True)])
            layer = ex.layer if isinstance(ex.layer, str) or ex.layer is None else ",".join(ex.layer)
            for j, it in enumerate(items):
                pred = predictions[j].top
                cls = None if ex.targets is None else int(ex.targets[j])
                rows.append(_base_row(it, labels[j]) | {
                    "width": sizes[j][0], "height": sizes[j][1], "target_kind": kind, "method": name,
                    "layer": layer,
                    "pred": pred[0][0] if pred else None, "pred_name": pred[0][1] if pred else None,
                    "pred_prob": pred[0][2] if pred else None,
                    "topk": [p[0] for p in pred], "topk_probs": [p[2] for p in pred],
                    "target": cls, "target_name": None if cls is None or self.labels is None else self.labels[cls],
                    "score": float(ex.scores[j]), "prob": None if ex.probs is None else float(ex.probs[j]),
                } | stored[j] | stats[j])
        return rows


def _base_row(item: Item, label_index: int | None) -> dict[str, Any]:
    return {"index": item.index, "path": item.path, "label": item.label, "label_index": label_index,
            "box": None if item.box is None else list(item.box)}


def _relative_box(box: tuple[float, float, float, float] | None, size: tuple[int, int]) -> tuple[float, ...] | None:
    """A pixel box of the original image as fractions of its width and height (the model sees the whole image)."""
    if box is None:
        return None
    w, h = size
    x0, y0, x1, y1 = box
    return (x0 / w, y0 / h, x1 / w, y1 / h)


def map_grid(ex_maps_hw: tuple[int, int], raw_hw: tuple[int, int] | None, options: RunOptions) -> tuple[int, int]:
    """The stored map's (h, w): ``options.map_size`` a side, else the layer's resolution, else at most 32 a side."""
    h, w = ex_maps_hw
    if options.map_size is not None:
        return min(options.map_size, h), min(options.map_size, w)
    if raw_hw is not None:
        return raw_hw
    scale = min(1.0, MAX_MAP_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _stored_maps(ex: Any, options: RunOptions) -> list[dict[str, Any]]:
    """The finished maps pooled to the stored grid and encoded (uint8 with lo/hi, float16 or float32)."""
    raw = ex.raw[0] if isinstance(ex.raw, tuple) else ex.raw
    raw_hw = tuple(raw.shape[-2:]) if ex.kind == "layer" and raw.ndim == 3 else None
    h, w = map_grid(tuple(ex.maps.shape[-2:]), raw_hw, options)
    maps = ex.maps.float()
    if (h, w) != tuple(maps.shape[-2:]):
        maps = F.adaptive_avg_pool2d(maps[:, None], (h, w))[:, 0]
    arr = maps.numpy().reshape(len(maps), -1)
    if not np.isfinite(arr).all():
        raise LumosError(f"{ex.method} gave a map with NaN or infinite values; nothing was stored for this batch.")
    lo, hi = arr.min(1), arr.max(1)
    if options.map_dtype == "uint8":
        span = np.where(hi > lo, hi - lo, 1.0)
        enc = np.round((arr - lo[:, None]) / span[:, None] * 255.0).astype(np.uint8)
    else:
        enc = arr.astype(options.map_dtype)
    return [{"map": enc[j], "map_h": h, "map_w": w, "map_lo": float(lo[j]), "map_hi": float(hi[j])}
            for j in range(len(arr))]


def decode_map(row: dict[str, Any] | Any, dtype: str = "uint8") -> np.ndarray:
    """A stored map back to float32 (h, w); ``row`` is a store row (dict or pandas row)."""
    q = np.asarray(row["map"])
    h, w = int(row["map_h"]), int(row["map_w"])
    if dtype == "uint8":
        lo, hi = float(row["map_lo"]), float(row["map_hi"])
        return (lo + q.astype(np.float32) / 255.0 * (hi - lo)).reshape(h, w).astype(np.float32)
    return q.astype(np.float32).reshape(h, w)


def _map_stats(maps: torch.Tensor, boxes: Sequence[tuple[float, ...] | None]) -> list[dict[str, Any]]:
    """Where each map's mass (|map|) lies, at the model's input resolution: the peak (x, y as fractions of the
    side), the share in the centre (middle half of each side), in the border ring (outer 1/8) and outside
    the object's box (when one is given)."""
    m = maps.float().abs()
    n, h, w = m.shape
    total = m.flatten(1).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    centre = ((ys - 0.5).abs() < 0.25)[:, None] & ((xs - 0.5).abs() < 0.25)[None, :]
    inner = ((ys > BORDER) & (ys < 1 - BORDER))[:, None] & ((xs > BORDER) & (xs < 1 - BORDER))[None, :]
    peak = m.flatten(1).argmax(1)
    mass_centre = (m * centre).flatten(1).sum(1) / total
    mass_border = (m * ~inner).flatten(1).sum(1) / total
    out = []
    for j in range(n):
        row = {"peak_y": float(ys[int(peak[j]) // w]), "peak_x": float(xs[int(peak[j]) % w]),
               "mass_centre": float(mass_centre[j]), "mass_border": float(mass_border[j]), "mass_outside_box": None}
        box = boxes[j]
        if box is not None:
            x0, y0, x1, y1 = box
            inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
            row["mass_outside_box"] = float((m[j] * ~inside).sum() / total[j])
        out.append(row)
    return out
