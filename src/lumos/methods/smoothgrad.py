"""SmoothGrad (Smilkov et al. 2017) as a wrapper around any registered method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lumos.engine import Forward
from lumos.errors import LumosError, positive_int
from lumos.layers import LayerSpec, Site
from lumos.methods.base import LayerMethod, method_class, register
from lumos.methods.pixel import PixelMethod
from lumos.shortfall import gather_shortfalls

VARIANTS = ("plain", "squared", "variance")


@register
class SmoothGrad(PixelMethod):
    """SmoothGrad (Smilkov et al. 2017): the average of a method over noisy copies of the input.

    Args:
        base: the wrapped method's name (default ``"gradients"``; any method, e.g. ``"guided_backprop"``,
            ``"integrated_gradients"`` or a CAM).
        n_samples: number of noisy copies (default 25).
        noise: standard deviation of the Gaussian noise as a fraction of each image's range
            ``max(x) - min(x)`` (the paper's convention; default 0.15).
        variant: ``"plain"`` (mean), ``"squared"`` (mean of squares, SmoothGrad-Squared) or
            ``"variance"`` (VarGrad).
        batch_size: images per call of the wrapped method (noisy copies x images); bounds memory.
        seed: seed of the noise (reproducible calls).
        **base_kwargs: passed to the wrapped method's constructor (e.g. ``steps=`` for IG).

    Targets are resolved once on the clean images; every noisy copy explains the same class. Noise 0
    gives exactly the wrapped method. ``raw`` is the smoothed attribution (the wrapped method's raw form).
    """

    name = "smoothgrad"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        base: str = "gradients",
        n_samples: int = 25,
        noise: float = 0.15,
        variant: str = "plain",
        batch_size: int = 32,
        seed: int = 0,
        output: Any = None,
        labels: Any = None,
        eval_mode: bool = True,
        reduce: Any = "absmax",
        normalize: Any = "percentile",
        clip: float = 99.5,
        probs: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(model, layer, output=output, labels=labels, eval_mode=eval_mode, reduce=reduce,
                         normalize=normalize, clip=clip, probs=probs)
        cls = method_class(base)
        if cls is SmoothGrad:
            raise LumosError("smoothgrad cannot wrap itself; choose another base method.")
        if variant not in VARIANTS:
            raise LumosError(f"variant={variant!r} is not known; use one of {', '.join(VARIANTS)}.")
        n_samples = positive_int("n_samples", n_samples)
        batch_size = positive_int("batch_size", batch_size)
        if not isinstance(noise, int | float) or not float(noise) >= 0:
            raise LumosError(f"noise={noise!r} must be a non-negative fraction of the input range.")
        self.base = cls(model, layer, output=output, labels=labels, eval_mode=eval_mode, probs=probs, **base_kwargs)
        self.kind = self.base.kind  # the smoothed maps are what the base method makes
        self.uses_layer = self.base.uses_layer
        self.n_samples = int(n_samples)
        self.noise = float(noise)
        self.variant = variant
        self.batch_size = int(batch_size)
        self.seed = seed

    def params(self) -> dict[str, Any]:
        return {**super().params(), "base": self.base.name, "n_samples": self.n_samples, "noise": self.noise,
                "variant": self.variant, "batch_size": self.batch_size, "seed": self.seed,
                "base_params": self.base.params()}

    grad_mode = "none"  # the clean forward resolves targets (and records the base's layer, if any)

    def sites(self, x: torch.Tensor) -> list[Site]:
        return self.base.sites(x)

    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if isinstance(self.base, LayerMethod):
            return self.base.finish(raws, size)
        return super().finish(raws, size)

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        x, targets = fw.x, fw.targets
        b, k = targets.scores.shape
        sigma = self.noise * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))
        # Copies share a call when targets are classes; with noise 0 each copy runs alone, so the result is
        # bit-identical to the wrapped method (batched kernels may round differently).
        per_call = 1 if targets.classes is None or self.noise == 0 else max(1, self.batch_size // b)
        ranks: list[Any] = []
        with gather_shortfalls():  # the wrapped method's cap (Score-CAM, IG): said once for all the copies
            for j in range(k):
                spec = fw.target.spec() if targets.classes is None else targets.classes[:, j]
                ranks.append(self._smooth(x, sigma, spec, per_call))
        parts = [r if isinstance(r, tuple) else (r,) for r in ranks]
        return [torch.stack([p[i] for p in parts], 1).flatten(0, 1) for i in range(len(parts[0]))]

    def _smooth(self, x: torch.Tensor, sigma: torch.Tensor, spec: Any, per_call: int) -> Any:
        """Welford mean (and variance) of the base method's raw output over the noisy copies."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        b = x.shape[0]
        count = 0
        mean: list[torch.Tensor] | None = None
        m2: list[torch.Tensor] | None = None
        done = 0
        while done < self.n_samples:
            m = min(per_call, self.n_samples - done)
            # One noise pattern per copy, shared by the images (scaled by each one's range): an image's map
            # does not depend on the batch it came in.
            eps = torch.randn((m, 1, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
            noisy = (x[None] + sigma.view(1, b, 1, 1, 1) * eps).flatten(0, 1)
            t = spec if not isinstance(spec, torch.Tensor) else spec.repeat(m)
            ex = self.base(noisy, t)
            outs = ex.raw if isinstance(ex.raw, tuple) else (ex.raw,)
            for i in range(m):
                sample = [o[i * b:(i + 1) * b].double() for o in outs]
                if self.variant == "squared":
                    sample = [s * s for s in sample]
                count += 1
                if mean is None:
                    mean = [s.clone() for s in sample]
                    m2 = [torch.zeros_like(s) for s in sample]
                    continue
                for idx, s in enumerate(sample):
                    d = s - mean[idx]
                    mean[idx] += d / count
                    m2[idx] += d * (s - mean[idx])  # type: ignore[index]
            done += m
        result = mean if self.variant != "variance" else [v / count for v in m2]  # type: ignore[union-attr]
        dtype = outs[0].dtype
        result = [r.to(dtype) for r in result]  # type: ignore[union-attr]
        return result[0] if len(result) == 1 else tuple(result)


__all__ = ["SmoothGrad"]
