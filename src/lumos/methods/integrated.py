"""Integrated gradients (Sundararajan et al. 2017), batched over path points, with a completeness check."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from lumos.errors import LumosError
from lumos.layers import LayerSpec
from lumos.methods.base import register
from lumos.methods.pixel import PixelMethod
from lumos.targets import Targets, TargetSpec, resolve_targets, select_output

BaselineSpec = str | float | torch.Tensor
BASELINES = ("zero", "black", "blur", "uniform")
_QUADRATURE = {
    "left": "left", "riemann_left": "left",
    "right": "right", "riemann_right": "right",
    "middle": "middle", "riemann_middle": "middle",
    "trapezoid": "trapezoid", "riemann_trapezoid": "trapezoid",
    "gausslegendre": "gausslegendre", "gauss_legendre": "gausslegendre", "gausslegend": "gausslegendre",
    "adaptive": "adaptive",
}


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Points ``alpha`` in [0, 1] and weights for integrating over the straight path (Captum's conventions).

    ``left``/``right``/``middle`` Riemann sums, ``trapezoid`` (endpoints included, half weight) and
    ``gausslegendre`` (exact for polynomials of degree 2 * steps - 1).
    """
    key = _QUADRATURE.get(method.strip().lower())
    if key is None:
        raise LumosError(
            f"method={method!r} is not known; use adaptive, gausslegendre, left, right, middle or trapezoid."
        )
    if key == "adaptive":
        key = "gausslegendre"
    n = int(steps)
    if n < 1 or (key == "trapezoid" and n < 2):
        raise LumosError(f"steps={steps!r} is too small for the {key} rule.")
    if key == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if key == "trapezoid":
        w = [1.0 / (n - 1)] * n
        w[0] = w[-1] = 0.5 / (n - 1)
        return torch.linspace(0, 1, n).tolist(), w
    start, stop = {"left": (0.0, 1 - 1 / n), "right": (1 / n, 1.0), "middle": (1 / (2 * n), 1 - 1 / (2 * n))}[key]
    return torch.linspace(start, stop, n).tolist(), [1.0 / n] * n


def allocate(jumps: torch.Tensor, steps: int) -> torch.Tensor:
    """Points per segment (n, S): one each, the rest proportional to |F increment| (largest remainder)."""
    n, segs = jumps.shape
    extra = steps - segs
    share = jumps.abs() / jumps.abs().sum(1, keepdim=True).clamp_min(1e-12) * extra
    share = torch.where(jumps.abs().sum(1, keepdim=True) > 0, share, torch.full_like(share, extra / segs))
    counts = share.floor().long()
    rest = extra - counts.sum(1)
    order = (share - counts).argsort(1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(segs).expand(n, segs).contiguous())
    return counts + 1 + (ranks < rest[:, None]).long()


def adaptive_points(bounds: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre points and weights (steps, n): per image ``bounds`` (n, S+1), ``counts`` (n, S)."""
    cols_a, cols_w = [], []
    for edges, row in zip(bounds.tolist(), counts.tolist(), strict=True):
        a, w = [], []
        for k, c in enumerate(row):
            lo, hi = edges[k], edges[k + 1]
            nodes, weights = np.polynomial.legendre.leggauss(c)
            a += (lo + (hi - lo) * 0.5 * (1 + nodes)).tolist()
            w += ((hi - lo) * 0.5 * weights).tolist()
        cols_a.append(a)
        cols_w.append(w)
    return torch.tensor(cols_a, dtype=torch.float64).T, torch.tensor(cols_w, dtype=torch.float64).T


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with standard deviation ``sigma`` pixels (edges replicated)."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@register
class IntegratedGradients(PixelMethod):
    """Integrated gradients (Sundararajan et al. 2017): (x - x') * integral of d score / d input on the path.

    Args:
        baseline: ``"zero"`` (zeros in the model's input space), ``"black"`` (a black image *after*
            preprocessing: needs ``preprocess=`` or ``black=``), ``"blur"`` (the input blurred with
            ``blur_sigma`` pixels), ``"uniform"`` (uniform noise over the input range), a number, a tensor
            (C, H, W), (1, C, H, W) or (B, C, H, W), or a list of these (attributions averaged, as in
            expected gradients; repeated ``"uniform"`` entries draw different noise).
        steps: number of path points per baseline (default 64).
        method: quadrature: ``adaptive`` (default), ``gausslegendre``, ``left``, ``right``, ``middle``,
            ``trapezoid`` (Captum's ``riemann_*`` names are accepted). ``adaptive`` first locates, with
            forward passes only, ``segments`` stretches of the path (see ``segments``), then spends the
            ``steps`` gradient points on the segments in proportion to how much the score changes there (at least one
            each), Gauss-Legendre within each segment -- per image. Scores of real networks often rise
            steeply over a short stretch of the path, where uniform rules waste their points.
        segments: number of segments of the ``adaptive`` rule (default 32; ``segments + 1`` forward-only
            evaluations per image and baseline, found by bisecting where the score changes most).
        batch_size: images per forward/backward (path points x images); bounds memory.
        preprocess: an object with ``mean``/``std`` (e.g. the ``Preprocess`` from ``lumos.load_model``);
            gives the black image and the valid range for ``uniform``.
        black: the black image in input space, per channel (C,) or a full tensor; overrides ``preprocess``.
        blur_sigma: standard deviation in pixels of the ``blur`` baseline.
        seed: seed of the ``uniform`` baseline noise (reproducible calls).

    ``Explanation.params["delta"]`` holds the completeness error per map,
    ``sum(attr) - (F(x) - F(baseline))`` (mean of F over the baselines), and ``params["gap"]`` the
    ``F(x) - F(baseline)`` it should equal.
    """

    name = "integrated_gradients"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        baseline: BaselineSpec | Sequence[BaselineSpec] = "zero",
        steps: int = 64,
        method: str = "adaptive",
        batch_size: int = 32,
        preprocess: Any = None,
        black: float | Sequence[float] | torch.Tensor | None = None,
        blur_sigma: float = 10.0,
        seed: int = 0,
        segments: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layer, **kwargs)
        quadrature(method, steps)  # fail early on a bad rule
        if int(batch_size) < 1:
            raise LumosError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.baseline = baseline
        self.steps = int(steps)
        self.method = method
        self.batch_size = int(batch_size)
        self.preprocess = preprocess
        self.black = black
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        self.segments = max(1, min(int(segments), self.steps))  # at least one gradient point per segment

    def params(self) -> dict[str, Any]:
        specs = self.baseline if isinstance(self.baseline, list | tuple) else [self.baseline]
        names = [s if isinstance(s, str | int | float) else "tensor" for s in specs]
        return {**super().params(), "baseline": names if len(names) > 1 else names[0], "steps": self.steps,
                "method": self.method, "batch_size": self.batch_size,
                **({"segments": self.segments} if self.method.strip().lower() == "adaptive" else {})}

    # -- baselines -------------------------------------------------------------------------------------
    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (black, white) in input space when preprocessing is known."""
        if self.preprocess is None:
            return None
        mean = torch.as_tensor(self.preprocess.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.preprocess.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return -mean / std, (1 - mean) / std

    def baselines(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The baseline tensors (each shaped like ``x``) for this batch."""
        specs = list(self.baseline) if isinstance(self.baseline, list | tuple) else [self.baseline]
        if not specs:
            raise LumosError("baseline= is an empty list; give at least one baseline.")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return [self._baseline(spec, x, gen) for spec in specs]

    def _baseline(self, spec: BaselineSpec, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if isinstance(spec, torch.Tensor):
            b = spec.detach().to(x.device, x.dtype)
            if b.ndim == 3:
                b = b[None]
            try:
                return b.expand_as(x).clone()
            except RuntimeError:
                raise LumosError(
                    f"A baseline tensor of shape {tuple(spec.shape)} does not fit the input {tuple(x.shape)}."
                ) from None
        if isinstance(spec, int | float) and not isinstance(spec, bool):
            return torch.full_like(x, float(spec))
        key = str(spec).strip().lower()
        if key == "zero":
            return torch.zeros_like(x)
        if key == "black":
            if self.black is not None:
                b = torch.as_tensor(self.black, dtype=x.dtype, device=x.device)
                b = b.view(1, -1, 1, 1) if b.ndim == 1 else b
                return b.expand_as(x).clone() if b.ndim else torch.full_like(x, float(b))
            stats = self._stats(x)
            if stats is None:
                raise LumosError(
                    "baseline='black' needs the preprocessing: pass preprocess= (from lumos.load_model) or "
                    "black= (the black image in input space, per channel)."
                )
            return stats[0].expand_as(x).clone()
        if key == "blur":
            return gaussian_blur(x, self.blur_sigma)
        if key == "uniform":
            stats = self._stats(x)
            if stats is not None:
                lo, hi = stats[0].expand_as(x), stats[1].expand_as(x)
            else:
                lo = x.amin((1, 2, 3), keepdim=True).expand_as(x)
                hi = x.amax((1, 2, 3), keepdim=True).expand_as(x)
            u = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            return lo + u * (hi - lo)
        raise LumosError(f"baseline={spec!r} is not known; use one of {', '.join(BASELINES)}, a number or a tensor.")

    # -- integration -----------------------------------------------------------------------------------
    def _scores(self, out: torch.Tensor, target: TargetSpec, classes: torch.Tensor | None, n: int) -> torch.Tensor:
        """Scores (m, n, K) of an output holding m groups of the same n images."""
        m = out.shape[0] // n
        if classes is not None:
            k = classes.shape[1]
            return out.reshape(m, n, -1).gather(2, classes[None].expand(m, n, k))
        fn: Callable[[torch.Tensor], torch.Tensor] = target  # type: ignore[assignment]
        return torch.stack([fn(out[i * n:(i + 1) * n]) for i in range(m)])[..., None]

    def _path_scores(self, bs: torch.Tensor, diff: torch.Tensor, alphas: torch.Tensor, target: TargetSpec,
                     classes: torch.Tensor | None, per_chunk: int) -> torch.Tensor:
        """Scores and their slopes d score / d alpha, (P, n, K, 2), at path points ``alphas`` (P, n).

        Forward-mode AD along the path direction: no backward pass, no graph kept.
        """
        n = bs.shape[0]
        out = []
        with torch.no_grad(), fwAD.dual_level():
            for a in alphas.to(bs.device, bs.dtype).split(per_chunk):
                path = (bs[None] + a[..., None, None, None] * diff[None]).flatten(0, 1)
                tangent = diff[None].expand(a.shape[0], *diff.shape).flatten(0, 1)
                res = self._scores(select_output(self.model(fwAD.make_dual(path, tangent)), self.output),
                                   target, classes, n)
                value, slope = fwAD.unpack_dual(res)
                out.append(torch.stack([value, torch.zeros_like(value) if slope is None else slope], -1))
        return torch.cat(out)

    def _segments(self, bs: torch.Tensor, diff: torch.Tensor, target: TargetSpec, classes: torch.Tensor | None,
                  per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image segment bounds (n, S+1), scores and slopes there (n, S+1, K, 2), and segment weights (n, S).

        Starts from ``segments // 4`` even segments, then repeatedly bisects the segments where the
        trapezoid rule on the slopes disagrees most with the score's actual change, until there are
        ``segments``. A segment's weight (its share of the gradient points) is that disagreement plus
        the change of the score over it.
        """
        n = bs.shape[0]
        first = max(1, self.segments // 4)
        bounds = torch.linspace(0, 1, first + 1, dtype=torch.float64)[None].repeat(n, 1)
        f = self._path_scores(bs, diff, bounds.T, target, classes, per_chunk).double().transpose(0, 1)

        def errors() -> tuple[torch.Tensor, torch.Tensor]:
            h = (bounds[:, 1:] - bounds[:, :-1])[..., None]
            change = f[:, 1:, :, 0] - f[:, :-1, :, 0]
            trap = h * (f[:, 1:, :, 1] + f[:, :-1, :, 1]) / 2
            return (change - trap).abs().sum(2), change.abs().sum(2)

        while bounds.shape[1] - 1 < self.segments:
            r = min(first, self.segments - (bounds.shape[1] - 1))
            idx = errors()[0].topk(r, dim=1).indices
            mids = (bounds.gather(1, idx) + bounds.gather(1, idx + 1)) / 2  # (n, r)
            fm = self._path_scores(bs, diff, mids.T, target, classes, per_chunk).double().transpose(0, 1)
            bounds, order = torch.cat([bounds, mids], 1).sort(1)
            f = torch.cat([f, fm], 1).gather(1, order[:, :, None, None].expand(-1, -1, *f.shape[2:]))
        err, change = errors()
        return bounds, f, err + change

    def attribute(self, x: torch.Tensor, target: TargetSpec) -> tuple[torch.Tensor, Targets, dict[str, Any]]:
        with torch.no_grad():
            out = select_output(self.model(x), self.output)
            targets = resolve_targets(target, out, self.labels)
        classes = targets.classes
        b, k = targets.scores.shape
        adaptive = self.method.strip().lower() == "adaptive"
        if not adaptive:
            alphas, weights = (torch.tensor(v, dtype=torch.float64) for v in quadrature(self.method, self.steps))
        # Image groups: class targets may split the batch; a callable sees whole batches only.
        g = b if classes is None else min(b, self.batch_size)
        per_chunk = max(1, self.batch_size // g)
        base_list = self.baselines(x)
        attr = torch.zeros((b, k, *x.shape[1:]), dtype=x.dtype, device=x.device)
        base_scores = torch.zeros((b, k), dtype=x.dtype, device=x.device)
        for bl in base_list:
            for s in range(0, b, g):
                xs, bs = x[s:s + g], bl[s:s + g]
                cs = None if classes is None else classes[s:s + g]
                n = xs.shape[0]
                diff = xs - bs
                if adaptive:
                    bounds, f, weight = self._segments(bs, diff, target, cs, per_chunk)
                    base_scores[s:s + n] += f[:, 0, :, 0].to(x.dtype)
                    a_all, w_all = adaptive_points(bounds, allocate(weight, self.steps))
                else:
                    with torch.no_grad():
                        base_scores[s:s + n] += self._scores(
                            select_output(self.model(bs), self.output), target, cs, n)[0]
                    a_all, w_all = alphas[:, None].expand(-1, n), weights[:, None].expand(-1, n)
                a_all, w_all = a_all.to(x.device, x.dtype), w_all.to(x.device, x.dtype)
                total = torch.zeros((n, k, *x.shape[1:]), dtype=x.dtype, device=x.device)
                for c in range(0, a_all.shape[0], per_chunk):
                    a, w = a_all[c:c + per_chunk], w_all[c:c + per_chunk]
                    path = (bs[None] + a[..., None, None, None] * diff[None]).flatten(0, 1).requires_grad_(True)
                    scores = self._scores(select_output(self.model(path), self.output), target, cs, n)
                    for j in range(k):
                        weighted = (scores[..., j] * w).sum()
                        if not weighted.requires_grad:
                            continue
                        (grad,) = torch.autograd.grad(weighted, path, retain_graph=j < k - 1, allow_unused=True)
                        if grad is not None:
                            total[:, j] += grad.view(-1, n, *x.shape[1:]).sum(0)
                attr[s:s + n] += diff[:, None] * total
        nb = len(base_list)
        attr = (attr / nb).flatten(0, 1)
        gap = targets.scores.detach() - base_scores / nb
        delta = attr.sum((1, 2, 3)) - gap.reshape(-1)
        return attr, targets, {"delta": delta.detach(), "gap": gap.reshape(-1).detach()}
