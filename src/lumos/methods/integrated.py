"""Integrated gradients (Sundararajan et al. 2017), batched over path points, with a completeness check."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lumos.errors import LumosError
from lumos.layers import LayerSpec
from lumos.methods.base import register
from lumos.methods.pixel import PixelMethod
from lumos.targets import Targets, TargetSpec, resolve_targets, select_output

BaselineSpec = str | float | torch.Tensor
GRADIENT_STORE = 512 * 2**20  # bytes of path-point gradients the adaptive rule keeps per image group
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
    n = int(steps)
    if n < 1 or (key in ("trapezoid", "adaptive") and n < 2):
        raise LumosError(f"steps={steps!r} is too small for the {key} rule (it needs both ends of the path).")
    if key == "adaptive":
        key = "trapezoid"  # its starting nodes
    if key == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if key == "trapezoid":
        w = [1.0 / (n - 1)] * n
        w[0] = w[-1] = 0.5 / (n - 1)
        return torch.linspace(0, 1, n).tolist(), w
    start, stop = {"left": (0.0, 1 - 1 / n), "right": (1 / n, 1.0), "middle": (1 / (2 * n), 1 - 1 / (2 * n))}[key]
    return torch.linspace(start, stop, n).tolist(), [1.0 / n] * n


def trapezoid_weights(alphas: torch.Tensor) -> torch.Tensor:
    """Composite trapezoid weights for unsorted nodes ``alphas`` (n, P) that include 0 and 1 (same layout)."""
    order = alphas.argsort(1)
    a = alphas.gather(1, order)
    h = a[:, 1:] - a[:, :-1]
    w = torch.zeros_like(a)
    w[:, 1:] += h / 2
    w[:, :-1] += h / 2
    return torch.zeros_like(w).scatter_(1, order, w)


def refine(alphas: torch.Tensor, f: torch.Tensor, s: torch.Tensor, r: int) -> torch.Tensor:
    """Midpoints (r, n) of the ``r`` segments per image where the trapezoid rule on the slopes ``s`` misses the
    score's actual change most (``alphas`` (n, P) unsorted, ``f``/``s`` (n, P, K)), relative to each target's
    variation along the path."""
    order = alphas.argsort(1)
    a = alphas.gather(1, order)
    idx = order[..., None].expand_as(f)
    fs, ss = f.gather(1, idx), s.gather(1, idx)
    change = fs[:, 1:] - fs[:, :-1]
    err = ((a[:, 1:] - a[:, :-1])[..., None] * (ss[:, 1:] + ss[:, :-1]) / 2 - change).abs()
    scale = change.abs().sum(1, keepdim=True).clamp_min(1e-12)
    worst = (err / scale).sum(2).topk(r, dim=1).indices
    return ((a.gather(1, worst) + a.gather(1, worst + 1)) / 2).T


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
            ``trapezoid`` (Captum's ``riemann_*`` names are accepted). ``adaptive`` is a composite trapezoid
            rule whose nodes are placed per image: it starts from ``steps // 8 + 1`` even nodes and keeps
            bisecting the segments where the trapezoid rule on the slopes misses the score's actual change
            (known exactly from the forward passes) most. Scores of real networks often change steeply and
            unevenly over a short stretch of the path, where uniform rules waste their points.
        tolerance: the ``adaptive`` rule goes on past ``steps`` until the completeness error of every map is
            within this fraction of ``|F(x) - F(baseline)|`` (default 0.01; ``None`` or 0: exactly ``steps``).
        max_steps: most points per image and baseline for ``tolerance`` (default ``4 * steps``); when it is
            reached the error is whatever remains (see ``params["delta"]``).
        batch_size: images per forward/backward (path points x images); bounds memory.
        preprocess: an object with ``mean``/``std`` (e.g. the ``Preprocess`` from ``lumos.load_model``);
            gives the black image and the valid range for ``uniform``.
        black: the black image in input space, per channel (C,) or a full tensor; overrides ``preprocess``.
        blur_sigma: standard deviation in pixels of the ``blur`` baseline.
        seed: seed of the ``uniform`` baseline noise (reproducible calls).

    ``Explanation.params["delta"]`` holds the completeness error per map,
    ``sum(attr) - (F(x) - F(baseline))`` (mean of F over the baselines), and ``params["gap"]`` the
    ``F(x) - F(baseline)`` it should equal, ``params["points"]`` the gradient points spent per map (all
    baselines together).
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
        batch_size: int = 8,
        preprocess: Any = None,
        black: float | Sequence[float] | torch.Tensor | None = None,
        blur_sigma: float = 10.0,
        seed: int = 0,
        tolerance: float | None = 0.01,
        max_steps: int | None = None,
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
        self.tolerance = float(tolerance) if tolerance else 0.0
        if self.tolerance < 0:
            raise LumosError(f"tolerance must be a non-negative fraction, got {tolerance!r}.")
        self.max_steps = self.steps if not self.tolerance else int(max_steps or 4 * self.steps)
        if self.max_steps < self.steps:
            raise LumosError(f"max_steps={max_steps!r} is smaller than steps={steps!r}.")

    def params(self) -> dict[str, Any]:
        specs = self.baseline if isinstance(self.baseline, list | tuple) else [self.baseline]
        names = [s if isinstance(s, str | int | float) else "tensor" for s in specs]
        return {**super().params(), "baseline": names if len(names) > 1 else names[0], "steps": self.steps,
                "method": self.method, "batch_size": self.batch_size,
                **({"tolerance": self.tolerance, "max_steps": self.max_steps} if self._adaptive_rule else {})}

    @property
    def _adaptive_rule(self) -> bool:
        return self.method.strip().lower() == "adaptive"

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

    def _gradients(self, bs: torch.Tensor, diff: torch.Tensor, alphas: torch.Tensor, w: torch.Tensor | None,
                   target: TargetSpec, classes: torch.Tensor | None, per_chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input gradients of the scores at path points ``alphas`` (P, n), in chunks of ``per_chunk`` rows.

        With weights ``w`` (P, n) returns their weighted sum (n, K, C, H, W); without, every point's
        gradient (P, n, K, C, H, W). Also the scores (P, n, K) and slopes d score / d alpha (P, n, K) there.
        """
        n = bs.shape[0]
        alphas = alphas.to(bs.device, bs.dtype)
        grads, scores_out, slopes = [], [], []
        for c in range(0, alphas.shape[0], per_chunk):
            a = alphas[c:c + per_chunk]
            path = (bs[None] + a[..., None, None, None] * diff[None]).flatten(0, 1).requires_grad_(True)
            scores = self._scores(select_output(self.model(path), self.output), target, classes, n)
            per_target = []
            for j in range(scores.shape[2]):
                grad = None
                if scores.requires_grad:
                    (grad,) = torch.autograd.grad(scores[..., j].sum(), path, retain_graph=j < scores.shape[2] - 1,
                                                  allow_unused=True)
                per_target.append(torch.zeros_like(path) if grad is None else grad)
            g = torch.stack(per_target, 1).view(a.shape[0], n, -1, *bs.shape[1:])  # (m, n, K, C, H, W)
            slopes.append((g * diff[None, :, None]).sum((3, 4, 5)))
            scores_out.append(scores.detach())
            if w is None:
                grads.append(g)
            else:
                wc = w[c:c + per_chunk].to(bs.device, bs.dtype)
                grads.append((g * wc[..., None, None, None, None]).sum(0, keepdim=True))
        grad = torch.cat(grads)
        return (grad if w is None else grad.sum(0)), torch.cat(scores_out), torch.cat(slopes)

    def _converged(self, alphas: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> bool:
        """Whether one image's nodes (P,), scores and slopes (P, K) are enough: ``steps`` spent and the
        completeness error within ``tolerance`` (or ``max_steps`` reached)."""
        p = alphas.shape[0]
        if p < self.steps:
            return False
        if not self.tolerance or p >= self.max_steps:
            return True
        order = alphas.argsort()
        a, fs, ss = alphas[order], f[order], s[order]
        trap = ((a[1:] - a[:-1])[:, None] * (ss[1:] + ss[:-1]) / 2).sum(0)
        gap = fs[-1] - fs[0]
        return bool(((trap - gap).abs() <= self.tolerance * gap.abs()).all())

    def _adaptive(self, bs: torch.Tensor, diff: torch.Tensor, target: TargetSpec, classes: torch.Tensor | None,
                  per_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive trapezoid rule: integral of the gradient (n, K, C, H, W), baseline scores (n, K), points (n,).

        Starts from ``steps // 8 + 1`` even nodes (0 and 1 included); every round adds, per image, the
        midpoints of the ``steps // 16`` segments where the trapezoid rule on the slopes misses the score's
        change (known exactly from the forward passes) most, until ``steps`` points are spent and the
        completeness error is within ``tolerance`` (at most ``max_steps`` points).
        """
        n = bs.shape[0]
        first = max(2, min(self.steps, self.steps // 8 + 1))
        a0 = torch.linspace(0, 1, first, dtype=torch.float64)[None].repeat(n, 1)
        g, f0, s0 = self._gradients(bs, diff, a0.T, None, target, classes, per_chunk)
        alphas, f, s = list(a0), list(f0.double().transpose(0, 1)), list(s0.double().transpose(0, 1))
        rounds = [(list(range(n)), g)]  # (images, their gradients (m, n_images, K, C, H, W))
        per_round = max(1, self.steps // 16)
        while True:
            act = [i for i in range(n) if not self._converged(alphas[i], f[i], s[i])]
            if not act:
                break
            if classes is None:  # a callable target sees the whole group
                act = list(range(n))
            p = alphas[act[0]].shape[0]
            r = min(per_round, (self.steps if p < self.steps else self.max_steps) - p, p - 1)
            mids = refine(torch.stack([alphas[i] for i in act]), torch.stack([f[i] for i in act]),
                          torch.stack([s[i] for i in act]), r)
            g, fm, sm = self._gradients(bs[act], diff[act], mids, None, target,
                                        None if classes is None else classes[act], per_chunk)
            rounds.append((act, g))
            for c, i in enumerate(act):
                alphas[i] = torch.cat([alphas[i], mids[:, c]])
                f[i] = torch.cat([f[i], fm[:, c].double()])
                s[i] = torch.cat([s[i], sm[:, c].double()])
        weights = [trapezoid_weights(a[None])[0].to(bs.dtype) for a in alphas]
        total = torch.zeros((n, *rounds[0][1].shape[2:]), dtype=bs.dtype, device=bs.device)
        used = [0] * n
        for act, g in rounds:
            m = g.shape[0]
            for c, i in enumerate(act):
                w = weights[i][used[i]:used[i] + m].to(bs.device)
                total[i] += (g[:, c] * w.view(-1, 1, 1, 1, 1)).sum(0)
                used[i] += m
        points = torch.tensor([a.shape[0] for a in alphas])
        return total, torch.stack([fi[0] for fi in f]).to(bs.dtype), points

    def attribute(self, x: torch.Tensor, target: TargetSpec) -> tuple[torch.Tensor, Targets, dict[str, Any]]:
        with torch.no_grad():
            out = select_output(self.model(x), self.output)
            targets = resolve_targets(target, out, self.labels)
        classes = targets.classes
        b, k = targets.scores.shape
        adaptive = self._adaptive_rule
        if not adaptive:
            alphas, weights = (torch.tensor(v, dtype=torch.float64) for v in quadrature(self.method, self.steps))
        # Image groups: class targets may split the batch; a callable sees whole batches only. The adaptive
        # rule keeps every point's gradient until its weight is known: groups bounded by GRADIENT_STORE bytes.
        g = b if classes is None else min(b, self.batch_size)
        if adaptive and classes is not None:
            per_image = self.max_steps * k * x[0].numel() * x.element_size()
            g = max(1, min(g, GRADIENT_STORE // per_image))
        per_chunk = max(1, self.batch_size // g)
        base_list = self.baselines(x)
        points = torch.zeros(b, dtype=torch.long)
        attr = torch.zeros((b, k, *x.shape[1:]), dtype=x.dtype, device=x.device)
        base_scores = torch.zeros((b, k), dtype=x.dtype, device=x.device)
        for bl in base_list:
            for s in range(0, b, g):
                xs, bs = x[s:s + g], bl[s:s + g]
                cs = None if classes is None else classes[s:s + g]
                n = xs.shape[0]
                diff = xs - bs
                if adaptive:
                    total, base, used = self._adaptive(bs, diff, target, cs, per_chunk)
                    points[s:s + n] += used
                else:
                    a_all, w_all = alphas[:, None].expand(-1, n), weights[:, None].expand(-1, n)
                    points[s:s + n] += len(alphas)
                    total = self._gradients(bs, diff, a_all, w_all, target, cs, per_chunk)[0]
                    with torch.no_grad():
                        base = self._scores(select_output(self.model(bs), self.output), target, cs, n)[0]
                base_scores[s:s + n] += base
                attr[s:s + n] += diff[:, None] * total
        nb = len(base_list)
        attr = (attr / nb).flatten(0, 1)
        gap = targets.scores.detach() - base_scores / nb
        delta = attr.sum((1, 2, 3)) - gap.reshape(-1)
        return attr, targets, {"delta": delta.detach(), "gap": gap.reshape(-1).detach(),
                               "points": points.repeat_interleave(k)}
