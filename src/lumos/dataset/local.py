"""The local engine: a torch DataLoader whose workers decode images, feeding one Explainer in this process.

Batches never straddle a chunk, and a chunk is written as soon as its last batch is explained, so memory is
bounded by the batch size and the chunk size, never by the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lumos.dataset.batch import BatchWorker, DecodedBatch, Decoder, decode_one, stack
from lumos.dataset.sources import Item
from lumos.dataset.store import Store

__all__ = ["batches_of", "run_local"]


class _Items(torch.utils.data.Dataset):
    """Item number -> (item, decoded image or its error); runs in the DataLoader's workers."""

    def __init__(self, items: Sequence[Item], decoder: Decoder) -> None:
        self.items, self.decoder = items, decoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Item, Any]:
        item = self.items[i]
        return item, decode_one(self.decoder, item)


def _collate(batch: list[tuple[Item, Any]]) -> DecodedBatch:
    """In the worker: one stacked tensor per batch (sending 64 small tensors costs 64 shared-memory files)."""
    return stack([b[0] for b in batch], [b[1] for b in batch])


def batches_of(chunks: Sequence[tuple[int, range]], batch_size: int) -> list[list[int]]:
    """Item numbers in batches of ``batch_size`` that never straddle a chunk."""
    return [list(r[s:s + batch_size]) for _, r in chunks for s in range(0, len(r), batch_size)]


def run_local(store: Store, items: Sequence[Item], chunks: Sequence[tuple[int, range]], worker: BatchWorker, *,
              batch_size: int = 32, workers: int = 2, on_batch: Callable[[int], None] | None = None) -> None:
    """Explain the ``chunks`` (number, item range) of ``items`` and write each as it completes.

    ``workers`` decode processes (0: decode in this process); ``on_batch(n_images)`` after every batch.
    """
    if not chunks:
        return
    loader: Any = torch.utils.data.DataLoader(
        _Items(items, worker.decoder), batch_sampler=batches_of(chunks, batch_size), num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    size = store.manifest()["chunk_size"]
    pending = {k: len(r) for k, r in chunks}
    rows: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        k = batch.items[0].index // size
        rows.setdefault(k, []).extend(worker.rows(batch))
        pending[k] -= len(batch.items)
        if pending[k] == 0:
            store.write_chunk(k, rows.pop(k), worker.options.map_dtype)
        if on_batch is not None:
            on_batch(len(batch.items))
