"""Where logged pictures go: TensorBoard (default), Weights & Biases, MLflow.

A sink takes PIL images with a tag, a step and a caption, and scalars. Each optional package is
imported only when its sink is created; a missing one is a one-line ``LumosError`` naming the extra.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lumos.errors import LumosError

log = logging.getLogger(__name__)


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise a one-line error naming the lumos extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise LumosError(f"{module} is not installed; install it with: pip install 'lumos[{extra}]'") from err


class Sink:
    """Base class: override ``log_image`` (and ``log_scalar``); ``flush``/``close`` are optional."""

    def log_image(self, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
        raise NotImplementedError

    def log_images(self, items: list[tuple[str, Image.Image, str]], step: int) -> None:
        """Several ``(tag, image, caption)`` at one step (sinks may batch them)."""
        for tag, image, caption in items:
            self.log_image(tag, image, step, caption)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """Default: ignore scalars."""

    def flush(self) -> None:
        """Write pending data."""

    def close(self) -> None:
        """Release files/runs the sink opened itself."""


DEFAULT_TB_ROOT = "runs/lumos"


def _stamp() -> str:
    """``YYYYmmdd-HHMMSS_<host>``: the name of a default TensorBoard run folder (like TensorBoard's own)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}"


def fresh_run_dir(root: str | os.PathLike[str] = DEFAULT_TB_ROOT) -> Path:
    """A new, empty folder ``root/<YYYYmmdd-HHMMSS>_<host>`` (``_2``, ``_3``, ... appended when it exists).

    Made here (not by the writer later) so two runs started in the same second, even in two processes, never
    share a folder.
    """
    base = Path(root) / _stamp()
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}_{n}")


class TensorBoardSink(Sink):
    """TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``), or an existing writer.

    ``log_dir=None`` (the default) writes to a new folder per run, ``runs/lumos/<YYYYmmdd-HHMMSS>_<host>``
    (made unique), so two trainings never mix their pictures; ``tensorboard --logdir runs/lumos`` shows each
    run on its own. A ``log_dir`` given is used exactly as given. The folder is logged (INFO).
    Captions go to a text summary under ``<tag>/caption`` when ``captions=True``.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, writer: Any = None, captions: bool = False):
        if writer is None:
            require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            folder = fresh_run_dir() if log_dir is None else log_dir
            writer = SummaryWriter(log_dir=str(folder))
            log.info("lumos.track: TensorBoard event files go to %s", writer.log_dir)
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.captions = captions

    @property
    def log_dir(self) -> str:
        return str(self.writer.log_dir)

    def log_image(self, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
        image = image.convert("RGB")
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:  # some other writer with the SummaryWriter API
            self.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
        else:  # encode once, fast (add_image re-encodes at the default, slow PNG level)
            from tensorboard.compat.proto.summary_pb2 import Summary

            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            img = Summary.Image(height=image.height, width=image.width, colorspace=3,
                                encoded_image_string=buf.getvalue())
            file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
        if self.captions and caption:
            self.writer.add_text(f"{tag}/caption", caption, global_step=step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


class WandbSink(Sink):
    """Weights & Biases. Uses ``run``, else the active ``wandb.run``, else starts one (offline by default).

    A run the sink started itself is logged with ``step=``; inside someone else's run the sink does not
    move the run's step: it logs ``<prefix>/step`` with each picture and declares it the step metric of
    its keys (``define_metric``). ``mode`` defaults to ``$WANDB_MODE`` or ``"offline"``.
    """

    def __init__(
        self,
        project: str = "lumos",
        run: Any = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        step_key: str = "lumos/step",
        **init_kwargs: Any,
    ) -> None:
        self.wandb = require("wandb", "wandb")
        self.step_key = step_key
        self._defined: set[str] = set()
        self._warned_back = False
        if run is None and self.wandb.run is not None:
            run = self.wandb.run
        if run is None:
            mode = mode or os.environ.get("WANDB_MODE") or "offline"
            run = self.wandb.init(project=project, mode=mode, dir=None if dir is None else str(dir), **init_kwargs)
            self._owned = True
        else:
            self._owned = False
        self.run = run

    def _log(self, data: dict[str, Any], step: int) -> None:
        if self._owned:
            current = getattr(self.run, "step", None)
            if isinstance(current, int) and step < current and not self._warned_back:
                self._warned_back = True  # once: W&B itself drops every such row
                log.warning("lumos.track: W&B drops data logged at step %d, below the run's current step %d; "
                            "log with increasing steps (or give WandbSink your run: it then logs lumos/step).",
                            step, current)
            self.run.log(data, step=step)
            return
        for key in data:
            prefix = key.split("/")[0]
            if prefix not in self._defined:
                self.run.define_metric(self.step_key, hidden=True)
                self.run.define_metric(f"{prefix}/*", step_metric=self.step_key)
                self._defined.add(prefix)
        self.run.log({**data, self.step_key: step})

    def log_image(self, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
        self.log_images([(tag, image, caption)], step)

    def log_images(self, items: list[tuple[str, Image.Image, str]], step: int) -> None:
        self._log({tag: self.wandb.Image(image, caption=caption or None) for tag, image, caption in items}, step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._log({tag: value}, step)

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class MlflowSink(Sink):
    """MLflow images (``MlflowClient.log_image`` with key and step) and metrics.

    Uses ``run_id``, else the active MLflow run, else creates a run in ``experiment`` at
    ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` or a local file store ``./mlruns``).
    """

    def __init__(
        self,
        tracking_uri: str | os.PathLike[str] | None = None,
        experiment: str = "lumos",
        run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        mlflow = require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        active = mlflow.active_run()
        if run_id is None and active is not None:
            run_id = active.info.run_id
            tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        uri = str(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns")
        if "://" not in uri and not uri.startswith(("sqlite:", "databricks")):
            uri = Path(uri).resolve().as_uri()  # a plain directory: the local file store
        if uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
            # MLflow 3 keeps the file store behind this switch; a local store is what was asked for here
            # (mlflow-skinny has no SQL backend). Process-wide, as MLflow reads it at every store access.
            log.info("Setting MLFLOW_ALLOW_FILE_STORE=true for the local MLflow file store %s", uri)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._owned = run_id is None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.run_id = run_id

    def log_image(self, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
        self.client.log_image(self.run_id, image.convert("RGB"), key=tag, step=step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, float(value), step=step)

    def close(self) -> None:
        if self._owned:
            self.client.set_terminated(self.run_id)




class MemorySink(Sink):
    """Keeps everything in memory: ``images[tag] = [(step, image, caption), ...]``, ``scalars[tag] = [(step, v)]``.

    Handy for tests, notebooks and for drawing a picture of maps across epochs afterwards.
    """

    def __init__(self) -> None:
        self.images: dict[str, list[tuple[int, Image.Image, str]]] = {}
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def log_image(self, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
        self.images.setdefault(tag, []).append((step, image, caption))

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, float(value)))


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink, "memory": MemorySink}


def make_sink(spec: Sink | str) -> Sink:
    """A sink from an instance or a name (``"tensorboard"``, ``"wandb"``, ``"mlflow"``) with defaults."""
    if isinstance(spec, Sink):
        return spec
    if isinstance(spec, str) and spec.lower() in SINKS:
        return SINKS[spec.lower()]()
    raise LumosError(f"Unknown sink {spec!r}; use a Sink or one of: {', '.join(SINKS)}.")

