"""Timing helper shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], rounds: int, warmup: bool = False) -> float:
    """Median wall time of ``rounds`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
