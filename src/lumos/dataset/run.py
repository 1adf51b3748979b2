"""``explain_dataset``: a whole data set through one spec into a resumable store, locally or on Ray."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumos.dataset.batch import BatchWorker, RunOptions, run_settings, spec_hash
from lumos.dataset.sources import Item, list_items
from lumos.dataset.store import Store, chunk_ranges, store_lock
from lumos.errors import LumosError
from lumos.explainer import Explainer, ExplainSpec
from lumos.shortfall import gather_shortfalls

__all__ = ["DatasetRun", "explain_dataset", "ENGINES"]

ENGINES = ("local", "ray")


@dataclass
class DatasetRun:
    """What a run did: images in the data set, how many were explained now / found done, the problems met
    while listing (path, why), with target ``both`` how many images have no label (so no label map), and the
    labels that are not classes of the model (label, where it came from): kept as text, not used, when the
    target does not need labels."""

    store: Path
    images: int
    explained: int
    skipped: int
    problems: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: int = 0
    unknown_labels: list[tuple[str, str]] = field(default_factory=list)


def explain_dataset(
    inputs: Sequence[str | os.PathLike[str]] | Sequence[Item],
    spec: ExplainSpec,
    store: str | os.PathLike[str],
    *,
    options: RunOptions | None = None,
    engine: str = "local",
    batch_size: int = 32,
    workers: int = 2,
    restart: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    ray: dict[str, Any] | None = None,
    explainer: Explainer | None = None,
) -> DatasetRun:
    """Explain every image of ``inputs`` (folders, globs, list files, Parquet tables, or :class:`Item` s) with
    ``spec`` into the store folder ``store``; re-running the same call resumes where a crash left it.

    ``engine="local"`` decodes in ``workers`` processes and explains here; ``"ray"`` maps batches over Ray
    actors (``ray``: ``address``, ``concurrency``, ``num_gpus``, ``threads``, see :func:`.ray_engine.run_ray`).
    ``on_start(total, done)`` is called once with the image count and how many were done already;
    ``on_batch(n)`` after every explained batch (the local engine) or block of results (Ray). ``explainer``
    reuses an already loaded :class:`Explainer` of ``spec`` (the local engine explains with it).
    """
    options = options or RunOptions()
    if engine not in ENGINES:
        raise LumosError(f"Unknown engine '{engine}'; use {' or '.join(ENGINES)}.")
    if batch_size < 1:
        raise LumosError(f"The batch size must be a positive integer, got {batch_size}.")
    if workers < 0:
        raise LumosError(f"The number of decode workers must be 0 or more, got {workers}.")
    if inputs and all(isinstance(i, Item) for i in inputs):
        items, problems = list(inputs), []  # type: ignore[arg-type]
    else:
        items, problems = list_items(inputs)  # type: ignore[arg-type]
    if not items:
        why = "; ".join(f"{p}: {w}" for p, w in problems[:3])
        raise LumosError(f"No image to explain{': ' + why if why else ''}.")
    if options.target == "label" and all(it.label is None for it in items):
        raise LumosError(f"Target 'label' explains each image's label, but none of the {len(items)} images has one "
                         "(give class sub-folders, a list file with labels or a table with a 'label' column, or use "
                         "target predicted).")
    worker = BatchWorker(spec, options, explainer)  # loads the model: layer, class and labels checked before any work
    unknown = _unknown_labels(worker, items)
    if unknown and worker.needs_labels:
        (label, source, why), more = unknown[0], unknown[1:]
        others = f" {len(more)} other label(s) are not classes either: {_listed(more)}." if more else ""
        why = why.strip() + ("" if why.strip().endswith((".", "?", "!")) else ".")
        raise LumosError(f"The label '{label}' (from {source}) is not a class of the model: {why} Target "
                         f"'{options.target}' explains each image's label, so every label must be a class name or "
                         f"index of the model (target 'predicted' needs no label).{others}")
    meta = {"spec_text": _spec_text(spec, options), "settings": run_settings(spec, options), "spec": repr(spec),
            "options": repr(options),
            "map_dtype": options.map_dtype, "methods": spec.method_names, "target_kinds": list(options.kinds),
            "labels": None if worker.labels is None else list(worker.labels)}
    with store_lock(store):  # one run writes a store at a time
        st = Store.open(store, items, spec_hash(spec, options), meta, options.chunk_size, restart=restart)
        done = st.done_chunks()
        chunks = [(k, r) for k, r in chunk_ranges(len(items), options.chunk_size) if k not in done]
        todo = sum(len(r) for _, r in chunks)
        if on_start is not None:
            on_start(len(items), len(items) - todo)
        with gather_shortfalls():  # a method's cap, said once for the run rather than once per batch
            if engine == "local":
                from lumos.dataset.local import run_local

                run_local(st, items, chunks, worker, batch_size=batch_size, workers=workers, on_batch=on_batch)
            else:
                from lumos.dataset.ray_engine import run_ray

                run_ray(st, items, chunks, spec, options, batch_size=batch_size, on_batch=on_batch, **(ray or {}))
    unlabelled = sum(it.label is None for it in items) if options.target == "both" else 0
    return DatasetRun(st.root, len(items), todo, len(items) - todo, problems, unlabelled,
                      [(label, source) for label, source, _ in unknown])


def _unknown_labels(worker: BatchWorker, items: Sequence[Item]) -> list[tuple[str, str, str]]:
    """The labels that are not classes of the model: (label, where it first came from, why), in item order."""
    first: dict[str, Item] = {}
    for it in items:
        if it.label is not None:
            first.setdefault(it.label, it)
    unknown = []
    for label, item in first.items():
        try:
            worker.find_label(label)
        except LumosError as err:
            unknown.append((label, item.source or f"the image {item.path}", str(err)))
    return unknown


def _listed(unknown: Sequence[tuple[str, str, str]], n: int = 3) -> str:
    """'a' (from X), 'b' (from Y), ... for a message."""
    text = ", ".join(f"'{label}' (from {source})" for label, source, _ in unknown[:n])
    return text + (f" and {len(unknown) - n} more" if len(unknown) > n else "")


def _spec_text(spec: ExplainSpec, options: RunOptions) -> str:
    """A short description for the refusal message: model, methods, target, layer, precision."""
    target = options.target if options.target != "class" else f"class {spec.target}"
    return (f"model {spec.model.name}, methods {','.join(spec.method_names)}, target {target}, layer {spec.layer}, "
            f"maps {options.map_dtype}")
