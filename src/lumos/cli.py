"""The ``lumos`` command: explain, demo, layers, methods, models, features.

User mistakes (bad file, unknown name) print one line ``error: ...`` and exit non-zero; never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand

from lumos.cli_options import (
    LabelsOpt,
    MeanOpt,
    ModelOpt,
    SettingsOpt,
    SizeOpt,
    StdOpt,
    TidyCommand,
    TidyGroup,
    WeightsOpt,
)
from lumos.errors import LumosError

app = typer.Typer(
    cls=TidyGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lumos: see where a vision model looks, and whether that picture can be trusted.",
)
# soft_wrap: a message is one line however narrow the terminal (or 80 columns when output is piped).
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEMO_METHODS = "gradcam,gradcam++,scorecam,layercam,eigencam,guided_gradcam,integrated_gradients"
COMMON_COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray")


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


def _on_tty(console: Console) -> bool:
    """A real interactive terminal: FORCE_COLOR alone must not put a progress bar into a log file."""
    try:
        return console.is_interactive and console.file.isatty()
    except (AttributeError, ValueError):  # closed or unusual stream
        return False


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=not _on_tty(err_console),
    )


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


def _positive(value: int, option: str) -> None:
    if value < 1:
        raise LumosError(f"{option} must be a positive integer, got {value}.")


def _check_colormap(name: str) -> None:
    import matplotlib

    from lumos.errors import close_matches

    if name not in matplotlib.colormaps:
        raise LumosError(f"Unknown colormap '{name}' (--colormap).{close_matches(name, matplotlib.colormaps)} "
                         f"Common ones: {', '.join(COMMON_COLORMAPS)}; any matplotlib colormap name works.")


def _methods(text: str) -> list[str]:
    """Method names from ``--method``, aliases resolved; a method given twice runs once (with a note)."""
    from lumos.api import method_class
    from lumos.runner import parse_list

    names = [method_class(m).name for m in parse_list(text, what="method")]
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        twice = [n for n in unique if names.count(n) > 1]
        err_console.print(f"note: {', '.join(twice)} given more than once (aliases count as the same method); "
                          "each method runs once.", highlight=False, markup=False)
    return unique


def _setting_kind(name: str, key: str, base: str | None) -> tuple[type | None, bool]:
    """What method ``name``'s constructor wants for ``key``, from its type hint or else its default:
    (``bool``, ``int`` or None for anything else, whether None is allowed)."""
    import inspect

    from lumos.api import method_class

    classes = [method_class(name)]
    if classes[0].name == "smoothgrad":  # passes settings it does not take on to its base method
        classes.append(method_class(base or "gradients"))
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters
            if key in params:
                p = params[key]
                hint = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
                members = {m.strip() for m in hint.split("|")} if p.annotation is not p.empty else set()
                optional = "None" in members or p.default is None
                for kind in (bool, int):
                    if members - {"None"} == {kind.__name__} or (not members and type(p.default) is kind):
                        return kind, optional
                return None, optional
            if not any(q.kind == q.VAR_KEYWORD for q in params.values()):
                break
    return None, True


def check_setting_types(method_kwargs: dict[str, dict]) -> None:
    """``--set`` values of the wrong kind for a true/false or integer setting, as a one-line error before
    any model work (``relu=maybe``, ``batch_size=2.5``)."""
    for name, kwargs in method_kwargs.items():
        for key, value in kwargs.items():
            kind, optional = _setting_kind(name, key, kwargs.get("base"))
            if kind is None or (value is None and optional) or (type(value) is kind):
                continue
            need = "takes true or false" if kind is bool else "needs an integer"
            raise LumosError(f"{name} does not accept the settings {key}={value!r}: {key} {need}"
                             f"{' (or none)' if optional else ''}.")


def _check_choices(bundle, target, layer: str) -> None:
    """Fail before any image is read when the class name/index or layer name cannot work."""
    from lumos.layers import resolve_layers
    from lumos.targets import TargetError

    if layer != "auto":
        resolve_layers(bundle.model, layer)
    labels = bundle.labels
    if labels is None or target is None:
        return
    if isinstance(target, int):
        if not 0 <= target < len(labels):
            raise TargetError(f"Class {target} is out of range: the model has {len(labels)} outputs.")
    elif not re.fullmatch(r"\s*top(?:k:?|-?)(\d+)\s*", target.lower()):
        labels.index_of(target)


def _print_prediction(name: str, prediction) -> None:
    top = ", ".join(f"{label} {p:.2f}" for _, label, p in prediction.top)
    out_console.print(f"{name}: {top}", highlight=False)


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files or directories (walked recursively).")],
    model: ModelOpt = "efficientnet_lite0",
    method: Annotated[str, typer.Option(
        metavar="METHODS", help="Comma-separated methods (see `lumos methods`).")] = "gradcam",
    target: Annotated[str, typer.Option(
        metavar="CLASS", help="top1, topk:N, a class index, or a class name.")] = "top1",
    layer: Annotated[str, typer.Option(metavar="LAYER", help="auto or a layer name (see `lumos layers`).")] = "auto",
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path("out"),
    save: Annotated[str, typer.Option(metavar="FORMATS", help="What to write: png, npy or png,npy.")] = "png",
    colormap: Annotated[str, typer.Option(metavar="NAME", help="Matplotlib colormap for overlays.")] = "jet",
    alpha: Annotated[float, typer.Option(metavar="0..1", help="Overlay opacity in [0, 1].")] = 0.5,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per forward.")] = 8,
    gallery: Annotated[bool, typer.Option(help="Also write gallery.png (rows = images).")] = False,
    settings: SettingsOpt = None,
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
) -> None:
    """Explain images: write one overlay per image and method, print the top-3 predictions."""
    from lumos.io import find_images, load_image
    from lumos.method_settings import check_settings, parse_settings
    from lumos.runner import SAVE_FORMATS, explain_images, parse_list, parse_target, write_gallery

    methods = _methods(method)
    method_kwargs = parse_settings(settings or [], methods)
    check_setting_types(method_kwargs)
    formats = parse_list(save, SAVE_FORMATS, what="save format")
    if not 0 <= alpha <= 1:
        raise LumosError(f"--alpha must be between 0 and 1, got {alpha}.")
    _positive(batch_size, "--batch-size")
    _check_colormap(colormap)
    _check_out(out)
    bundle = _load(model, weights, size, mean, std, labels)
    check_settings(method_kwargs, bundle.model, layer, bundle.labels, bundle.preprocess)
    spec = parse_target(target)
    _check_choices(bundle, spec, layer)
    files, problems = find_images(images)
    failures = [(str(p), f"{p}: {why}") for p, why in problems]
    if files:
        _make_dir(out)
    with _progress() as progress, _writing(out):
        task = progress.add_task("explaining", total=len(files))

        def on_image(name: str, prediction, error: str | None) -> None:
            progress.advance(task)
            if error is None:
                _print_prediction(name, prediction)

        report = explain_images(
            bundle.model, bundle.preprocess, [(str(f), _loader(load_image, f)) for f in files], methods,
            labels=bundle.labels, target=spec, layer=layer, out=out, save=formats,
            colormap=colormap, alpha=alpha, batch_size=batch_size, on_image=on_image, method_kwargs=method_kwargs,
        )
    if gallery and report.results:
        with _writing(out):
            report.written.append(write_gallery(report, out / "gallery.png", methods))
    failures += report.failures
    for _, reason in failures:
        err_console.print(f"error: {_cli_wording(reason)}", highlight=False, markup=False)
    out_console.print(
        f"Explained {len(report.results)} image(s) with {len(methods)} method(s): "
        f"{len(report.written)} file(s) in {out}/" + (f"; {len(failures)} failed" if failures else ""),
        highlight=False,
    )
    if failures or not report.results:
        raise typer.Exit(1)


def _loader(load: Callable, path: Path) -> Callable:
    return lambda: load(path)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path("out"),
    method: Annotated[str, typer.Option(metavar="METHODS", help="Comma-separated methods.")] = DEMO_METHODS,
) -> None:
    """Explain the bundled sample photos with the bundled model; write overlays and gallery.png."""
    from lumos.io import sample_images
    from lumos.runner import explain_images, write_gallery

    methods = _methods(method)
    _check_out(out)
    bundle = _load("efficientnet_lite0", None, None, None, None, None)
    _make_dir(out)

    def on_image(name: str, prediction, error: str | None) -> None:
        if error is None:
            _print_prediction(name, prediction)

    with _writing(out):
        report = explain_images(
            bundle.model, bundle.preprocess, list(sample_images().items()), methods, labels=bundle.labels, out=out,
            on_image=on_image,
        )
        path = write_gallery(report, out / "gallery.png", methods)
    out_console.print(f"Wrote {len(report.written)} overlays and the gallery {path}", highlight=False)


@app.command()
def layers(
    model: ModelOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    all: Annotated[bool, typer.Option("--all", help="Also list layers without a 4-D map output.")] = False,
) -> None:
    """List the model's layers with their output shapes (one dry forward); mark the auto choice."""
    import torch

    from lumos.capture import model_guard
    from lumos.layers import LayerError, auto_layer, trace_layers

    bundle = _load(model, weights, size, mean, std, None)
    h, w = bundle.preprocess.hw
    x = torch.zeros(1, 3, h, w)
    with model_guard(bundle.model):
        infos = trace_layers(bundle.model, x)
        try:
            chosen = auto_layer(bundle.model, x)
        except LayerError:  # no layer gives a map: nothing to mark, the listing still stands
            chosen = None
    shown = [info for info in infos if all or (info.shape is not None and len(info.shape) == 4)]
    for info in shown:
        shape = "x".join(map(str, info.shape[1:])) if info.shape else "-"
        mark = "  <- auto" if info.name == chosen else ""
        calls = f"  (runs {info.calls}x)" if info.calls > 1 else ""
        out_console.print(f"{info.name:<40} {info.type:<20} {shape}{calls}{mark}", highlight=False)
    if not shown:
        out_console.print(f"No layer of this model outputs a 4-D map (B x C x H x W), so there is none to explain; "
                          f"`lumos layers --all` lists every layer ({len(infos)}).", highlight=False, markup=False)


@app.command("methods")
def list_methods() -> None:
    """List the explanation methods."""
    from lumos.api import method_class, methods

    width = max(map(len, methods()))
    for name in methods():
        doc = (method_class(name).__doc__ or "").strip().splitlines()[0]
        out_console.print(f"{name:<{width}}  {doc}", highlight=False)


@app.command()
def models() -> None:
    """List the bundled models."""
    from lumos.zoo import models as zoo_models

    for name in zoo_models():
        out_console.print(name, highlight=False)


@app.command()
def features(
    images: Annotated[list[Path], typer.Argument(help="Image files or directories.")],
    model: ModelOpt = "efficientnet_lite0",
    layer: Annotated[str, typer.Option(metavar="LAYER", help="auto or a layer name (see `lumos layers`).")] = "auto",
    n: Annotated[int, typer.Option(metavar="N", help="How many channels (the most active) to show.")] = 16,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path("out"),
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Write a grid of a layer's most active feature maps for each image."""
    import torch

    from lumos.api import feature_maps
    from lumos.io import find_images, load_image
    from lumos.render import feature_grid
    from lumos.runner import RunReport

    _positive(n, "--n")
    _check_out(out)
    bundle = _load(model, weights, size, mean, std, None)
    h, w = bundle.preprocess.hw
    feature_maps(bundle.model, torch.zeros(1, 3, h, w), layer=layer, n=n)  # a bad layer fails once, not per image
    names = RunReport()  # unique output stems: a/x.png and b/x.png write x_... and x_2_...
    files, problems = find_images(images)
    failures = [f"{p}: {why}" for p, why in problems]
    if files:
        _make_dir(out)
    for f in files:
        try:
            fm = feature_maps(bundle.model, bundle.preprocess([load_image(f)]), layer=layer, n=n)
        except LumosError as err:
            failures.append(str(err))
            continue
        path = out / f"{names.stem(str(f))}_features_{fm.layer.replace('.', '_')}.png"
        with _writing(out):
            feature_grid(fm.activations[0], n=n, out=path)
        out_console.print(f"{f}: layer {fm.layer}, channels {fm.top_channels[0].tolist()} -> {path}", highlight=False)
    for reason in failures:
        err_console.print(f"error: {_cli_wording(reason)}", highlight=False, markup=False)
    if failures:
        raise typer.Exit(1)


def _usage_errors() -> tuple[type[Exception], ...]:
    """Typer >= 0.2x vendors click (its errors derive from TyperException); older typer uses click itself."""
    kinds: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        kinds.append(typer.TyperException)
    try:
        import click
    except ImportError:
        pass
    else:
        kinds.append(click.ClickException)
    return tuple(kinds)


def _register_subcommands() -> None:
    from lumos.cli_app import register as register_app
    from lumos.cli_evaluate import register as register_evaluate

    register_evaluate(app)
    register_app(app)
    for info in app.registered_commands:  # every command's --help shows metavars, not Python types
        if info.cls in (None, TyperCommand):
            info.cls = TidyCommand


_register_subcommands()


def _cli_wording(message: str) -> str:
    """A library message as the command line shows it: one line, the Python argument ``layer=`` as ``--layer``."""
    one_line = re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())
    return re.sub(r"(?<![\w./\\-])layer=(?:\s+|(?=['\"])|$)", "--layer ", one_line).rstrip()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: ``warning: ...`` on one line, no source location."""
    err_console.print(f"warning: {_cli_wording(str(message))}", highlight=False, markup=False)


class _OneLineHandler(logging.Handler):
    """Log records as ``warning: ...`` / ``error: ...`` lines on stderr, like the command's own messages."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _cli_wording(record.getMessage())
        except Exception:  # a broken format string must not end the command
            text = str(record.msg)
        err_console.print(f"{record.levelname.lower()}: {text}", highlight=False, markup=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user mistakes into one-line errors and warnings into one-line notes."""
    logging.basicConfig(level=logging.WARNING, handlers=[_OneLineHandler()])
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as the return value n
    except LumosError as err:
        err_console.print(f"error: {_cli_wording(str(err))}", highlight=False, markup=False)
        return 2
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted", highlight=False)
        return 130
    except Exception as err:  # usage errors (unknown option, missing argument) carry their own message
        if isinstance(err, _usage_errors()):
            show = getattr(err, "show", None)
            if show is not None:
                show()
            else:
                err_console.print(f"error: {err}", highlight=False, markup=False)
            return int(getattr(err, "exit_code", 2))
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
