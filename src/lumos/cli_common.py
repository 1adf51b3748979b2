"""What the ``lumos`` commands share: consoles, model loading, devices, method lists, progress and timing,
output-directory checks.

The sub-commands (``cli_evaluate``, ``cli_app``) import this module, never ``lumos.cli`` (which imports them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lumos.errors import LumosError
from lumos.explainer import resolve_device

__all__ = ["StepProgress", "err_console", "format_times", "on_tty", "out_console", "parse_methods", "progress_bar",
           "resolve_device"]

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
          labels: Path | None, device: str | None = None):
    """The model bundle for a command, moved to ``device`` (``--device``, checked before the model loads)."""
    return _load_parsed(model, weights, size, _floats(mean), _floats(std), labels, device)


def _load_parsed(model: str, weights: str | Path | None, size: int | None, mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None, labels: str | Path | None, device: str | None = None):
    """:func:`_load` with the normalisation already parsed (as an ``ExplainSpec``'s ``ModelSpec`` holds it)."""
    import torch

    from lumos.zoo import importable_from_here, load_model

    where = None if device is None else resolve_device(device)
    importable_from_here(model)
    bundle = load_model(model, weights=weights, size=size, mean=mean, std=std, labels=labels, torchscript=False)
    if isinstance(bundle.model, torch.jit.ScriptModule):  # every command here records layers with hooks
        raise LumosError(
            f"{model} is a TorchScript model: it loads, but torch allows no hooks on a loaded ScriptModule, so its "
            "layers cannot be recorded; save the state dict and use --model package.module:callable --weights FILE."
        )
    if where is not None:
        bundle.model.to(where)
    return bundle


def parse_methods(text: str, transformer: bool = False) -> list[str]:
    """Method names from ``--method`` (alias ``--methods``): comma-separated names or aliases, or ``all``
    (every method that works on any model; with ``transformer=True`` the attention methods too); aliases
    resolved to registered names; a method given twice runs once (with a note)."""
    from lumos.api import method_class, methods
    from lumos.runner import parse_list

    names: list[str] = []
    for item in parse_list(text, what="method"):
        names += methods(general=not transformer) if item.lower() == "all" else [method_class(item).name]
    unique = list(dict.fromkeys(names))
    twice = [n for n in unique if names.count(n) > 1]
    if twice and "all" not in {t.lower() for t in parse_list(text, what="method")}:
        err_console.print(f"note: {', '.join(twice)} given more than once (aliases count as the same method); "
                          "each method runs once.", highlight=False, markup=False)
    return unique


#: Narrower terminals get click's plain help: Typer's boxed option tables leave the help column ~25 characters
#: wide at 80 columns and cut defaults and long words with an ellipsis
RICH_HELP_COLUMNS = 100


def help_style() -> str | None:
    """Typer's ``rich_markup_mode``: ``"rich"`` (boxed panels) on a terminal at least ``RICH_HELP_COLUMNS`` wide
    (or ``COLUMNS``; 80 when not on a terminal), else None (click's plain help, which wraps cleanly at any width)."""
    return "rich" if shutil.get_terminal_size((80, 24)).columns >= RICH_HELP_COLUMNS else None


def on_tty(console: Console) -> bool:
    """A real interactive terminal: FORCE_COLOR alone must not put a progress bar into a log file."""
    try:
        return console.is_interactive and console.file.isatty()
    except (AttributeError, ValueError):  # closed or unusual stream
        return False


def progress_bar(console: Console) -> Progress:
    """A progress bar with time left, on a real terminal only."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console, transient=True, disable=not on_tty(console),
    )


def format_times(times: dict[str, float]) -> str:
    """``time: gradcam 1.2 s, scorecam 14.0 s`` (registered names, as ``--method`` takes them)."""
    def seconds(t: float) -> str:
        if t >= 60:
            return f"{int(t // 60)} min {t % 60:.0f} s"
        return f"{t:.1f} s" if t >= 0.1 else f"{t * 1000:.0f} ms"

    return "time: " + ", ".join(f"{name} {seconds(t)}" for name, t in times.items())


class StepProgress:
    """Progress over named steps (the methods of ``lumos evaluate``) that records each step's time.

    On a terminal: a rich bar (step n of N, elapsed, time left). Otherwise one line per step on ``console``,
    ``LABEL: NAME (n/N) ...``, and while a step runs a line every ``every`` seconds, so a log shows the run is
    alive. Use ``step(name)`` as each step starts; leaving the ``with`` block ends the last one.
    """

    def __init__(self, label: str, total: int, console: Console, every: float = 30.0) -> None:
        self.label, self.total, self.console, self.every = label, total, console, every
        self.times: dict[str, float] = {}
        self._bar = progress_bar(console)
        self._task = None
        self._current: tuple[str, float] | None = None
        self._done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StepProgress:
        self._bar.__enter__()
        self._task = self._bar.add_task(self.label, total=self.total)
        if self._bar.disable and self.every > 0:
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._bar.__exit__(*exc)

    def _finish(self) -> None:
        if self._current is not None:
            name, start = self._current
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            self._current = None
            self._done += 1
            self._bar.update(self._task, completed=self._done)

    def step(self, name: str) -> None:
        """Step ``name`` starts now (the previous one, if any, has ended)."""
        self._finish()
        self._current = (name, time.perf_counter())
        self._bar.update(self._task, description=f"{self.label} ({name})")
        if self._bar.disable:
            self._line(f"{name} ({self._done + 1}/{self.total}) ...")

    def _line(self, text: str) -> None:
        self.console.print(f"{self.label}: {text}", highlight=False, markup=False)

    def _heartbeat(self) -> None:
        """Every ``every`` seconds of the same step, one ``still running`` line (checked a few times a second)."""
        said: tuple[tuple[str, float], float] | None = None  # (step, seconds into it when last said)
        while not self._stop.wait(min(self.every, 0.5)):
            current = self._current
            if current is None:
                continue
            name, start = current
            elapsed = time.perf_counter() - start
            last = said[1] if said is not None and said[0] == (name, start) else 0.0
            if elapsed - last >= self.every:
                said = ((name, start), elapsed)
                self._line(f"{name} ({self._done + 1}/{self.total}) still running, {elapsed:.0f} s")


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


