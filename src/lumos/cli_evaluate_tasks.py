"""``lumos evaluate --benchmark synthetic-detection|synthetic-segmentation``: the per-box benchmark of the shipped
detector (:mod:`lumos.evaluate.detection_benchmark`) or the per-class-region benchmark of the shipped segmenter
(:mod:`lumos.evaluate.segmentation_benchmark`), with the outputs of ``--benchmark synthetic``: a table and a
reading on stdout, ``evaluation.csv``, ``evaluation.json`` and ``curves.png`` (deletion) in ``--out``."""

from __future__ import annotations

from pathlib import Path

from lumos.errors import LumosError

#: benchmark -> the one model it runs (the shipped synthetic task model)
TASK_BENCHMARKS = {"synthetic-detection": "tinydetector", "synthetic-segmentation": "tinysegmenter"}


def evaluate_task_benchmark(
    benchmark: str, *, images: list[Path] | None, model: str, method: str | None, out: Path, sanity: bool,
    steps: int | None, batch_size: int, layer: str, n: int, tolerance: float | None, settings: list[str] | None,
    device: str, default_model: str,
) -> None:
    """Run ``benchmark`` and write its files; every user mistake is a one-line :class:`LumosError`.

    ``method`` None: the benchmark's default methods; ``all``: every method that can explain a box or region (the others
    are listed as skipped). ``default_model``: the command's default ``--model``, which means the benchmark's
    shipped model here."""
    from lumos.cli_common import StepProgress, _make_dir, err_console, format_times, out_console, parse_methods
    from lumos.evaluate.benchmark import RANDOM
    from lumos.evaluate.detection_benchmark import DETECTION_METHODS, detection_benchmark, plot_deletion
    from lumos.evaluate.report import (
        STAR_NOTE,
        format_reading,
        format_table,
        read_report,
        tie_note,
        undefined_note,
        write_csv,
        write_json,
    )
    from lumos.evaluate.segmentation_benchmark import segmentation_benchmark
    from lumos.explainer import ExplainSpec, resolve_device
    from lumos.method_settings import parse_settings
    from lumos.runner import parse_list

    if benchmark not in TASK_BENCHMARKS:
        raise LumosError(f"Unknown task benchmark '{benchmark}'; use: {', '.join(TASK_BENCHMARKS)}.")
    if images:
        raise LumosError("Give either image files or --benchmark, not both.")
    net = TASK_BENCHMARKS[benchmark]
    if model != default_model and model.lower() != net:
        what = "detector" if benchmark == "synthetic-detection" else "segmenter"
        raise LumosError(f"--benchmark {benchmark} runs the shipped {what} (--model {net}), not '{model}'.")
    if sanity:
        raise LumosError(f"--sanity is not available with --benchmark {benchmark}.")
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--n", n)):
        if value is not None and value < 1:
            raise LumosError(f"{flag} must be a positive integer, got {value}.")
    if tolerance is not None and tolerance < 0:
        raise LumosError(f"--tolerance must be >= 0 pixels, got {tolerance}.")
    if steps is not None:
        from lumos.synthetic.scenes import make_scenes

        check_steps(steps, tuple(make_scenes(1, seed=0).images.shape[-2:]))
    every = method is not None and "all" in {m.lower() for m in parse_list(method, what="method")}
    names = list(DETECTION_METHODS) if method is None else parse_methods(method)
    method_kwargs = parse_settings(settings or [], names)
    ExplainSpec(methods=tuple(names), settings=method_kwargs)  # every name and value checked before any work
    where = resolve_device(device)
    _make_dir(out)
    run = detection_benchmark if benchmark == "synthetic-detection" else segmentation_benchmark
    with StepProgress("evaluate", len(names) + 1, err_console) as progress:
        report = run(
            names, n=n, steps=steps or 64, batch_size=batch_size, tolerance=2.0 if tolerance is None else tolerance,
            layer="features.block5" if layer == "auto" else layer, method_kwargs=method_kwargs,
            on_method=progress.step, device=where, skip_unsupported=every,
        )
    for name, why in report.failures.items():
        err_console.print(f"warning: {name} skipped: {why}", highlight=False, markup=False)
    report.meta["device"] = str(where)
    meta = report.meta
    if benchmark == "synthetic-detection":
        found = (f"{meta['boxes']} boxes found of {meta['objects']} objects in {n} scenes "
                 f"(detections >= {meta['score_threshold']} matching an object at IoU >= {meta['match_iou']})")
    else:
        found = (f"{meta['regions']} class regions found of {meta['objects']} in {n} scenes "
                 f"(predicted pixels matching the class's ground truth at IoU >= {meta['match_iou']})")
    notes = (undefined_note(report, "boxes" if benchmark == "synthetic-detection" else "regions"), tie_note(report))
    blank = "".join(f"\n{note}" for note in notes if note)
    out_console.print(found + "\n" + format_table(report) + "\n" + STAR_NOTE + blank,
                      highlight=False, markup=False)
    out_console.print(format_times({m: progress.times[m] for m in [*names, RANDOM] if m in progress.times}),
                      highlight=False, markup=False)
    reading = format_reading(read_report(report), lambda ms: " or ".join(f"--method {m}" for m in ms))
    out_console.print("\n" + "\n".join(reading), highlight=False, markup=False)
    written = [write_csv(report, out / "evaluation.csv"), write_json(report, out / "evaluation.json"),
               plot_deletion(report, out / "curves.png")]
    out_console.print("Wrote " + ", ".join(str(p) for p in written), highlight=False)


def check_steps(steps: int | None, size: tuple[int, ...]) -> None:
    """A one-line error naming ``--steps`` when it asks for more steps than the images have pixels (it was one
    'skipped' warning per method, then "No method could be evaluated")."""
    pixels = size[0] * size[1]
    if steps is not None and steps > pixels:
        raise LumosError(f"--steps {steps} exceeds the {pixels} pixels of each {size[0]} x {size[1]} image; "
                         f"use --steps {pixels} or fewer.")
