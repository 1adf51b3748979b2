"""Integrated gradients (Sundararajan et al. 2017), batched over path points, with a completeness check.

The quadrature rules live in :mod:`lumos.methods.quadrature`; gradients come from the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lumos.engine import Forward, input_gradients
from lumos.errors import LumosError, positive_int
from lumos.layers import LayerSpec
from lumos.methods.base import register
from lumos.methods.pixel import PixelMethod
from lumos.methods.quadrature import adaptive_integral, refine, trapezoid_weights
from lumos.methods.quadrature import quadrature as rule_points
from lumos.shortfall import Shortfall, report_shortfall
from lumos.targets import Target, select_output

__all__ = ["IntegratedGradients", "gaussian_blur", "refine", "trapezoid_weights"]

BaselineSpec = str | float | torch.Tensor
GRADIENT_STORE = 512 * 2**20  # bytes of path-point gradients the adaptive rule keeps per image group
BASELINES = ("zero", "black", "blur", "uniform")
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
        quadrature: the rule: ``adaptive`` (default), ``gausslegendre``, ``left``, ``right``, ``middle``,
            ``trapezoid`` (Captum's ``riemann_*`` names are accepted). ``adaptive`` is a composite trapezoid
            rule whose nodes are placed per image: it starts from ``steps // 8 + 1`` even nodes and keeps
            bisecting the segments where the trapezoid rule on the slopes misses the score's actual change
            (known exactly from the forward passes) most. Scores of real networks often change steeply and
            unevenly over a short stretch of the path, where uniform rules waste their points.
        method: Captum's name for ``quadrature``, accepted on this class (``lumos.explain`` takes the lumos
            method's name as ``method``, so pass ``quadrature=`` there).
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
    grad_mode = "none"  # the clean forward only resolves targets; gradients come at the path points

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        baseline: BaselineSpec | Sequence[BaselineSpec] = "zero",
        steps: int = 64,
        quadrature: str = "adaptive",
        batch_size: int = 8,
        preprocess: Any = None,
        black: float | Sequence[float] | torch.Tensor | None = None,
        blur_sigma: float = 10.0,
        seed: int = 0,
        tolerance: float | None = 0.01,
        max_steps: int | None = None,
        method: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layer, **kwargs)
        self.steps = positive_int("steps", steps)
        if method is not None:
            if quadrature != "adaptive" and method != quadrature:
                raise LumosError(f"method={method!r} and quadrature={quadrature!r} name two rules; "
                                 "pass one (quadrature=).")
            quadrature = method
        rule_points(quadrature, self.steps)  # fail early on a bad rule
        self.baseline = baseline
        batch_size = positive_int("batch_size", batch_size)
        self.quadrature = quadrature
        self.batch_size = int(batch_size)
        self.preprocess = preprocess
        self.black = black
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        self.tolerance = float(tolerance) if tolerance else 0.0
        if self.tolerance < 0:
            raise LumosError(f"tolerance must be a non-negative fraction, got {tolerance!r}.")
        self.max_steps = self.steps if not self.tolerance else positive_int("max_steps", max_steps or 4 * self.steps)
        if self.max_steps < self.steps:
            raise LumosError(f"max_steps={max_steps!r} is smaller than steps={steps!r}.")

    def params(self) -> dict[str, Any]:
        specs = self.baseline if isinstance(self.baseline, list | tuple) else [self.baseline]
        names = [s if isinstance(s, str | int | float) else "tensor" for s in specs]
        return {**super().params(), "baseline": names if len(names) > 1 else names[0], "steps": self.steps,
                "quadrature": self.quadrature, "batch_size": self.batch_size,
                **({"tolerance": self.tolerance, "max_steps": self.max_steps} if self._adaptive_rule else {})}

    @property
    def _adaptive_rule(self) -> bool:
        return self.quadrature.strip().lower() == "adaptive"

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
    def _gradients(self, bs: torch.Tensor, diff: torch.Tensor, alphas: torch.Tensor, w: torch.Tensor | None,
                   target: Target, images: torch.Tensor, per_chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input gradients of the scores at path points ``alphas`` (P, n), in chunks of ``per_chunk`` rows.

        ``images`` (n,) are the batch indices of the n path starts ``bs``. With weights ``w`` (P, n) returns
        their weighted sum (n, K, C, H, W); without, every point's gradient (P, n, K, C, H, W). Also the
        scores (P, n, K) and slopes d score / d alpha (P, n, K) there.
        """
        n = bs.shape[0]
        alphas = alphas.to(bs.device, bs.dtype)
        grads, scores_out, slopes = [], [], []
        for c in range(0, alphas.shape[0], per_chunk):
            a = alphas[c:c + per_chunk]
            path = (bs[None] + a[..., None, None, None] * diff[None]).flatten(0, 1)
            g, scores = input_gradients(self.model, path, target, images.repeat(a.shape[0]), self.output)
            g = g.view(a.shape[0], n, -1, *bs.shape[1:])  # (m, n, K, C, H, W)
            slopes.append((g * diff[None, :, None]).sum((3, 4, 5)))
            scores_out.append(scores.view(a.shape[0], n, -1))
            if w is None:
                grads.append(g)
            else:
                wc = w[c:c + per_chunk].to(bs.device, bs.dtype)
                grads.append((g * wc[..., None, None, None, None]).sum(0, keepdim=True))
        grad = torch.cat(grads)
        return (grad if w is None else grad.sum(0)), torch.cat(scores_out), torch.cat(slopes)

    def compute(self, fw: Forward) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x, target = fw.x, fw.target
        b, k = fw.targets.scores.shape
        callable_target = fw.targets.classes is None
        adaptive = self._adaptive_rule
        if not adaptive:
            alphas, weights = (torch.tensor(v, dtype=torch.float64) for v in rule_points(self.quadrature, self.steps))
        # Image groups: class targets may split the batch; a callable sees whole batches only. The adaptive
        # rule keeps every point's gradient until its weight is known: groups bounded by GRADIENT_STORE bytes.
        g = b if callable_target else min(b, self.batch_size)
        if adaptive and not callable_target:
            per_image = self.max_steps * k * x[0].numel() * x.element_size()
            g = max(1, min(g, GRADIENT_STORE // per_image))
        per_chunk = max(1, self.batch_size // g)
        base_list = self.baselines(x)
        points = torch.zeros(b, dtype=torch.long)
        attr = torch.zeros((b, k, *x.shape[1:]), dtype=x.dtype, device=x.device)
        base_scores = torch.zeros((b, k), dtype=x.dtype, device=x.device)
        path_scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images (n,), their scores on the path (P, n, K))
        for bl in base_list:
            for s in range(0, b, g):
                xs, bs = x[s:s + g], bl[s:s + g]
                n = xs.shape[0]
                images = torch.arange(s, s + n)
                diff = xs - bs
                if adaptive:
                    def evaluate(al: torch.Tensor, act: list[int], bs=bs, diff=diff, images=images):
                        done = self._gradients(bs[act], diff[act], al, None, target, images[act], per_chunk)
                        path_scores.append((images[act], done[1]))
                        return done

                    total, base, used = adaptive_integral(evaluate, n, self.steps, self.max_steps, self.tolerance,
                                                          whole_group=callable_target)
                    points[s:s + n] += used
                else:
                    a_all, w_all = alphas[:, None].expand(-1, n), weights[:, None].expand(-1, n)
                    points[s:s + n] += len(alphas)
                    total, scores, _ = self._gradients(bs, diff, a_all, w_all, target, images, per_chunk)
                    path_scores.append((images, scores))
                    base = self._baseline_scores(bs, target, images)
                base_scores[s:s + n] += base
                attr[s:s + n] += diff[:, None] * total
        check = getattr(target, "check_path", None)  # a target that can be absent on the path (a detection box)
        if check is not None:
            check(torch.cat([i.repeat(sc.shape[0]) for i, sc in path_scores]),
                  torch.cat([sc.flatten(0, 1) for _, sc in path_scores]))
        nb = len(base_list)
        attr = (attr / nb).flatten(0, 1)
        gap = fw.targets.scores.detach() - base_scores / nb
        delta = attr.sum((1, 2, 3)) - gap.reshape(-1)
        if adaptive and self.tolerance:
            self._report_cap(delta.detach(), gap.reshape(-1).detach())
        return [attr], {"delta": delta.detach(), "gap": gap.reshape(-1).detach(), "points": points.repeat_interleave(k)}

    def _report_cap(self, delta: torch.Tensor, gap: torch.Tensor) -> None:
        """Maps whose completeness error |delta| / |gap| is still above the tolerance at ``max_steps``: one
        warning per call, or per run (:func:`~lumos.shortfall.gather_shortfalls`)."""
        error = torch.where(delta == 0, 0.0, delta.double().abs() / gap.double().abs())
        report_shortfall(Shortfall(
            "Integrated gradients", f"max_steps={self.max_steps} points",
            "completeness error (share of |F(x) - F(baseline)|)", self.tolerance, "delta",
            "raise max_steps (CLI: --set max_steps=N) or steps."), error)

    @torch.no_grad()
    def _baseline_scores(self, bs: torch.Tensor, target: Target, images: torch.Tensor) -> torch.Tensor:
        return target.scores(select_output(self.model(bs), self.output), images)
