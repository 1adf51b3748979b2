"""Exceptions for user mistakes, and a helper that suggests close names.

Every :class:`LumosError` carries a one-sentence message that names the offending thing and, where
possible, says what would work. Front ends (CLI, web app) show the message without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

__all__ = ["LumosError", "ImageError", "ModelLoadError", "NonFiniteError", "check_model", "close_matches",
           "each_alone_on_nonfinite", "positive_int"]

T = TypeVar("T")


class LumosError(ValueError):
    """Base class for errors caused by user input (bad file, unknown name, wrong argument)."""


class ImageError(LumosError):
    """An image file could not be found, read or decoded; ``.path`` names the file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class ModelLoadError(LumosError):
    """A model could not be found or loaded (unknown zoo name, bad file, weights mismatch)."""


class NonFiniteError(LumosError):
    """The model gave a NaN or inf score or gradient on some images: a problem of those images (batch surfaces
    explain the others and report these), unlike a bad setting, which fails the whole run."""


def each_alone_on_nonfinite(run: Callable[[list[int]], list[T]], indices: list[int],
                            fail: Callable[[int, NonFiniteError], list[T]]) -> list[T]:
    """``run(indices)`` (a batch); when the model gives a NaN or inf on some image, ``run([i])`` for each image
    alone and ``fail(i, error)`` for each one that still fails, so the batch's other images are kept."""
    try:
        return run(indices)
    except NonFiniteError as err:
        if len(indices) == 1:
            return fail(indices[0], err)
    return [r for i in indices for r in each_alone_on_nonfinite(run, [i], fail)]


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """Return ``" Did you mean: a, b, c?"`` for the choices closest to ``word``, or ``""`` if none.

    Matching is case-insensitive (difflib ratio); the suggestions keep their original spelling and
    order of closeness, so the text can be appended to an error message directly.
    """
    originals: dict[str, str] = {}
    for choice in choices:
        originals.setdefault(str(choice).lower(), str(choice))
    found = difflib.get_close_matches(str(word).lower(), list(originals), n=n, cutoff=cutoff)
    if not found:
        return ""
    return " Did you mean: " + ", ".join(originals[f] for f in found) + "?"


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (an integral float such as 8.0 is accepted); anything else is a one-line error."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 1:  # type: ignore[operator]
        raise LumosError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_model(model: object):  # noqa: ANN201 (torch is imported lazily here, the base layer)
    """``model`` if lumos can run it: a ``torch.nn.Module`` that is not a bare Keras model.

    Keras 3 models on the torch backend are modules too, but take channels-last input and hide their layers;
    they are refused with the way to wrap them instead of failing inside Keras.
    """
    from torch import nn

    if any(c.__module__.split(".")[0] == "keras" for c in type(model).__mro__):
        raise LumosError(
            f"{type(model).__name__} is a Keras model: wrap it as lumos.zoo.keras_model.KerasModule(model) "
            "(channels-first input, Keras layer names), or give the CLI its saved .keras file."
        )
    if not isinstance(model, nn.Module):
        raise LumosError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
    return model
