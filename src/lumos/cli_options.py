"""Typer options shared by the ``lumos`` commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Zoo name, TorchScript file, or package.module:callable.")
]
WeightsOpt = Annotated[Path | None, typer.Option(help="State-dict file for a module:callable model.")]
SizeOpt = Annotated[int | None, typer.Option(help="Input size for a user model (square).")]
MeanOpt = Annotated[str | None, typer.Option(help="Normalisation mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(help="Normalisation std, e.g. 0.229,0.224,0.225.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="Text file with one class name per line.")]
SettingsOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Method setting KEY=VALUE or METHOD.KEY=VALUE, repeatable (e.g. steps=128, "
    "integrated_gradients.baseline=black,blur).")]
