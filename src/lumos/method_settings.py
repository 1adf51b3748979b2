"""Method settings given as text (``--set steps=128``, ``--set integrated_gradients.baseline=black,blur``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lumos.errors import LumosError, close_matches
from lumos.explainer import _OBJECTS
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
