"""Quadrature rules for integrating along a straight path in [0, 1] (integrated gradients' maths).

Nothing here knows about models: the fixed rules give points and weights; the adaptive rule asks an
``evaluate(alphas, images)`` callback for gradients, scores and slopes at new points and decides where the
next points go.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lumos.errors import LumosError

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


Evaluate = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def converged(alphas: torch.Tensor, f: torch.Tensor, s: torch.Tensor, steps: int, max_steps: int,
              tolerance: float) -> bool:
    """Whether one image's nodes (P,), scores and slopes (P, K) are enough: ``steps`` spent and the
    completeness error within ``tolerance`` (or ``max_steps`` reached)."""
    p = alphas.shape[0]
    if p < steps:
        return False
    if not tolerance or p >= max_steps:
        return True
    order = alphas.argsort()
    a, fs, ss = alphas[order], f[order], s[order]
    trap = ((a[1:] - a[:-1])[:, None] * (ss[1:] + ss[:-1]) / 2).sum(0)
    gap = fs[-1] - fs[0]
    return bool(((trap - gap).abs() <= tolerance * gap.abs()).all())


def adaptive_integral(evaluate: Evaluate, n: int, steps: int, max_steps: int, tolerance: float,
                      whole_group: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive trapezoid rule: integral of the gradient (n, K, ...), scores at alpha = 0 (n, K), points (n,).

    ``evaluate(alphas (P, m), images)`` returns gradients (P, m, K, ...), scores (P, m, K) and slopes
    d score / d alpha (P, m, K) of the ``m`` listed images at their points. Starts from ``steps // 8 + 1``
    even nodes (0 and 1 included); every round adds, per image, the midpoints of the ``steps // 16``
    segments where the trapezoid rule on the slopes misses the score's change (known exactly from the
    forward passes) most, until ``steps`` points are spent and the completeness error is within
    ``tolerance`` (at most ``max_steps`` points). ``whole_group``: every round evaluates all images.
    """
    first = max(2, min(steps, steps // 8 + 1))
    a0 = torch.linspace(0, 1, first, dtype=torch.float64)[None].repeat(n, 1)
    g, f0, s0 = evaluate(a0.T, list(range(n)))
    alphas, f, s = list(a0), list(f0.double().transpose(0, 1)), list(s0.double().transpose(0, 1))
    rounds = [(list(range(n)), g)]  # (images, their gradients (m, n_images, K, ...))
    per_round = max(1, steps // 16)
    while True:
        act = [i for i in range(n) if not converged(alphas[i], f[i], s[i], steps, max_steps, tolerance)]
        if not act:
            break
        if whole_group:
            act = list(range(n))
        p = alphas[act[0]].shape[0]
        r = min(per_round, (steps if p < steps else max_steps) - p, p - 1)
        mids = refine(torch.stack([alphas[i] for i in act]), torch.stack([f[i] for i in act]),
                      torch.stack([s[i] for i in act]), r)
        g, fm, sm = evaluate(mids, act)
        rounds.append((act, g))
        for c, i in enumerate(act):
            alphas[i] = torch.cat([alphas[i], mids[:, c]])
            f[i] = torch.cat([f[i], fm[:, c].double()])
            s[i] = torch.cat([s[i], sm[:, c].double()])
    dtype, device = rounds[0][1].dtype, rounds[0][1].device
    weights = [trapezoid_weights(a[None])[0].to(dtype) for a in alphas]
    total = torch.zeros((n, *rounds[0][1].shape[2:]), dtype=dtype, device=device)
    used = [0] * n
    for act, g in rounds:
        m = g.shape[0]
        for c, i in enumerate(act):
            w = weights[i][used[i]:used[i] + m].to(device)
            total[i] += (g[:, c] * w.view(-1, *([1] * (g.dim() - 2)))).sum(0)
            used[i] += m
    points = torch.tensor([a.shape[0] for a in alphas])
    return total, torch.stack([fi[0] for fi in f]).to(dtype), points
