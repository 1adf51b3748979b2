"""The ``lumos`` command: explain, demo, layers, methods, models, features.

User mistakes (bad file, unknown name) print one line ``error: ...`` and exit non-zero; never a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from typer.core import TyperCommand

from lumos.cli_common import (
    _check_out,
    _floats,
    _load,
    _make_dir,
    _writing,
    err_console,
    format_times,
    help_style,
    on_tty,
    out_console,
    parse_methods,
    progress_bar,
)
from lumos.cli_options import (
    DeviceOpt,
    LabelsOpt,
    MeanOpt,
    MethodOpt,
    ModelOpt,
    OutputOpt,
    ProbsOpt,
    SettingsOpt,
    SizeOpt,
    StdOpt,
    TidyCommand,
    TidyGroup,
    WeightsOpt,
)
from lumos.engine import BLANK_REASON
from lumos.errors import LumosError

app = typer.Typer(
    cls=TidyGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=help_style(),
    help="lumos: see where a vision model looks, and whether that picture can be trusted.",
)
DEMO_METHODS = "gradcam,gradcam++,scorecam,layercam,eigencam,guided_gradcam,integrated_gradients"
COMMON_COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray")


def _on_tty(console: Console) -> bool:
    return on_tty(console)


def _progress() -> Progress:
    """A progress bar with time left, on a real terminal only (``cli.err_console``)."""
    return progress_bar(err_console)


def _check_scale(scale: str) -> None:
    from lumos.render.scales import SCALES, check_scale

    try:
        check_scale(scale)
    except ValueError:
        raise LumosError(f"--scale {scale!r} is not known; use one of {', '.join(SCALES)}.") from None


def _positive(value: int, option: str) -> None:
    if value < 1:
        raise LumosError(f"{option} must be a positive integer, got {value}.")


def _check_colormap(name: str) -> None:
    import matplotlib

    from lumos.errors import close_matches

    if name not in matplotlib.colormaps:
        raise LumosError(f"Unknown colormap '{name}' (--colormap).{close_matches(name, matplotlib.colormaps)} "
                         f"Common ones: {', '.join(COMMON_COLORMAPS)}; any matplotlib colormap name works.")


def _print_prediction(name: str, prediction) -> None:
    top = ", ".join(f"{label} {p:.2f}" for _, label, p in prediction.top)
    out_console.print(f"{name}: {top}", highlight=False)


@app.command()
def explain(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files or directories (walked recursively).")],
    model: ModelOpt = "efficientnet_lite0",
    method: MethodOpt = "gradcam",
    target: Annotated[str, typer.Option(
        metavar="CLASS", help="top1, topk:N, a class index, or a class name.")] = "top1",
    layer: Annotated[str, typer.Option(metavar="LAYER", help="auto or a layer name (see `lumos layers`).")] = "auto",
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path("out"),
    save: Annotated[str, typer.Option(metavar="FORMATS", help="What to write: png, npy or png,npy.")] = "png",
    colormap: Annotated[str, typer.Option(metavar="NAME", help="Matplotlib colormap for overlays.")] = "jet",
    alpha: Annotated[float, typer.Option(metavar="0..1", help="Overlay opacity in [0, 1].")] = 0.5,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per forward.")] = 8,
    gallery: Annotated[bool, typer.Option(help="Also write gallery.png (a row per image and class).")] = False,
    scale: Annotated[str, typer.Option(
        metavar="shared|per-map|none", help="Colour scale of the pictures: shared (one scale per image and "
        "method, so a class the model does not believe looks weak), per-map, or none.")] = "shared",
    captions: Annotated[bool, typer.Option(help="Write each overlay with its caption and colour bar.")] = False,
    settings: SettingsOpt = None,
    output: OutputOpt = None,
    probs: ProbsOpt = "auto",
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
    task: Annotated[str, typer.Option(
        metavar="classification|detection|segmentation", help="detection: draw the boxes and explain each one; "
        "segmentation: explain each predicted class region (the shipped synthetic detector / segmenter; "
        "lumos.tasks explains other models from Python).")] = "classification",
) -> None:
    """Explain images: write one overlay per image and method, print the top-3 predictions."""
    from lumos.io import find_images, load_image
    from lumos.runner import SAVE_FORMATS, WHOLE_RUN_WRITE_ERRORS, explain_images, parse_list, write_gallery

    if task != "classification":  # the shipped detector / segmenter: every option honoured or refused there
        from lumos.cli_tasks import explain_task_from_context

        explain_task_from_context(ctx)
        return

    formats = parse_list(save, SAVE_FORMATS, what="save format")
    if not 0 <= alpha <= 1:
        raise LumosError(f"--alpha must be between 0 and 1, got {alpha}.")
    _positive(batch_size, "--batch-size")
    _check_colormap(colormap)
    _check_scale(scale)
    spec = _spec(model, method, settings, target, layer, output, probs, weights, size, mean, std, labels, device)
    _check_out(out)
    explainer = _explainer(spec)
    files, problems = find_images(images)
    failures = [(str(p), f"{p}: {why}") for p, why in problems]
    if files:
        _make_dir(out)
    methods = spec.method_names
    with _progress() as progress, _writing(out):
        task = progress.add_task(f"explaining ({methods[0]})", total=len(files) * len(methods))
        times: dict[str, float] = dict.fromkeys(methods, 0.0)

        def on_method(name: str, seconds: float) -> None:  # called as each method ends: name the next one
            times[name] += seconds
            following = methods[(methods.index(name) + 1) % len(methods)]
            progress.update(task, description=f"explaining ({following})")

        def on_image(name: str, prediction, error: str | None) -> None:
            progress.advance(task, len(methods))
            if error is None:
                _print_prediction(name, prediction)

        report = explain_images(
            explainer, [(str(f), _loader(load_image, f)) for f in files], out=out, save=formats,
            colormap=colormap, alpha=alpha, batch_size=batch_size, on_image=on_image, on_method=on_method,
            scale=scale, captions=captions,
        )
    if gallery and report.results:
        try:
            report.written.append(write_gallery(report, out / "gallery.png", methods))
        except OSError as err:  # one failure line with the others, after the summary's files are counted
            if err.errno in WHOLE_RUN_WRITE_ERRORS:
                raise LumosError(f"Cannot write {out / 'gallery.png'}: {err.strerror or err}.") from None
            report.write_failed(out / "gallery.png", err)
    failures += report.failures
    for _, reason in failures:
        err_console.print(f"error: {_cli_wording(reason)}", highlight=False, markup=False)
    for name, maps in report.blank.items():
        shown = ", ".join(maps[:4]) + (f" and {len(maps) - 4} more" if len(maps) > 4 else "")
        err_console.print(f"warning: {name}: {len(maps)} map(s) are zero everywhere, so nothing is drawn: {shown}. "
                          f"{BLANK_REASON}", highlight=False, markup=False)
    if report.results:
        out_console.print(format_times(times), highlight=False)
    out_console.print(
        f"Explained {len(report.results)} image(s) with {len(methods)} method(s): "
        f"{len(report.written)} file(s) in {out}/" + (f"; {len(failures)} failed" if failures else ""),
        highlight=False,
    )
    if failures or not report.results:
        raise typer.Exit(1)


def _spec(model: str, method: str, settings: list[str] | None, target: str, layer: str, output: str | None,
          probs: str, weights: Path | None, size: int | None, mean: str | None, std: str | None,
          labels: Path | None, device: str | None = "auto"):
    """The explanation spec from the command line: every name and value checked before any model work
    (the device too: one that is not present is an error before the model loads)."""
    from lumos.explainer import ExplainSpec, ModelSpec
    from lumos.method_settings import parse_settings

    methods = parse_methods(method)
    return ExplainSpec(
        model=ModelSpec(model, None if weights is None else str(weights), size, _floats(mean), _floats(std),
                        None if labels is None else str(labels)),
        methods=tuple(methods), settings=parse_settings(settings or [], methods), target=target, layer=layer,
        output=_output(output), probs=probs, device=device,
    )


def _output(text: str | None) -> int | str | None:
    """``--output``: an index into a tuple output or a key of a dict output."""
    if text is None or not text.strip():
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


def _explainer(spec):
    """Load the model once (TorchScript refused before it runs) and check layer and class against it."""
    from lumos.cli_common import _load_parsed
    from lumos.explainer import Explainer

    m = spec.model
    return Explainer(spec, _load_parsed(m.name, m.weights, m.size, m.mean, m.std, m.labels))


def _loader(load: Callable, path: Path) -> Callable:
    return lambda: load(path)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path("out"),
    method: MethodOpt = DEMO_METHODS,
    device: DeviceOpt = "auto",
) -> None:
    """Explain the bundled sample photos with the bundled model; write overlays and gallery.png."""
    from lumos.io import sample_images
    from lumos.runner import explain_images, write_gallery

    spec = _spec("efficientnet_lite0", method, None, "top1", "auto", None, "auto", None, None, None, None, None,
                 device)
    _check_out(out)
    explainer = _explainer(spec)
    _make_dir(out)

    times: dict[str, float] = dict.fromkeys(spec.method_names, 0.0)

    def on_image(name: str, prediction, error: str | None) -> None:
        if error is None:
            _print_prediction(name, prediction)

    def on_method(name: str, seconds: float) -> None:
        times[name] += seconds

    with _writing(out):
        report = explain_images(explainer, list(sample_images().items()), out=out, on_image=on_image,
                                on_method=on_method)
        path = write_gallery(report, out / "gallery.png", spec.method_names)
    out_console.print(format_times(times), highlight=False)
    out_console.print(f"Wrote {len(report.written)} overlays and the gallery {path}", highlight=False)


@app.command()
def layers(
    model: ModelOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    all: Annotated[bool, typer.Option("--all", help="Also list layers without a map (4-D or token grid).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """List the model's layers with their output shapes (one dry forward); mark the auto choice.

    Token layers (B x N x D) and channels-last maps show the grid lumos infers, e.g. [tokens 1+14x14]
    (one class token and a 14 x 14 grid) or [NHWC 7x7]."""
    import torch

    from lumos.capture import model_guard
    from lumos.layers import LayerError, auto_layer, trace_layers

    bundle = _load(model, weights, size, mean, std, None, device)
    h, w = bundle.preprocess.hw
    x = torch.zeros(1, 3, h, w, device=_device_of(bundle.model))
    with model_guard(bundle.model):
        infos = trace_layers(bundle.model, x)
        try:
            chosen = auto_layer(bundle.model, x)
        except LayerError:  # no layer gives a map: nothing to mark, the listing still stands
            chosen = None
    shown = [info for info in infos if all or info.layout]
    for info in shown:
        shape = "x".join(map(str, info.shape[1:])) if info.shape else "-"
        layout = f"  [{info.layout}]" if info.layout not in ("", "NCHW") else ""
        mark = "  <- auto" if info.name == chosen else ""
        calls = f"  (runs {info.calls}x)" if info.calls > 1 else ""
        out_console.print(f"{info.name:<40} {info.type:<20} {shape}{layout}{calls}{mark}", highlight=False,
                          markup=False)
    if not shown:
        out_console.print(f"No layer of this model outputs a 4-D map (B x C x H x W) or a token grid, so there is "
                          f"none to explain; `lumos layers --all` lists every layer ({len(infos)}).", highlight=False,
                          markup=False)


@app.command("methods")
def list_methods() -> None:
    """List the explanation methods."""
    from lumos.api import method_class, methods

    width = max(map(len, methods()))
    for name in methods():  # one line each, whole sentences (grep-able; the terminal wraps)
        out_console.print(f"{name:<{width}}  {first_sentence(method_class(name).__doc__ or '')}", highlight=False,
                          soft_wrap=True)


def first_sentence(doc: str) -> str:
    """A docstring's opening sentence: its first lines up to the one ending in a full stop (a summary may wrap
    over several source lines; "et al." inside a line does not end it)."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
        if line.rstrip().endswith("."):
            break
    return " ".join(lines)


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
    device: DeviceOpt = "auto",
) -> None:
    """Write a grid of a layer's most active feature maps for each image."""
    import torch

    from lumos.api import feature_maps
    from lumos.io import find_images, load_image
    from lumos.runner import RunReport

    _positive(n, "--n")
    _check_out(out)
    bundle = _load(model, weights, size, mean, std, None, device)
    where = _device_of(bundle.model)
    h, w = bundle.preprocess.hw
    # a bad layer, or one without a spatial map, fails once here, not per image
    probe = feature_maps(bundle.model, torch.zeros(1, 3, h, w, device=where), layer=layer, n=n)
    if n > probe.activations.shape[1]:
        err_console.print(f"note: layer {probe.layer} has {probe.activations.shape[1]} channels; --n {n} shows all "
                          f"{probe.activations.shape[1]}.", highlight=False, markup=False)
    names = RunReport()  # unique output stems: a/x.png and b/x.png write x_... and x_2_...
    files, problems = find_images(images)
    failures = [f"{p}: {why}" for p, why in problems]
    if files:
        _make_dir(out)
    for f in files:
        try:
            fm = feature_maps(bundle.model, bundle.preprocess([load_image(f)]).to(where), layer=layer, n=n)
        except LumosError as err:
            failures.append(str(err))
            continue
        path = out / f"{names.stem(str(f))}_features_{_file_part(fm.layer)}.png"
        with _writing(out):
            _feature_grid(fm.activations[0].cpu(), n, path, f"{Path(f).name}, layer {fm.layer}")
        top = fm.top_channels[0].tolist()
        shown = ", ".join(map(str, top[:16])) + (f", ... ({len(top) - 16} more)" if len(top) > 16 else "")
        out_console.print(f"{f}: layer {fm.layer}, channels [{shown}] -> {path}", highlight=False)
    for reason in failures:
        err_console.print(f"error: {_cli_wording(reason)}", highlight=False, markup=False)
    if failures:
        raise typer.Exit(1)


def _device_of(model):
    from lumos.explainer import model_device

    return model_device(model)


def _file_part(name: str) -> str:
    """A layer name as part of a file name: ``_blocks.15._project_conv`` -> ``blocks_15_project_conv`` (no
    leading, trailing or doubled underscores, so ``chelsea_features_act1.png``, not ``..._features__act1``)."""
    return re.sub(r"_+", "_", re.sub(r"[^\w-]+", "_", name)).strip("_") or "layer"


def _feature_grid(activations, n: int, path: Path, title: str) -> None:
    """Draw the grid titled with image and layer (when ``render.feature_grid`` takes a title)."""
    import inspect

    from lumos.render import feature_grid

    kwargs = {"title": title} if "title" in inspect.signature(feature_grid).parameters else {}
    feature_grid(activations, n=n, out=path, **kwargs)


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
    from lumos.cli_dataset import register as register_dataset
    from lumos.cli_evaluate import register as register_evaluate

    register_evaluate(app)
    register_dataset(app)
    register_app(app)
    for info in app.registered_commands:  # every command's --help shows metavars, not Python types
        if info.cls in (None, TyperCommand):
            info.cls = TidyCommand


_register_subcommands()


def _cli_wording(message: str) -> str:
    """A library message as the command line shows it: one line, Python arguments (``layer=``, ``output=``,
    ``probs=``) as their options (``--layer``, ...)."""
    one_line = re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())
    for arg in ("layer", "output", "probs", "device"):
        one_line = re.sub(rf"(?<![\w./\\-]){arg}=(?:\s+|(?=['\"<])|$)", f"--{arg} ", one_line)
    return one_line.rstrip()


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
