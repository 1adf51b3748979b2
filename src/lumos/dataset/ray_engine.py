"""The Ray engine: Ray Data's ``map_batches`` over actors that each load the model once (``lumos[ray]``).

Each actor holds one :class:`~lumos.dataset.batch.BatchWorker` (built from the picklable spec), decodes its
batch and returns store rows as an Arrow table; the driver collects the rows per chunk and writes each chunk
as soon as all its images are back, so the store is the same as the local engine's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from lumos.dataset.batch import BatchWorker, RunOptions, decode_batch
from lumos.dataset.sources import Item
from lumos.dataset.store import Store, pyarrow, rows_table
from lumos.errors import LumosError
from lumos.explainer import ExplainSpec
from lumos.shortfall import Shortfall, add_shortfall, gather_shortfalls

__all__ = ["run_ray"]

SHORTFALLS = "_lumos_shortfalls"  # a column the workers add (JSON, first row of a batch) and the driver removes


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LumosError("--engine ray needs Ray Data: pip install 'lumos[ray]'.") from None
    return ray


class RayExplainer:
    """The callable class Ray Data maps over: one per actor, the model loaded once in its constructor."""

    def __init__(self, spec: ExplainSpec, options: RunOptions, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.worker = BatchWorker(spec, options)

    def __call__(self, batch: Any) -> Any:
        items = [Item(int(r["index"]), r["path"], r["label"], None if r["box"] is None else tuple(r["box"]))
                 for r in batch.to_pylist()]
        with gather_shortfalls(say=False) as found:  # a worker's log does not reach the driver: send them back
            rows = self.worker.rows(decode_batch(self.worker.decoder, items))
        table = rows_table(rows, self.worker.options.map_dtype)
        said = [json.dumps([asdict(s) for s in found])] if found else []
        return table.append_column(SHORTFALLS, pyarrow().array(said + [None] * (len(table) - len(said)),
                                                               pyarrow().string()))


def run_ray(store: Store, items: Sequence[Item], chunks: Sequence[tuple[int, range]], spec: ExplainSpec,
            options: RunOptions, *, batch_size: int = 32, address: str | None = None, concurrency: int = 1,
            num_gpus: float = 0, threads: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
    """Explain the ``chunks`` of ``items`` on Ray and write each chunk as it completes.

    ``address`` joins a running cluster (``auto``, ``ray://host:10001``); without it a Ray already started in
    this process is used, else a local one is started. ``concurrency`` actors, each with ``threads`` CPU threads
    (torch) and ``num_gpus`` GPUs (fractions share a GPU).
    """
    if not chunks:
        return
    if concurrency < 1 or threads < 1 or num_gpus < 0:
        raise LumosError("--concurrency and --threads must be positive and --num-gpus 0 or more.")
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise LumosError(f"Cannot start or join Ray{' at ' + address if address else ''}: {err}") from None
    pa = pyarrow()
    import pyarrow.compute as pc

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # chunks come back in order: one chunk in memory at a time
    ctx.enable_progress_bars = False  # the caller shows progress (on_batch)
    todo = [items[i] for _, r in chunks for i in r]
    source = pa.table({
        "index": pa.array([it.index for it in todo], pa.int64()),
        "path": pa.array([it.path for it in todo], pa.string()),
        "label": pa.array([it.label for it in todo], pa.string()),
        "box": pa.array([None if it.box is None else list(it.box) for it in todo], pa.list_(pa.float64())),
    })
    blocks = max(1, min(math.ceil(len(todo) / batch_size), 8 * concurrency))
    step = math.ceil(len(todo) / blocks)  # blocks made here, so no Ray task competes with the actors for CPUs
    ds = ray.data.from_arrow([source.slice(s, step) for s in range(0, len(todo), step)]).map_batches(
        RayExplainer, fn_constructor_args=(spec, options, threads), batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=threads, num_gpus=num_gpus or None,
    )
    size = store.manifest()["chunk_size"]
    pending = {k: set(r) for k, r in chunks}
    parts: dict[int, list[Any]] = {}
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for said in table.column(SHORTFALLS).drop_null().to_pylist():  # counted into the run's one warning
            for fields in json.loads(said):
                add_shortfall(Shortfall(**fields))
        table = table.drop_columns([SHORTFALLS])
        indices = table.column("index").to_pylist()
        for k in sorted({i // size for i in indices}):
            part = table.filter(pc.equal(pc.divide(table.column("index"), size), k))
            parts.setdefault(k, []).append(part)
            pending[k] -= set(part.column("index").to_pylist())
            if not pending[k]:
                whole = pa.concat_tables(parts.pop(k))
                store.write_chunk(k, _sorted(whole, spec, options), options.map_dtype)
        if on_batch is not None:
            on_batch(len(set(indices)))
    if any(pending.values()):  # pragma: no cover - Ray lost rows: never write an incomplete chunk
        missing = sum(len(v) for v in pending.values())
        raise LumosError(f"Ray returned no rows for {missing} image(s); re-run the same command to finish them.")


def _sorted(table: Any, spec: ExplainSpec, options: RunOptions) -> Any:
    """Rows in the store's order: image, target kind, method (as the local engine writes them)."""
    pa = pyarrow()
    kinds = {k: n for n, k in enumerate(options.kinds)}
    methods = {m: n for n, m in enumerate(spec.method_names)}
    keys = [(i, kinds.get(t, -1), methods.get(m, -1)) for i, t, m in zip(
        table.column("index").to_pylist(), table.column("target_kind").to_pylist(),
        table.column("method").to_pylist(), strict=True)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return table.take(pa.array(order, pa.int64()))
