"""Method settings given as text (``--set steps=128``, ``--set integrated_gradients.baseline=black,blur``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lumos.errors import LumosError, close_matches
from lumos.explainer import _OBJECTS, RUN_LEVEL, build_method, check_setting_types, run_level_message
from lumos.explainer import accepted_settings as accepted
from lumos.methods import method_class

__all__ = ["accepted", "parse_settings", "parse_value"]


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
        pairs.append((method_class(scope).name if dot else None, key, value.strip(), parse_value(value)))
    bases = {scope or "smoothgrad": v for scope, k, _, v in pairs if k == "base" and isinstance(v, str)}
    shared: dict[tuple[str, str], tuple[str, list[str]]] = {}  # (method, key) -> (text, takers) of a KEY=VALUE
    for scope, key, text, value in pairs:
        if scope is not None and scope not in out:
            raise LumosError(f"--set {scope}.{key}: {scope} is not among the methods ({', '.join(names)}).")
        if key in RUN_LEVEL:
            raise LumosError(f"--set {key}: {run_level_message(key)}")
        targets = [scope] if scope else names
        takers = [m for m in targets if key in accepted(m, bases.get(m)) - _OBJECTS]
        if not takers:
            known = sorted(set().union(*(accepted(m, bases.get(m)) - _OBJECTS for m in targets)))
            raise LumosError(f"--set {key}: no setting of that name for {', '.join(targets)}."
                             f"{close_matches(key, known)} Settings: {', '.join(known)}.")
        for m in takers:
            out[m][key] = value
            if scope is None and len(takers) > 1:
                shared[m, key] = (text, takers)
            else:
                shared.pop((m, key), None)
    for m in out:
        _check_values(m, out, shared)
    return out


def _check(name: str, kwargs: dict[str, Any]) -> None:
    """Raise the one-line LumosError method ``name`` gives for ``kwargs`` (constructors do no model work)."""
    check_setting_types({name: kwargs})
    build_method(name, nn.Identity(), "auto", None, kwargs)


def _check_values(name: str, out: dict[str, dict[str, Any]],
                  shared: dict[tuple[str, str], tuple[str, list[str]]]) -> None:
    """Check method ``name``'s settings ``out[name]``; when they fail, name the setting at fault (not every
    setting the method was given) and, for a ``KEY=VALUE`` that went to several methods, how to prefix it."""
    kwargs = out[name]
    try:
        _check(name, kwargs)
    except LumosError as whole:
        for key, value in kwargs.items():
            try:
                _check(name, _alone(name, key, value, kwargs))
            except LumosError as alone:
                hint = ""
                text, takers = shared.get((name, key), ("", []))
                fine = [m for m in takers if m != name and _accepts(m, key, value, out[m])]
                if fine:
                    hint = (f" --set {key}=... goes to every chosen method that has {key} ({', '.join(takers)});"
                            f" prefix it with the method it is for: --set {fine[0]}.{key}={text}.")
                raise LumosError(f"{str(alone).rstrip('.')}.{hint}") from None
        raise whole from None  # only the combination fails: the message names every setting


def _alone(name: str, key: str, value: Any, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{key: value}``, with smoothgrad's ``base`` (which decides the settings it takes)."""
    base = (kwargs or {}).get("base")
    return {key: value} if base is None or key == "base" else {"base": base, key: value}


def _accepts(name: str, key: str, value: Any, kwargs: dict[str, Any]) -> bool:
    try:
        _check(name, _alone(name, key, value, kwargs))
    except LumosError:
        return False
    return True
