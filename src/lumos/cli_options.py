"""Typer options shared by the ``lumos`` commands (one definition, one help text), and the command classes
that make ``--help`` read like a person wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", metavar="MODEL",
    help="Zoo name (see `lumos models`), a saved Keras 3 .keras file or package.module:callable (a module in the "
    "current folder works).")]
MethodOpt = Annotated[str, typer.Option(
    "--method", "--methods", metavar="METHODS",
    help="Comma-separated methods or aliases, or all (see `lumos methods`).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda[:N]|mps",
    help="Where the model runs; auto: the first CUDA GPU when there is one, else the CPU.")]
WeightsOpt = Annotated[Path | None, typer.Option(metavar="FILE", help="State-dict file for a module:callable model.")]
SizeOpt = Annotated[int | None, typer.Option(metavar="PIXELS", help="Input size for a user model (square).")]
MeanOpt = Annotated[str | None, typer.Option(metavar="R,G,B", help="Normalisation mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(metavar="R,G,B", help="Normalisation std, e.g. 0.229,0.224,0.225.")]
LabelsOpt = Annotated[Path | None, typer.Option(metavar="FILE", help="Text file with one class name per line.")]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", metavar="INDEX|KEY",
    help="For a model returning a tuple or dict: the output to explain and predict from (index or key).")]
ProbsOpt = Annotated[str, typer.Option(
    "--probs", metavar="auto|softmax|sigmoid|none",
    help="How class probabilities come from the output; auto: the model's own sigmoid/softmax if it ends in "
    "one, else softmax (sigmoid for a single output).")]
SettingsOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Method setting, repeatable: KEY=VALUE (every chosen method that has KEY) or "
    "METHOD.KEY=VALUE (that method only), e.g. steps=128, integrated_gradients.baseline=black,blur.")]

# Shown for an option without its own metavar, by the type of its value.
_KIND_METAVARS = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH"}


class _Argument(TyperArgument):
    """A positional argument shown by its metavar (``IMAGES...``), without the type (``<list[Path]>``) and
    the braces (``{images}...``) that Typer >= 0.2x prints."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or self.name.upper()
        return [name if self.required else f"[{name}]"]


def _tidy(param: Any) -> None:
    """Give ``param`` a readable metavar unless it has one: ``IMAGES...`` for a repeated argument, the value's
    kind (``TEXT``, ``INTEGER``, ``NUMBER``, ``PATH``) for an option, nothing for an on/off flag."""
    if param.metavar is not None:
        pass
    elif isinstance(param, TyperArgument):
        param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
    elif getattr(param, "is_flag", False):
        param.metavar = ""
    else:
        descriptor = getattr(param, "type_descriptor", None)
        kind = getattr(descriptor, "annotation", None)
        if getattr(descriptor, "is_list", False):
            kind = (get_args(kind) or (str,))[0]
        param.metavar = _KIND_METAVARS.get(kind, "VALUE")
    if type(param) is TyperArgument:
        param.__class__ = _Argument  # same fields; only the help display differs


class TidyCommand(TyperCommand):
    """A command whose help shows metavars (``IMAGES...``, ``--out PATH``) instead of Python types."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params


class TidyGroup(TyperGroup):
    """The ``lumos`` group, with the same help display as :class:`TidyCommand`."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params
