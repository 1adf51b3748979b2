"""Score-CAM (Wang et al. 2020): channels weighed by how much the input masked by them raises the score."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lumos.engine import Forward, score_inputs
from lumos.errors import LumosError, positive_int
from lumos.explanation import upsample_minmax
from lumos.methods.base import ActivationMethod, register
from lumos.shortfall import Shortfall, report_shortfall
from lumos.targets import OutputSpec, Target

#: Masks scored in the first round of the adaptive budget; each later round doubles the number scored.
FIRST_ROUND = 8
EXACT = "donot_use_mm_for_euclid_dist"  # distances without the matrix-product shortcut (exact zeros)


@register
class ScoreCAM(ActivationMethod):
    """Score-CAM with bounded memory and a channel budget chosen per image.

    Each channel is upsampled, scaled to [0, 1] and used as a soft mask ``x * m + baseline * (1 - m)``; its
    weight is the target's probability on that input minus the probability on the baseline alone (the score
    itself for callable targets or ``probs="none"``). Constant channels (weight 0 by definition) are skipped
    and channels whose scaled maps are equal share one masked input.

    Args:
        max_channels: most masks scored per image and layer (the cap). ``None``: every distinct mask, i.e.
            the original all-channel method, exactly.
        tolerance: the adaptive budget, as an estimated ``1 - correlation`` with the all-channel map. Masks
            are scored in a farthest-point order: first the strongest channel, then always the mask farthest
            (squared distance between the [0, 1]-scaled layer maps) from every scored one, weighted by the
            activation range of the channels that share it. Every channel not scored takes the weight of
            the scored mask nearest to its own. Rounds double the number scored (8, 16, 32, ...) until the
            estimated error is at most ``tolerance`` or ``max_channels`` masks were scored. The estimate is
            the larger of ``1 - correlation`` between this round's map and the last round's, and between
            this round's map and the one where every channel takes its second-nearest scored weight.
            ``None`` or 0: exactly ``max_channels`` masks in one round.
        batch_size: masked inputs per forward (memory is bounded by it, not by the number of channels). The
            default 4 was the fastest measured on a 2-core CPU (1-4 per forward cost about the same per input,
            8 and more up to 1.6x more); on a GPU larger batches pay.
        baseline: the value masked-out pixels take (0 = the zero input).

    ``Explanation.params["channels_used"]`` holds the masks scored per map (all layers together) and
    ``params["error"]`` the estimated error per map (0 when every distinct mask was scored; NaN after a single
    round of one mask).
    """

    name = "scorecam"

    def __init__(
        self, *args: Any, batch_size: int = 4, max_channels: int | None = 128, tolerance: float | None = 0.02,
        baseline: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_channels = None if max_channels is None else positive_int("max_channels", max_channels)
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
                                      or not tolerance >= 0):
            raise LumosError(f"tolerance must be a non-negative fraction or None, got {tolerance!r}.")
        self.tolerance = float(tolerance) if tolerance else 0.0
        self.baseline = float(baseline)

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "batch_size": self.batch_size,
            "max_channels": self.max_channels,
            "tolerance": self.tolerance,
            "baseline": self.baseline,
        }

    def compute(self, fw: Forward) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = fw.x
        maps = fw.maps()
        b, k = fw.targets.scores.shape
        raws: list[list[torch.Tensor]] = [[] for _ in maps]
        used = torch.zeros(b, dtype=torch.long)
        error = torch.zeros(b, k)
        for i in range(b):
            score = MaskScorer(self.model, x[i:i + 1], fw.target.select(torch.tensor([i])), self.baseline,
                               self.batch_size, self.output)
            for s, a_all in enumerate(maps):
                raw, n, err = estimate_map(a_all[i], score, self.max_channels, self.tolerance, self.relu)
                raws[s].append(raw)
                used[i] += n
                error[i] = torch.maximum(error[i], err)
        extra = {"channels_used": used.repeat_interleave(k), "error": error.reshape(-1)}
        self._report_cap(error)
        return [torch.cat(r) for r in raws], extra

    def _report_cap(self, error: torch.Tensor) -> None:
        """Maps the cap stopped before their estimated error met the tolerance (an unknown error, after a single
        mask, counts as not met): one warning per call, or per run (:func:`~lumos.shortfall.gather_shortfalls`)."""
        if not self.tolerance:
            return
        report_shortfall(Shortfall(
            "Score-CAM", f"max_channels={self.max_channels} masks", "estimated error", self.tolerance, "error",
            "raise max_channels (CLI: --set max_channels=N), or max_channels=None (--set max_channels=none) for the "
            "exact map."), error)


class MaskScorer:
    """Weights of masks for one image: target confidence on ``x * m + baseline * (1 - m)`` minus that on the
    baseline alone. The baseline is scored once, as the first row of the first batch."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, target: Target, baseline: float,
                 batch_size: int, output: OutputSpec) -> None:
        self.model, self.x, self.target, self.baseline = model, x, target, baseline
        self.batch_size, self.output = batch_size, output
        self.base: torch.Tensor | None = None

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, K) weights of the masks made from ``acts`` (n, h, w) channel activations."""
        x, size, extra = self.x, tuple(self.x.shape[-2:]), int(self.base is None)

        def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [torch.full_like(x, self.baseline)] if start < extra else []
            lo, hi = max(start - extra, 0), stop - extra
            if hi > lo:
                masks = upsample_minmax(acts[lo:hi].float(), size, "bilinear")[:, None]
                parts.append((x * masks + self.baseline * (1 - masks)).to(x.dtype))
            return torch.cat(parts), torch.zeros(stop - start, dtype=torch.long)

        scores = score_inputs(self.model, make, acts.shape[0] + extra, self.target, output=self.output,
                              batch_size=self.batch_size)
        if extra:
            self.base, scores = scores[:1], scores[1:]
        return scores - self.base


def correlation(a: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
    """(K,) Pearson correlation of maps (K, h, w) pairwise (after ReLU if ``relu``); 1 for equal maps."""
    def unit(m: torch.Tensor) -> torch.Tensor:
        m = (m.clamp_min(0) if relu else m).flatten(1).double()
        m = m - m.mean(1, keepdim=True)
        return m / m.norm(dim=1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    ua, ub = unit(a), unit(b)
    same = (ua == ub).all(1)
    return torch.where(same, 1.0, (ua * ub).sum(1)).float()


def estimate_map(
    a: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], cap: int | None, tolerance: float,
    relu: bool = True,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Score-CAM map (K, h, w) of one image's activations ``a`` (C, h, w), the masks scored and the
    estimated error (K,).

    ``score(acts)`` gives the (n, K) weights of the channels ``acts`` (n, h, w). Constant channels weigh 0;
    channels whose min-max-scaled maps are equal share one mask. ``cap=None`` scores every distinct mask
    (exact). Otherwise masks are scored in a weighted farthest-point order, in rounds that double the number
    scored, until the estimated error is at most ``tolerance`` or ``cap`` masks were scored; every channel
    not scored takes the weight of the scored mask nearest to its own (see :class:`ScoreCAM`).
    """
    c, h, w = a.shape
    flat = a.flatten(1).float()
    lo = flat.min(1, keepdim=True).values
    span = (flat.max(1, keepdim=True).values - lo)[:, 0]
    live = (span > 0).nonzero()[:, 0]
    if live.numel() == 0:
        k = score(a[:0]).shape[1]
        return torch.zeros(k, h, w, dtype=a.dtype, device=a.device), 0, torch.zeros(k)
    masks, group = torch.unique((flat[live] - lo[live]) / span[live, None], dim=0, return_inverse=True)
    u = masks.shape[0]
    rep = torch.full((u,), c, dtype=torch.long, device=a.device).scatter_reduce(0, group, live, "amin")
    summed = torch.zeros(u, h * w, device=a.device).index_add_(0, group, flat[live])  # channels per mask
    mass = torch.zeros(u, device=a.device).index_add_(0, group, span[live])  # their activation ranges

    def combine(weights: torch.Tensor) -> torch.Tensor:
        return torch.einsum("uk,up->kp", weights.float(), summed).view(-1, h, w)

    if cap is None or cap >= u:
        if cap is None or not tolerance:
            weights = score(a[rep])
            return combine(weights).to(a.dtype), u, torch.zeros(weights.shape[1])
    cap = min(cap, u)
    order: list[int] = []
    scored: list[torch.Tensor] = []
    # squared distance of every mask to its nearest and second-nearest scored mask, and their places in order
    d1 = torch.full((u,), torch.inf, device=a.device)
    d2 = d1.clone()
    i1 = torch.zeros(u, dtype=torch.long, device=a.device)
    i2 = i1.clone()
    free = torch.ones(u, dtype=torch.bool, device=a.device)
    previous = error = None
    size = min(cap, FIRST_ROUND) if tolerance else cap
    while True:
        start = len(order)
        while len(order) < size:
            j = int(torch.where(free, mass * d1 if order else mass, -1.0).argmax())
            free[j] = False
            d = (masks - masks[j]).square().sum(1)
            first, second = d < d1, (d >= d1) & (d < d2)
            d2 = torch.where(first, d1, torch.where(second, d, d2))
            i2 = torch.where(first, i1, torch.where(second, len(order), i2))
            d1 = torch.where(first, d, d1)
            i1 = torch.where(first, len(order), i1)
            order.append(j)
        scored.append(score(a[rep[order[start:]]]))
        weights = torch.cat(scored)
        current = combine(weights[i1])
        if len(order) == u:
            return current.to(a.dtype), u, torch.zeros(weights.shape[1])
        if len(order) > 1:  # how far the map moves with each channel's second-nearest scored weight ...
            error = 1 - correlation(current, combine(weights[i2]), relu)
            if previous is not None:  # ... and since the last round
                error = torch.maximum(error, 1 - correlation(previous, current, relu))
        if len(order) >= cap or not tolerance or previous is not None and bool((error <= tolerance).all()):
            break
        previous, size = current, min(cap, 2 * len(order))
    if error is None:
        error = torch.full((weights.shape[1],), torch.nan)
    return current.to(a.dtype), len(order), error.cpu()
