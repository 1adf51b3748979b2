"""Method settings given as text (``--set steps=128``, ``--set integrated_gradients.baseline=black,blur``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lumos.api import method_class
from lumos.errors import LumosError, close_matches

# Constructor arguments the caller supplies itself, never settings.
_RESERVED = {"self", "model", "layer", "labels"}
_OBJECTS = {"preprocess"}  # accepted, but objects: the command line supplies them


def parse_value(text: str) -> Any:
    """``true``/``false``/``none``, an int, a float, a comma-separated list of these, or the text itself."""
    if "," in text:
        return [parse_value(part.strip()) for part in text.split(",") if part.strip()]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def accepted(name: str, base: str | None = None) -> set[str]:
    """Keyword arguments method ``name``'s constructor accepts (its own and its base classes';
    for ``smoothgrad`` also those of its ``base`` method, which it passes on)."""
    cls = method_class(name)
    params: set[str] = set()
    for klass in cls.__mro__:  # follow **kwargs up to the first constructor that has none
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init).parameters.values()
        params |= {p.name for p in signature if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in signature):
            break
    if cls.name == "smoothgrad":
        params |= accepted(base or "gradients")
    return params - _RESERVED


def parse_settings(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Map each method to its settings from ``KEY=VALUE`` (every method that accepts KEY) or
    ``METHOD.KEY=VALUE`` (that method only) items. Unknown keys are a one-line error with close matches."""
    names = [method_class(m).name for m in methods]
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LumosError(f"--set expects KEY=VALUE or METHOD.KEY=VALUE, got {item!r}.")
        scope, dot, key = key.strip().rpartition(".")
        pairs.append((method_class(scope).name if dot else None, key, parse_value(value)))
    bases = {scope or "smoothgrad": v for scope, k, v in pairs if k == "base" and isinstance(v, str)}
    for scope, key, value in pairs:
        if scope is not None and scope not in out:
            raise LumosError(f"--set {scope}.{key}: {scope} is not among the methods ({', '.join(names)}).")
        targets = [scope] if scope else names
        takers = [m for m in targets if key in accepted(m, bases.get(m)) - _OBJECTS]
        if not takers:
            known = sorted(set().union(*(accepted(m, bases.get(m)) - _OBJECTS for m in targets)))
            raise LumosError(f"--set {key}: no setting of that name for {', '.join(targets)}."
                             f"{close_matches(key, known)} Settings: {', '.join(known)}.")
        for m in takers:
            out[m][key] = value
    return out


def build_method(cls: type, model: torch.nn.Module, layer: str, labels: Sequence[str] | None,
                 settings: Mapping[str, Any]) -> Any:
    """A method object; a setting of the wrong type becomes a one-line error naming the method."""
    try:
        return cls(model, layer, labels=labels, **settings)
    except (TypeError, ValueError) as err:
        if not settings:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items() if isinstance(v, str | int | float | list | None))
        raise LumosError(f"{cls.name} does not accept the settings {given}: {err}") from None


def check_settings(method_kwargs: dict[str, dict[str, Any]], model: torch.nn.Module, layer: str = "auto",
                   labels: Sequence[str] | None = None, preprocess: Any = None) -> None:
    """Build every method once with its settings so a bad value fails before any work. Methods that take
    ``preprocess`` (e.g. IG's black baseline) get ``preprocess`` added to their settings unless given."""
    for name, kwargs in method_kwargs.items():
        if preprocess is not None and "preprocess" not in kwargs and "preprocess" in accepted(name, kwargs.get("base")):
            kwargs["preprocess"] = preprocess
        build_method(method_class(name), model, layer, labels, kwargs)
