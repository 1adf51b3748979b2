"""What a data set run reads: a folder tree, a glob, a list file or a Parquet table of paths (and labels, boxes).

:func:`list_items` turns the inputs into a numbered, deterministic list of :class:`Item` s; the store keeps its
fingerprint, so a resumed run refuses a data set that changed under it.

- a folder: walked recursively in sorted order (``lumos.io.find_images``); when it holds sub-folders
  (``root/CLASS/...``) the folder name is the label (used only when the run's target needs labels);
- a glob (``"photos/**/*.jpg"``): matching files in sorted order, no labels;
- a ``.txt``/``.csv``/``.tsv`` list: one ``path[,label]`` per line (tab or comma), relative paths taken from
  the list's folder; lines starting with ``#`` are skipped;
- a ``.parquet`` table: a ``path`` column, optional ``label`` (class name or index) and ``box`` (x0, y0, x1, y1
  in the image's pixels: where the object is; the report measures how much of each map lies outside it).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lumos.errors import LumosError

__all__ = ["Item", "fingerprint", "list_items"]

_LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")


@dataclass(frozen=True)
class Item:
    """One image of the run: its number (row key in the store), file, label text and object box, if known, and
    where the label came from (``the folder photos/cat``, ``list.csv line 3``; for messages only)."""

    index: int
    path: str
    label: str | None = None
    box: tuple[float, float, float, float] | None = None
    source: str | None = field(default=None, compare=False)


def fingerprint(items: Sequence[Item]) -> str:
    """A short hash of the items (paths, labels, boxes, order): equal lists give equal fingerprints."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\x00{it.label}\x00{it.box}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def list_items(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Item], list[tuple[str, str]]]:
    """The numbered items of ``inputs`` (folders, globs, list files, Parquet tables) and the problems met
    (a path that does not exist, an empty folder): ``(items, [(path, why), ...])``. Duplicates are kept
    once, first occurrence first."""
    from lumos.io import find_images

    found: list[tuple[str, str | None, tuple[float, float, float, float] | None, str | None]] = []
    problems: list[tuple[str, str]] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_file() and path.suffix.lower() == ".parquet":
            found += _from_parquet(path)
        elif path.is_file() and path.suffix.lower() in _LIST_SUFFIXES:
            found += _from_list(path)
        elif path.is_dir():
            files, probs = find_images([path])
            problems += [(str(p), why) for p, why in probs]
            found += [(str(f), *_folder_label(path, f)) for f in files]
        elif any(c in text for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(text, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                problems.append((text, "the pattern matches no file"))
            found += [(f, None, None, None) for f in files]
        elif path.exists():
            found.append((text, None, None, None))
        else:
            problems.append((text, "no such file or directory"))
    seen: set[str] = set()
    items: list[Item] = []
    for p, label, box, source in found:
        if p in seen:
            continue
        seen.add(p)
        items.append(Item(len(items), p, label, box, source))
    return items, problems


def _folder_label(root: Path, file: Path) -> tuple[str | None, None, str | None]:
    """``root/CLASS/.../x.png`` -> (``CLASS``, no box, ``the folder root/CLASS``); a file directly in ``root`` has
    no label."""
    parts = file.relative_to(root).parts
    return (parts[0], None, f"the folder {root / parts[0]}") if len(parts) > 1 else (None, None, None)


def _from_list(path: Path) -> list[tuple[str, str | None, None, str | None]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LumosError(f"Cannot read the image list {path}: {err}.") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sep = "\t" if "\t" in line else ","
        name, _, label = line.partition(sep) if sep in line else (line, "", "")
        file = Path(name.strip())
        if not file.is_absolute():
            file = path.parent / file
        out.append((str(file), label.strip() or None, None, f"{path} line {number}"))
    if not out:
        raise LumosError(f"The image list {path} holds no path.")
    return out


def _from_parquet(path: Path) -> list[tuple[str, str | None, tuple[float, float, float, float] | None, str]]:
    pq = _pyarrow_parquet()
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own kinds
        raise LumosError(f"Cannot read the Parquet table {path}: {err}.") from None
    if "path" not in table.column_names:
        raise LumosError(f"The Parquet table {path} has no 'path' column (columns: {', '.join(table.column_names)}).")
    paths = [str(p) for p in table.column("path").to_pylist()]
    paths = [p if os.path.isabs(p) else str(path.parent / p) for p in paths]
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    boxes = table.column("box").to_pylist() if "box" in table.column_names else [None] * len(paths)
    out = []
    for row, (p, label, box) in enumerate(zip(paths, labels, boxes, strict=True)):
        if box is not None:
            if len(box) != 4:
                raise LumosError(f"The 'box' of {p} in {path} must be x0, y0, x1, y1, got {box}.")
            box = tuple(float(v) for v in box)
        out.append((p, None if label is None else str(label), box, f"{path} row {row + 1}"))
    return out


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LumosError("Data set runs need pyarrow: pip install 'lumos[dataset]'.") from None
    return pq
