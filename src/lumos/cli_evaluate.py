"""``lumos evaluate``: score explanation methods on images (faithfulness) or on the synthetic ground-truth
benchmark (faithfulness + localisation), optionally with the cascading randomisation sanity check.

Add to the main app with ``register(app)``. Writes ``evaluation.csv``, ``evaluation.json``, ``curves.png``
(and ``sanity.png`` with ``--sanity``) to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lumos.cli_evaluate_tasks import check_steps
from lumos.cli_options import DeviceOpt, MeanOpt, ModelOpt, SettingsOpt, SizeOpt, StdOpt, WeightsOpt
from lumos.errors import LumosError

BENCHMARKS = ("synthetic", "synthetic-detection", "synthetic-segmentation")
DEFAULT_METHODS = "gradcam,gradcam++,scorecam,layercam,eigencam"
EvaluateMethodOpt = Annotated[str | None, typer.Option(
    "--method", "--methods", metavar="METHODS",
    help=f"Comma-separated methods or aliases, or all (see `lumos methods`). Default: {DEFAULT_METHODS}; the "
         "detection and segmentation benchmarks: every method that explains a box.")]


def evaluate(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or directories.")] = None,
    model: ModelOpt = "efficientnet_lite0",
    method: EvaluateMethodOpt = None,
    benchmark: Annotated[str | None, typer.Option(
        help="Run a ground-truth benchmark instead: synthetic, synthetic-detection or synthetic-segmentation.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("evaluation"),
    sanity: Annotated[bool, typer.Option(help="Add the cascading randomisation test and sanity.png.")] = False,
    steps: Annotated[int | None, typer.Option(
        help="Deletion/insertion steps (default 100; 64 for the synthetic benchmarks).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward in multi-pass metrics.")] = 64,
    layer: Annotated[str, typer.Option(help="auto or a layer name for CAM methods.")] = "auto",
    n: Annotated[int, typer.Option(help="Images in the synthetic benchmark.")] = 100,
    tolerance: Annotated[float | None, typer.Option(help="Pointing-game tolerance in pixels (synthetic: 2).")] = None,
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    settings: SettingsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Which explanation can be trusted, for this model? Deletion/insertion, average drop, pointing game, sanity
    checks; a table, a plain-language reading and a recommended method."""
    from lumos.cli_common import StepProgress, _load, _make_dir, err_console, format_times, out_console, parse_methods
    from lumos.evaluate.benchmark import RANDOM, SYNTHETIC_MODELS, evaluate_methods, synthetic_benchmark
    from lumos.evaluate.report import (
        STAR_NOTE,
        format_reading,
        format_table,
        plot_curves,
        plot_sanity,
        read_report,
        tie_note,
        undefined_note,
        write_csv,
        write_json,
    )
    from lumos.explainer import ExplainSpec, resolve_device, supply_objects
    from lumos.method_settings import parse_settings

    if benchmark is not None and benchmark.lower() in BENCHMARKS[1:]:  # per box / class region: cli_evaluate_tasks
        from lumos.cli_evaluate_tasks import evaluate_task_benchmark

        return evaluate_task_benchmark(
            benchmark.lower(), images=images, model=model, method=method,
            out=out, sanity=sanity, steps=steps, batch_size=batch_size, layer=layer, n=n, tolerance=tolerance,
            settings=settings, device=device, default_model="efficientnet_lite0")
    names = parse_methods(DEFAULT_METHODS if method is None else method,
                          transformer=benchmark is not None and model.lower() == "vit")
    method_kwargs = parse_settings(settings or [], names)
    ExplainSpec(methods=tuple(names), settings=method_kwargs)  # every name and value checked before any work
    where = resolve_device(device)
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--n", n)):
        if value is not None and value < 1:
            raise LumosError(f"{flag} must be a positive integer, got {value}.")
    if tolerance is not None and tolerance < 0:
        raise LumosError(f"--tolerance must be >= 0 pixels, got {tolerance}.")
    picture = None
    bad_inputs: list[str] = []
    if benchmark is not None:
        if benchmark.lower() not in BENCHMARKS:
            raise LumosError(f"Unknown benchmark '{benchmark}'; use: {', '.join(BENCHMARKS)}.")
        if images:
            raise LumosError("Give either image files or --benchmark, not both.")

        _check_fits(n)
        from lumos.synthetic import make_dataset as _synthetic_images

        check_steps(steps, tuple(_synthetic_images(1, seed=123).images.shape[-2:]))
        net = "tinycnn" if model == "efficientnet_lite0" else model.lower()  # the zoo default means TinyCNN here
        if net not in SYNTHETIC_MODELS:
            raise LumosError(f"--benchmark synthetic runs --model {' or '.join(SYNTHETIC_MODELS)}, not '{model}'.")
        _make_dir(out)
        with StepProgress("evaluate", len(names) + 1, err_console) as progress:
            report = synthetic_benchmark(
                names, n=n, steps=steps or 64, batch_size=batch_size,
                tolerance=2.0 if tolerance is None else tolerance, sanity=sanity, method_kwargs=method_kwargs,
                on_method=progress.step, device=where, model=net,
            )
        if sanity:
            from lumos.synthetic import make_dataset

            picture = make_dataset(n, seed=123).images[0].permute(1, 2, 0).numpy()
    else:
        if not images:
            raise LumosError("Give image files or directories to evaluate, or --benchmark synthetic.")
        import torch

        from lumos.io import find_images, load_image
        from lumos.zoo import refuse_torchscript

        refuse_torchscript(model)  # no hooks on a ScriptModule: refuse the file before any code in it runs
        bundle = _load(model, weights, size, mean, std, None, str(where))
        method_kwargs = supply_objects(method_kwargs, preprocess=bundle.preprocess)
        if layer != "auto":
            from lumos.layers import resolve_layers

            resolve_layers(bundle.model, layer)
        files, problems = find_images(images)
        bad_inputs = [f"{p}: {why}" for p, why in problems]
        loaded, tensors = [], []
        for f in files:  # as in explain: a bad image is one error line, the others are still evaluated
            try:
                tensors.append(bundle.preprocess([load_image(f)]))
            except LumosError as err:
                bad_inputs.append(str(err))
            else:
                loaded.append(f)
        if not loaded:  # nothing to evaluate: the reasons are the whole answer
            for reason in bad_inputs:
                err_console.print(f"error: {reason}", highlight=False, markup=False)
            raise typer.Exit(2)
        x = torch.cat(tensors).to(where)
        check_steps(steps, tuple(x.shape[-2:]))
        _make_dir(out)
        with StepProgress("evaluate", len(names) + 1, err_console) as progress:
            report = evaluate_methods(
                bundle.model, x, names, layer=layer, steps=steps or 100, batch_size=batch_size,
                tolerance=15.0 if tolerance is None else tolerance, sanity=sanity, method_kwargs=method_kwargs,
                on_method=progress.step,
            )
        report.meta.update({"model": model, "images": [str(f) for f in loaded], "device": str(where)})
        picture = bundle.preprocess.denormalize(x[:1].cpu())[0].permute(1, 2, 0).numpy()
    for name, why in report.failures.items():
        err_console.print(f"warning: {name} skipped: {why}", highlight=False, markup=False)
    for reason in bad_inputs:
        err_console.print(f"error: {reason}", highlight=False, markup=False)
    if not report.rows:
        raise LumosError("No method could be evaluated.")
    blank = "".join(f"\n{note}" for note in (undefined_note(report), tie_note(report)) if note)
    out_console.print(format_table(report) + "\n" + STAR_NOTE + blank, highlight=False,
                      markup=False)
    out_console.print(format_times({m: progress.times[m] for m in [*names, RANDOM] if m in progress.times}),
                      highlight=False, markup=False)
    out_console.print("\n" + "\n".join(format_reading(read_report(report), _how)), highlight=False, markup=False)
    written = [write_csv(report, out / "evaluation.csv"), write_json(report, out / "evaluation.json"),
               plot_curves(report, out / "curves.png")]
    if sanity and report.sanity:
        written.append(plot_sanity(report, out / "sanity.png", picture))
    out_console.print("Wrote " + ", ".join(str(p) for p in written)
                      + (f"; {len(bad_inputs)} input(s) failed" if bad_inputs else ""), highlight=False)
    if bad_inputs:
        raise typer.Exit(1)


def _check_fits(n: int) -> None:
    """A one-line error when ``n`` synthetic images (64 x 64 RGB float32 and a mask each) cannot fit in the
    memory this machine has free (where it says; a MemoryError traceback otherwise)."""
    import os

    per_image = 3 * 64 * 64 * 4 + 64 * 64
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    if n * per_image > free:
        raise LumosError(f"--n {n} synthetic images need {n * per_image / 2**30:.1f} GiB; this machine has "
                         f"{free / 2**30:.1f} GiB free. Use --n {max(1, free // per_image // 2)} or fewer.")


def _how(names: list[str]) -> str:
    return " or ".join(f"--method {n}" for n in names)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app`` (idempotent)."""
    if any(getattr(c, "name", None) == "evaluate" for c in app.registered_commands):
        return
    app.command("evaluate")(evaluate)
