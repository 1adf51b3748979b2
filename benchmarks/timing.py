"""Timing helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    return timed_result(fn)[0]


def timed_result(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall time and result of one call of ``fn``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median_time(fn: Callable[[], object], rounds: int, warmup: bool = False) -> float:
    """Median wall time of ``rounds`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    return statistics.median(timed(fn) for _ in range(rounds))


def ratio(plain: Callable[[], object], method: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median over rounds of method time / plain time, each method call timed right after a plain call.

    The machine's speed drifts; pairing each call with its own reference keeps the ratio steady.
    Returns (median ratio, median method seconds); one untimed warm-up call of ``method`` first.
    """
    method()
    ratios, times = [], []
    for _ in range(rounds):
        base = timed(plain)
        t = timed(method)
        ratios.append(t / base)
        times.append(t)
    return statistics.median(ratios), statistics.median(times)
