"""Maps a method's cap stopped before they met its own tolerance: one warning per call, or one per run.

Adaptive methods (Score-CAM's channel budget, integrated gradients' points) grow their work until an error
estimate is within ``tolerance`` or a cap is reached. Maps stopped by the cap are usable but less exact than
asked, so each call says so in one warning line. A surface that makes many calls (a folder, a data set) wraps
them in :func:`gather_shortfalls` and the warning comes once at the end, with the counts of the whole run.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

__all__ = ["Shortfall", "add_shortfall", "gather_shortfalls", "report_shortfall"]

log = logging.getLogger(__name__)

_GATHERED: contextvars.ContextVar[dict[tuple, Shortfall] | None] = contextvars.ContextVar(
    "lumos_gathered_shortfalls", default=None)


@dataclass(frozen=True)
class Shortfall:
    """``over`` of ``total`` maps of ``method`` reached ``cap`` with ``measure`` above ``tolerance`` (the
    largest known value ``worst``; NaN when none is known) ; ``param`` names the per-map values in
    ``Explanation.params`` and ``advice`` says what to change."""

    method: str
    cap: str
    measure: str
    tolerance: float
    param: str
    advice: str
    over: int = 0
    total: int = 0
    worst: float = math.nan

    def key(self) -> tuple:
        return self.method, self.cap, self.measure, self.tolerance, self.param, self.advice

    def plus(self, other: Shortfall) -> Shortfall:
        worst = max((w for w in (self.worst, other.worst) if not math.isnan(w)), default=math.nan)
        return replace(self, over=self.over + other.over, total=self.total + other.total, worst=worst)

    def line(self) -> str:
        """The warning: counts, cap, the worst value, and what to change."""
        return (f"{self.method}: {self.over} of {self.total} maps reached {self.cap} with {self.measure} up to "
                f"{self._worst()}, above tolerance {self.tolerance:g} (see params['{self.param}']); {self.advice}")

    def caption(self) -> str:
        """The same for a picture's caption (one map, no API names)."""
        return (f"less exact than asked: it stopped at {self.cap} with {self.measure} {self._worst()}, above the "
                f"tolerance {self.tolerance:g}; a higher cap or step setting gives a more exact map")

    def _worst(self) -> str:
        return "unknown" if math.isnan(self.worst) else f"{self.worst:.3f}"


def add_shortfall(short: Shortfall) -> None:
    """Count an already-counted :class:`Shortfall` (e.g. one a Ray worker gathered) into the run inside
    :func:`gather_shortfalls`, or log it now."""
    gathered = _GATHERED.get()
    if gathered is not None:
        key = short.key()
        gathered[key] = gathered[key].plus(short) if key in gathered else short
    elif short.over:
        log.warning("%s", short.line())


def report_shortfall(short: Shortfall, error: torch.Tensor) -> None:
    """Count the maps whose ``error`` (one per map; NaN = unknown, which counts as not met) is above the
    tolerance: log one line now, or add them to the run's count inside :func:`gather_shortfalls`."""
    error = error.detach().float().reshape(-1).cpu()
    over = (error > short.tolerance) | error.isnan()
    known = error[over & ~error.isnan()]
    add_shortfall(replace(short, over=int(over.sum()), total=error.numel(),
                          worst=float(known.max()) if known.numel() else math.nan))


@contextmanager
def gather_shortfalls(say: bool = True) -> Iterator[list[Shortfall]]:
    """Calls inside add up their shortfalls. On leaving (also when the run stops with an error, so what was
    counted is not lost), the list yielded holds one :class:`Shortfall` per method and cap that fell short,
    and with ``say`` each is logged as one warning. Inside another ``gather_shortfalls`` the outer one counts
    and reports, and this list stays empty."""
    found: list[Shortfall] = []
    if _GATHERED.get() is not None:
        yield found
        return
    gathered: dict[tuple, Shortfall] = {}
    token = _GATHERED.set(gathered)
    try:
        yield found
    finally:
        _GATHERED.reset(token)
        found += [short for short in gathered.values() if short.over]
        for short in found if say else ():
            log.warning("%s", short.line())
