"""The result store of a data set run: Parquet chunks and a manifest in one folder.

```
STORE/manifest.json          format, spec hash, the spec and run options as text, item count and fingerprint
STORE/items.parquet          the numbered images of the run (index, path, label, box)
STORE/chunks/part-00000.parquet   rows of images 0 .. chunk_size-1, one per (image, target kind, method)
STORE/.lumos-lock            held (an OS file lock) by the run writing the store
```

A chunk is written to a hidden temporary file and renamed into place, so after a crash (even SIGKILL) every
``part-*.parquet`` is complete and a re-run skips exactly those. A store made with another spec, run options
or list of images refuses to take more rows unless it is started over (``restart=True``, ``--restart``).
One run writes a store at a time (:func:`store_lock`); the OS drops the lock when the run's process ends,
however it ends.
Open it with ``pyarrow.parquet.read_table(STORE / "chunks")`` or ``pandas.read_parquet``; :func:`decode_map`
turns a row's map back into floats.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lumos.dataset.sources import Item, fingerprint
from lumos.errors import LumosError

__all__ = ["FORMAT", "Store", "read_store", "schema", "store_lock"]

FORMAT = "lumos-dataset-store/1"
LOCK = ".lumos-lock"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LumosError("Data set runs need pyarrow: pip install 'lumos[dataset]'.") from None
    return pa


def schema(map_dtype: str = "uint8") -> Any:
    """The Arrow schema of a store's rows (the map column's values are ``map_dtype``)."""
    pa = pyarrow()
    value = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[map_dtype]
    return pa.schema([
        ("index", pa.int64()), ("path", pa.string()), ("label", pa.string()), ("label_index", pa.int32()),
        ("box", pa.list_(pa.float32())), ("width", pa.int32()), ("height", pa.int32()),
        ("error", pa.string()), ("target_kind", pa.string()), ("method", pa.string()), ("layer", pa.string()),
        ("pred", pa.int32()), ("pred_name", pa.string()), ("pred_prob", pa.float32()),
        ("topk", pa.list_(pa.int32())), ("topk_probs", pa.list_(pa.float32())),
        ("target", pa.int32()), ("target_name", pa.string()), ("score", pa.float32()), ("prob", pa.float32()),
        ("map", pa.list_(value)), ("map_h", pa.int16()), ("map_w", pa.int16()), ("map_lo", pa.float32()),
        ("map_hi", pa.float32()), ("peak_x", pa.float32()), ("peak_y", pa.float32()), ("mass_centre", pa.float32()),
        ("mass_border", pa.float32()), ("mass_outside_box", pa.float32()),
    ])


def rows_table(rows: Sequence[dict[str, Any]], map_dtype: str) -> Any:
    """Rows (dicts) -> an Arrow table with the store schema (missing fields are null)."""
    pa = pyarrow()
    sch = schema(map_dtype)
    columns = {f.name: [r.get(f.name) for r in rows] for f in sch}
    if map_dtype != "uint8":  # float16 lists cannot be built from Python floats: go through numpy
        import numpy as np

        maps = columns.pop("map")
        offsets = np.cumsum([0] + [0 if m is None else len(m) for m in maps]).astype(np.int32)
        flat = np.concatenate([np.asarray(m, dtype=map_dtype) for m in maps if m is not None] or
                              [np.zeros(0, dtype=map_dtype)])
        mask = pa.array([m is None for m in maps])
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask)
        columns["map"] = arr
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], type=f.type)
              for f in sch]
    return pa.Table.from_arrays(arrays, schema=sch)


class Store:
    """A store folder: its manifest, the finished chunks, atomic chunk writes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.manifest_path = self.root / "manifest.json"

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str], items: Sequence[Item], spec_hash: str, meta: dict[str, Any],
             chunk_size: int, restart: bool = False) -> Store:
        """Create the store, or open an existing one for the same spec, options and images (to resume).

        A store made differently is refused with a one-line error unless ``restart`` (then its chunks are
        deleted). A folder that holds other files but no manifest is never touched.
        """
        store = cls(root)
        manifest = {"format": FORMAT, "spec_hash": spec_hash, "items": len(items), "chunk_size": chunk_size,
                    "items_fingerprint": fingerprint(items), **meta}
        _refuse_foreign(store.root)
        old = store.manifest() if store.manifest_path.exists() else None
        if old is not None and not restart:
            why = store._difference(old, manifest)
            if why:
                raise LumosError(f"The store {store.root} was made {why}; use --restart to start it over "
                                 "(its rows are deleted), or another --store.")
            return store
        if old is not None:
            store._clear()
        try:
            store.chunks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LumosError(f"Cannot create the store folder {store.root}: {err.strerror or err}.") from None
        store._write_items(items)
        _atomic_write(store.manifest_path, (json.dumps(manifest | {"created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n").encode())
        return store

    def manifest(self) -> dict[str, Any]:
        """The manifest, or a one-line error if the folder holds no readable store."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LumosError(f"{self.root} is not a lumos data set store (no manifest.json).") from None
        except (OSError, ValueError) as err:
            raise LumosError(f"Cannot read the store manifest {self.manifest_path}: {err}.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LumosError(f"{self.manifest_path} is not a {FORMAT} manifest.")
        return data

    @staticmethod
    def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
        """How the store's manifest ``old`` differs from this run's ``new`` ("" if it does not), naming the
        settings that differ with both values."""
        if old.get("spec_hash") != new["spec_hash"]:
            then, now = old.get("settings"), new.get("settings")
            if isinstance(then, dict) and isinstance(now, dict):
                changed = [f"{k} {_shown(then.get(k))} (now {_shown(now.get(k))})"
                           for k in dict.fromkeys([*then, *now]) if then.get(k) != now.get(k)]
                if changed:
                    return "with " + ", ".join(changed)
            if old.get("chunk_size") != new["chunk_size"]:  # a store written before settings were recorded
                return f"with chunk size {old.get('chunk_size')} (now {new['chunk_size']})"
            if old.get("spec_text") != new.get("spec_text"):
                return f"with another spec ({old.get('spec_text', '?')}, now {new.get('spec_text', '?')})"
            return "with other settings (this store does not record which)"
        if old.get("items") != new["items"] or old.get("items_fingerprint") != new["items_fingerprint"]:
            return f"for other images ({old.get('items')} then, {new['items']} now, or other paths or labels)"
        if old.get("chunk_size") != new["chunk_size"]:
            return f"with chunk size {old.get('chunk_size')} (now {new['chunk_size']})"
        return ""

    def _clear(self) -> None:
        """Delete what a store holds (its own files only)."""
        if self.chunks_dir.is_dir():
            for p in self.chunks_dir.iterdir():
                if _PART.match(p.name) or p.name.startswith(".part-"):
                    p.unlink()
        for name in ("items.parquet", "manifest.json"):
            (self.root / name).unlink(missing_ok=True)

    def _write_items(self, items: Sequence[Item]) -> None:
        pa = pyarrow()
        table = pa.table({
            "index": pa.array([it.index for it in items], pa.int64()),
            "path": pa.array([it.path for it in items], pa.string()),
            "label": pa.array([it.label for it in items], pa.string()),
            "box": pa.array([None if it.box is None else list(it.box) for it in items], pa.list_(pa.float32())),
        })
        _atomic_parquet(table, self.root / "items.parquet")

    # -- chunks ----------------------------------------------------------------------------------------------
    def chunk_path(self, k: int) -> Path:
        return self.chunks_dir / f"part-{k:05d}.parquet"

    def done_chunks(self) -> set[int]:
        """Numbers of the chunks already written (complete by construction); stale temporary files are removed."""
        done = set()
        if not self.chunks_dir.is_dir():
            return done
        for p in self.chunks_dir.iterdir():
            if m := _PART.match(p.name):
                done.add(int(m.group(1)))
            elif p.name.startswith(".part-"):
                p.unlink(missing_ok=True)  # left by a run that was killed while writing
        return done

    def write_chunk(self, k: int, rows: Sequence[dict[str, Any]] | Any, map_dtype: str) -> None:
        """Write chunk ``k`` (rows as dicts, or an Arrow table) atomically."""
        pa = pyarrow()
        table = rows if isinstance(rows, pa.Table) else rows_table(rows, map_dtype)
        _atomic_parquet(table, self.chunk_path(k))

    def chunk_files(self) -> list[Path]:
        return sorted(p for p in self.chunks_dir.glob("part-*.parquet") if _PART.match(p.name))


@contextmanager
def store_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``root``'s write lock (creating the folder) for a run; a store another run holds is a one-line error.

    An OS lock on ``root/.lumos-lock`` (``flock``; ``msvcrt.locking`` on Windows): released when the run ends or
    its process dies, so a crashed run never blocks its resume. The file keeps the holder's process id."""
    root = Path(root)
    _refuse_foreign(root)  # a folder that is not a store gets no lock file either
    if root.exists() and not root.is_dir():
        raise LumosError(f"The store {root} (--store) is a file, not a folder; give a folder for the store.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise LumosError(f"Cannot create the store folder {root}: {err.strerror or err}.") from None
    try:
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            raise LumosError(f"The store {root} is being written by another run (process {holder}); wait for it "
                             "to finish, or give another --store.")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _shown(value: Any) -> str:
    """A setting's value in a message: quoted text, or ``default`` when it was not given."""
    return "default" if value is None else repr(value) if isinstance(value, str) and " " in value else str(value)


def _refuse_foreign(root: Path) -> None:
    """A one-line error if ``root`` is a folder with files but no store manifest (it is never written to)."""
    if (root.is_dir() and not (root / "manifest.json").exists()
            and any(p.name != LOCK for p in root.iterdir())):
        raise LumosError(f"{root} is not empty and is not a lumos data set store; give a new or empty folder "
                         "(--store).")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the first byte, from the position 0 that open gave
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def chunk_ranges(n_items: int, chunk_size: int) -> Iterator[tuple[int, range]]:
    """(chunk number, the item indices it holds)."""
    for k, start in enumerate(range(0, n_items, chunk_size)):
        yield k, range(start, min(start + chunk_size, n_items))


def read_store(root: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Any:
    """All rows written so far, as one Arrow table sorted by image (``columns`` to read fewer)."""
    store = Store(root)
    manifest = store.manifest()
    pa = pyarrow()
    import pyarrow.parquet as pq

    files = store.chunk_files()
    if not files:
        return schema(manifest.get("map_dtype", "uint8")).empty_table().select(list(columns) if columns else
                                                                               schema().names)
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns else None) for f in files])


def _atomic_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    _fsync_rename(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    _fsync_rename(tmp, path)


def _fsync_rename(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
