"""``lumos explain-dataset`` (a whole data set into a resumable Parquet store, locally or on Ray) and
``lumos report`` (where the model looks, per class, from a store).

Add to the main app with ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    WeightsOpt,
)
from lumos.errors import LumosError

_PREDICTED = ("predicted", "pred", "top1", "top-1")
_LABEL = ("label", "true", "true-label")


def _target(text: str) -> tuple[str, str | None]:
    """``--target`` -> (run mode, fixed class for the spec)."""
    key = text.strip().lower()
    if key in _PREDICTED:
        return "predicted", None
    if key in _LABEL:
        return "label", None
    if key == "both":
        return "both", None
    return "class", text.strip()


def explain_dataset(
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUTS...", help="Folders (class sub-folders give labels), globs, list files (path[,label] per "
        "line) or Parquet tables (path, label, box columns).")],
    store: Annotated[Path, typer.Option(metavar="DIR", help="The result store (created, or resumed).")] = Path(
        "lumos-store"),
    model: ModelOpt = "efficientnet_lite0",
    method: MethodOpt = "gradcam",
    target: Annotated[str, typer.Option(
        metavar="predicted|label|both|CLASS", help="Which class each map explains: the predicted one, the image's "
        "label, both (two maps per image), or one fixed class.")] = "predicted",
    layer: Annotated[str, typer.Option(metavar="LAYER", help="auto or a layer name (see `lumos layers`).")] = "auto",
    engine: Annotated[str, typer.Option(metavar="local|ray", help="local: decode workers feed one model here; "
                                        "ray: Ray Data actors (needs the ray extra of lumos).")] = "local",
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per forward.")] = 32,
    workers: Annotated[int, typer.Option(metavar="N", help="Decode processes (local engine; 0: decode here).")] = 2,
    chunk_size: Annotated[int, typer.Option(metavar="N", help="Images per store chunk (the unit of resuming).")] = 1024,
    map_dtype: Annotated[str, typer.Option(
        metavar="uint8|float16|float32", help="Stored map precision (uint8: with each map's min and max).")] = "uint8",
    map_size: Annotated[int | None, typer.Option(
        metavar="N", help="Stored map side (default: the layer's resolution for CAMs, at most 32 for others).")] = None,
    restart: Annotated[bool, typer.Option(help="Start the store over (its rows are deleted) if it was made with "
                                          "another spec or other images.")] = False,
    report: Annotated[bool, typer.Option(help="Also write STORE/report/ (see `lumos report`).")] = False,
    address: Annotated[str | None, typer.Option(metavar="ADDRESS", help="Ray: join this cluster (auto, "
                                                "ray://HOST:10001); default: start Ray here.")] = None,
    concurrency: Annotated[int, typer.Option(metavar="N", help="Ray: number of model actors.")] = 1,
    num_gpus: Annotated[float, typer.Option(metavar="N", help="Ray: GPUs per actor (0.5 shares one).")] = 0.0,
    threads: Annotated[int, typer.Option(metavar="N", help="Ray: CPU threads per actor.")] = 1,
    settings: SettingsOpt = None,
    output: OutputOpt = None,
    probs: ProbsOpt = "auto",
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Explain a whole data set into a Parquet store: resumable (re-run the same command after a crash),
    with a progress bar; `lumos report STORE` then shows where the model looks, per class."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lumos.cli_common import _floats, _load_parsed, err_console, on_tty, out_console, parse_methods
    from lumos.dataset import RunOptions
    from lumos.dataset import explain_dataset as run
    from lumos.explainer import Explainer, ExplainSpec, ModelSpec
    from lumos.method_settings import parse_settings

    mode, fixed = _target(target)
    options = RunOptions(target=mode, map_dtype=map_dtype, map_size=map_size, chunk_size=chunk_size)
    methods = parse_methods(method)
    out_index = None if output is None or not output.strip() else (
        int(output) if output.strip().lstrip("-").isdigit() else output.strip())
    spec = ExplainSpec(
        model=ModelSpec(model, None if weights is None else str(weights), size, _floats(mean), _floats(std),
                        None if labels is None else str(labels)),
        methods=tuple(methods), settings=parse_settings(settings or [], methods), target=fixed, layer=layer,
        output=out_index, probs=probs, device=device,
    )
    if engine not in ("local", "ray"):
        raise LumosError(f"Unknown --engine '{engine}'; use local or ray.")
    if engine == "ray":  # Ray's own notes (start-up, execution plans) are not this command's messages
        import logging

        from lumos.dataset.ray_engine import import_ray

        import_ray()
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    m = spec.model  # loaded here once (TorchScript refused before it runs): layer, class and labels checked
    explainer = Explainer(spec, _load_parsed(m.name, m.weights, m.size, m.mean, m.std, m.labels, device))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} images/s"), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=not on_tty(err_console)) as progress:
        task = progress.add_task("explaining", total=None, rate="-")

        def on_start(total: int, done: int) -> None:
            progress.update(task, total=total, completed=done)

        def on_batch(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f}" if speed else "-")

        try:
            result = run(inputs, spec, store, options=options, engine=engine, batch_size=batch_size,
                         workers=workers, restart=restart, on_start=on_start, on_batch=on_batch, explainer=explainer,
                         ray={"address": address, "concurrency": concurrency, "num_gpus": num_gpus,
                              "threads": threads})
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"interrupted: the finished chunks are kept in {store}; run the same command again to "
                              "finish the rest (finished chunks are skipped).", highlight=False, markup=False)
            raise typer.Exit(130) from None
    for path, why in result.problems:
        err_console.print(f"warning: {path}: {why}", highlight=False, markup=False)
    if result.unknown_labels:
        shown = ", ".join(f"'{label}' (from {source})" for label, source in result.unknown_labels[:3])
        more = f" and {len(result.unknown_labels) - 3} more" if len(result.unknown_labels) > 3 else ""
        err_console.print(f"note: {len(result.unknown_labels)} label(s) are not classes of the model, so they are "
                          f"kept as text but not used (the report groups their images by the predicted class): "
                          f"{shown}{more}", highlight=False, markup=False)
    errors, blank, failed_images = _error_and_blank_rows(result.store)
    failed = (f"; {len(failed_images)} failed (rows with their error: unreadable, or a NaN score)" if failed_images
              else "")
    unlabelled = (f"; {result.unlabelled} without a label (their predicted-class map only)" if result.unlabelled
                  else "")
    out_console.print(f"{result.images} image(s) in {result.store}/: {result.explained} processed now, "
                      f"{result.skipped} already done{unlabelled}{failed}", highlight=False)
    _say_failed(failed_images, result.store)
    if blank:
        from lumos.engine import BLANK_REASON

        err_console.print(f"warning: {blank} map(s) are zero everywhere (map_lo = map_hi = 0): nothing to draw. "
                          f"{BLANK_REASON}", highlight=False, markup=False)
    if report:
        _report_or_exit(result.store, result.store / "report", None, None, 8)
    if errors or result.problems:  # finished, but some inputs failed: exit 1, as `lumos explain`
        raise typer.Exit(1)


def _error_and_blank_rows(store: Path) -> tuple[int, int, list[tuple[str, str]]]:
    """Error rows (unreadable images, NaN scores), rows whose map is zero everywhere, and the failed images
    (path, the first error of each) in store order."""
    import pyarrow.compute as pc

    from lumos.dataset import read_store

    table = read_store(store, columns=["path", "error", "map_lo", "map_hi"])
    ok = pc.is_null(table.column("error"))
    zero = pc.and_(pc.equal(table.column("map_lo"), 0), pc.equal(table.column("map_hi"), 0))
    bad = table.filter(pc.invert(ok)).select(["path", "error"]).to_pylist()
    failed: dict[str, str] = {}
    for r in bad:
        failed.setdefault(r["path"], r["error"])
    return len(bad), int(pc.sum(pc.and_(ok, zero)).as_py() or 0), list(failed.items())


def _say_failed(failed: list[tuple[str, str]], store: Path, show: int = 5) -> None:
    """The first ``show`` failed images with their one-line reason, and where all of them are."""
    from lumos.cli_common import err_console

    if not failed:
        return
    for path, error in failed[:show]:
        why = " ".join(str(error).split())
        err_console.print(f"failed: {why if path in why else f'{path}: {why}'}", highlight=False, markup=False)
    more = f"{len(failed) - show} more failed image(s); " if len(failed) > show else ""
    err_console.print(f"note: {more}every failed image is a row of {store} with its 'error' (lumos.dataset."
                      f"read_store, or pandas.read_parquet('{store / 'chunks'}'))", highlight=False, markup=False)


def report_command(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="A store written by `lumos explain-dataset`.")],
    out: Annotated[Path | None, typer.Option(metavar="DIR", help="Where to write report.png, report.html and "
                                             "report.json (default: STORE/report).")] = None,
    method: Annotated[str | None, typer.Option(metavar="METHOD", help="Whose maps (default: the first).")] = None,
    target: Annotated[str | None, typer.Option(metavar="predicted|label|class",
                                               help="Which maps (default: the first the run made).")] = None,
    top: Annotated[int, typer.Option(metavar="N", help="Images listed with the most mass outside the object.")] = 8,
) -> None:
    """Where the model looks, per class: mean maps, misclassified mean maps, peak locations, and classes and
    images ranked by how much of their maps lies outside the object."""
    _report_or_exit(store, out or store / "report", method, target, top)


def _report_or_exit(store: Path, out: Path, method: str | None, target: str | None, top: int) -> None:
    """The report; a store with no map to report is a one-line error and exit 1 (its rows failed), no file."""
    from lumos.cli_common import _make_dir, _writing, err_console, out_console
    from lumos.dataset.report import NothingToReport, dataset_report, write_report

    if top < 0:
        raise LumosError(f"--top must be 0 or more, got {top}.")
    try:
        rep = dataset_report(store, method=method, target_kind=target, top=top)
    except NothingToReport as err:
        err_console.print(f"error: {err}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    _make_dir(out)
    with _writing(out):
        written = write_report(rep, out)
    first = rep.classes[0] if rep.classes else None
    if first is not None:
        out_console.print(f"Most mass {rep.outside_measure}: {first.name} ({first.outside:.0%}); its mean map "
                          f"peaks at x={first.mean_map_peak[0]:.2f}, y={first.mean_map_peak[1]:.2f}.",
                          highlight=False)
    out_console.print("Wrote " + ", ".join(str(p) for p in written), highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``explain-dataset`` and ``report`` commands to ``app`` (idempotent)."""
    names = {getattr(c, "name", None) for c in app.registered_commands}
    if "explain-dataset" not in names:
        app.command("explain-dataset")(explain_dataset)
    if "report" not in names:
        app.command("report")(report_command)
