"""``lumos app``: start the Streamlit web app (registered on the main Typer app by ``register``).

The model is loaded once here first (on ``--device``), so a bad ``--model`` (or weights, labels, device, ...) is a
one-line error in the terminal instead of a server whose page shows it; Streamlit's own upload limit is set to
the app's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from lumos.cli_options import DeviceOpt, LabelsOpt, MeanOpt, SizeOpt, StdOpt, WeightsOpt
from lumos.errors import LumosError

DEFAULT_HOST = "127.0.0.1"


def app_command(model: str = "efficientnet_lite0", port: int = 8501, weights: Path | None = None,
                size: int | None = None, mean: str | None = None, std: str | None = None,
                labels: Path | None = None, browser: bool = False, host: str = DEFAULT_HOST,
                device: str = "auto", task: str = "classification") -> list[str]:
    """The ``streamlit run`` command line that serves the app on ``host:port`` (headless unless ``browser``).

    ``server.maxUploadSize`` is the app's own limit (``lumos.app.logic.MAX_UPLOAD_MB``), so the server refuses
    a bigger upload before reading it and the page states one limit.
    """
    from lumos.app import SCRIPT
    from lumos.app.logic import MAX_UPLOAD_MB

    cmd = [sys.executable, "-m", "streamlit", "run", str(SCRIPT), "--server.port", str(port),
           "--server.address", host, "--server.headless", "false" if browser else "true",
           "--server.maxUploadSize", str(MAX_UPLOAD_MB),
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal", "--", "--model", model]
    for flag, value in (("--weights", weights), ("--size", size), ("--mean", mean), ("--std", std),
                        ("--labels", labels), ("--device", None if device == "auto" else device),
                        ("--task", None if task == "classification" else task)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def register(app: typer.Typer) -> None:
    """Add the ``app`` command to the ``lumos`` Typer app."""

    @app.command("app")
    def run_app(
        model: Annotated[str, typer.Option("--model", "-m", help="Zoo name or package.module:callable.")] = (
            "efficientnet_lite0"
        ),
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
        host: Annotated[str, typer.Option(
            help="Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface, for remote use; "
                 "the page has no login).")] = DEFAULT_HOST,
        device: DeviceOpt = "auto",
        weights: WeightsOpt = None,
        size: SizeOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        labels: LabelsOpt = None,
        browser: Annotated[bool, typer.Option(help="Open a browser tab.")] = False,
        task: Annotated[str, typer.Option(
            help="classification, or detection / segmentation: explain the boxes or class regions of the shipped "
                 "synthetic detector / segmenter (the page can switch task too).")] = "classification",
    ) -> None:
        """Start the interactive saliency explorer (Streamlit) on http://HOST:PORT (127.0.0.1:8501)."""
        try:
            import streamlit  # noqa: F401
        except ImportError:
            raise LumosError("The web app needs Streamlit: pip install 'lumos[app]'.") from None
        if not 0 < port < 65536:
            raise LumosError(f"--port must be between 1 and 65535, got {port}.")
        if not host.strip() or any(c.isspace() for c in host.strip()):
            raise LumosError(f"--host must be an address such as 127.0.0.1 or 0.0.0.0, got '{host}'.")
        from lumos.app import logic, task_logic

        task = task_logic.check_task(task.strip().lower())
        logic.resolve_device(device)  # a bad or absent device: one line, before the model is read (lumos.explainer)
        cmd = app_command(model, port, weights, size, mean, std, labels, browser, host.strip(), device.strip().lower(),
                          task)

        # Load the model as the page will (same arguments, TorchScript refused before it is read), so a
        # mistake is a one-line error here; the memory goes with this process when it becomes the server.
        if task == "classification":
            logic.load_bundle(logic.parse_app_args(cmd[cmd.index("--") + 1:]))
        else:  # the page opens on the task's shipped model (the classification model loads if chosen there)
            task_logic.load_task_model(task)
        if os.name == "posix":  # become the server: signals (Ctrl-C, SIGTERM) reach Streamlit directly
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(cmd[0], cmd)
        try:
            code = subprocess.call(cmd)
        except KeyboardInterrupt:
            code = 130
        raise typer.Exit(code)
