"""``lumos evaluate``: score explanation methods on images (faithfulness) or on the synthetic ground-truth
benchmark (faithfulness + localisation), optionally with the cascading randomisation sanity check.

Add to the main app with ``register(app)``. Writes ``evaluation.csv``, ``evaluation.json``, ``curves.png``
(and ``sanity.png`` with ``--sanity``) to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lumos.cli_options import MeanOpt, ModelOpt, SettingsOpt, SizeOpt, StdOpt, WeightsOpt
from lumos.errors import LumosError

BENCHMARKS = ("synthetic",)
DEFAULT_METHODS = "gradcam,gradcam++,scorecam,layercam,eigencam"


def evaluate(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or directories.")] = None,
    model: ModelOpt = "efficientnet_lite0",
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods, or 'all' (see `lumos methods`).")
    ] = DEFAULT_METHODS,
    benchmark: Annotated[str | None, typer.Option(help="Run a ground-truth benchmark instead: synthetic.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("evaluation"),
    sanity: Annotated[bool, typer.Option(help="Add the cascading randomisation test and sanity.png.")] = False,
    steps: Annotated[int | None, typer.Option(help="Deletion/insertion steps (default 100; 64 for synthetic).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward in multi-pass metrics.")] = 64,
    layer: Annotated[str, typer.Option(help="auto or a layer name for CAM methods.")] = "auto",
    n: Annotated[int, typer.Option(help="Images in the synthetic benchmark.")] = 100,
    tolerance: Annotated[float | None, typer.Option(help="Pointing-game tolerance in pixels (synthetic: 2).")] = None,
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    settings: SettingsOpt = None,
) -> None:
    """Which explanation can be trusted? Deletion/insertion, average drop, pointing game, sanity checks."""
    from lumos.api import method_class
    from lumos.api import methods as all_methods
    from lumos.cli_common import _load, _make_dir, err_console, out_console
    from lumos.evaluate.benchmark import evaluate_methods, synthetic_benchmark
    from lumos.evaluate.report import format_table, plot_curves, plot_sanity, write_csv, write_json
    from lumos.explainer import ExplainSpec, supply_objects
    from lumos.method_settings import parse_settings
    from lumos.runner import parse_list

    names = all_methods() if methods.strip().lower() == "all" else [
        method_class(m).name for m in parse_list(methods, what="method")
    ]
    method_kwargs = parse_settings(settings or [], names)
    ExplainSpec(methods=tuple(names), settings=method_kwargs)  # every name and value checked before any work
    if steps is not None and steps < 1 or batch_size < 1 or n < 1:
        raise LumosError("--steps, --batch-size and --n must be positive integers.")
    if tolerance is not None and tolerance < 0:
        raise LumosError(f"--tolerance must be >= 0 pixels, got {tolerance}.")
    picture = None
    bad_inputs: list[str] = []
    if benchmark is not None:
        if benchmark.lower() not in BENCHMARKS:
            raise LumosError(f"Unknown benchmark '{benchmark}'; use: {', '.join(BENCHMARKS)}.")
        if images:
            raise LumosError("Give either image files or --benchmark, not both.")

        _make_dir(out)
        report = synthetic_benchmark(
            names, n=n, steps=steps or 64, batch_size=batch_size,
            tolerance=2.0 if tolerance is None else tolerance, sanity=sanity, method_kwargs=method_kwargs,
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
        bundle = _load(model, weights, size, mean, std, None)
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
        x = torch.cat(tensors)
        _make_dir(out)
        report = evaluate_methods(
            bundle.model, x, names, layer=layer, steps=steps or 100, batch_size=batch_size,
            tolerance=15.0 if tolerance is None else tolerance, sanity=sanity, method_kwargs=method_kwargs,
        )
        report.meta.update({"model": model, "images": [str(f) for f in loaded]})
        picture = bundle.preprocess.denormalize(x[:1])[0].permute(1, 2, 0).numpy()
    for name, why in report.failures.items():
        err_console.print(f"warning: {name} skipped: {why}", highlight=False, markup=False)
    for reason in bad_inputs:
        err_console.print(f"error: {reason}", highlight=False, markup=False)
    if not report.rows:
        raise LumosError("No method could be evaluated.")
    out_console.print(format_table(report) + "\n(* = best per column)", highlight=False, markup=False)
    written = [write_csv(report, out / "evaluation.csv"), write_json(report, out / "evaluation.json"),
               plot_curves(report, out / "curves.png")]
    if sanity and report.sanity:
        written.append(plot_sanity(report, out / "sanity.png", picture))
    out_console.print("Wrote " + ", ".join(str(p) for p in written)
                      + (f"; {len(bad_inputs)} input(s) failed" if bad_inputs else ""), highlight=False)
    if bad_inputs:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app`` (idempotent)."""
    if any(getattr(c, "name", None) == "evaluate" for c in app.registered_commands):
        return
    app.command("evaluate")(evaluate)
