"""What the ``lumos`` commands share: consoles, model loading, progress, output-directory checks.

The sub-commands (``cli_evaluate``, ``cli_app``) import this module, never ``lumos.cli`` (which imports them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from lumos.errors import LumosError

# soft_wrap: a message is one line however narrow the terminal (or 80 columns when output is piped).
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise LumosError(f"Expected numbers separated by commas, got '{text}'.") from None


def _load(model: str, weights: Path | None, size: int | None, mean: str | None, std: str | None,
          labels: Path | None):
    import torch

    from lumos.zoo import load_model

    bundle = load_model(model, weights=weights, size=size, mean=_floats(mean), std=_floats(std), labels=labels,
                        torchscript=False)
    if isinstance(bundle.model, torch.jit.ScriptModule):  # every command here records layers with hooks
        raise LumosError(
            f"{model} is a TorchScript model: it loads, but torch allows no hooks on a loaded ScriptModule, so its "
            "layers cannot be recorded; save the state dict and use --model package.module:callable --weights FILE."
        )
    return bundle


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LumosError(f"Cannot create the output directory {out}: {err.strerror or err}.") from None


def _reason(err: OSError) -> str:
    return (err.strerror or str(err) or type(err).__name__).lower()


def _check_out(out: Path) -> None:
    """Fail before any model work when ``--out`` cannot become a writable directory: it (or the nearest part of
    it that exists) is a file, or a probe file cannot be created and deleted there. Nothing is left behind."""
    probe = out
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            what = "is a file" if probe == out else f"cannot be created: {probe} is a file"
            raise LumosError(f"The output directory {out} (--out) {what}, not a directory.")
        fd, name = tempfile.mkstemp(prefix=".lumos-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        if probe == out:
            raise LumosError(f"Cannot write to the output directory {out} (--out): {_reason(err)}.") from None
        raise LumosError(f"Cannot create the output directory {out} (--out) in {probe}: {_reason(err)}.") from None


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A failed write (disk full, permission changed mid-run) becomes one line, not a traceback."""
    try:
        yield
    except OSError as err:
        target = err.filename or out
        raise LumosError(f"Cannot write {target}: {_reason(err)}.") from None


