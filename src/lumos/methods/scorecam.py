"""Score-CAM (Wang et al. 2020): channels weighed by how much the input masked by them raises the score."""

from __future__ import annotations

from typing import Any

import torch

from lumos.engine import Forward, score_inputs
from lumos.errors import positive_int
from lumos.explanation import normalize_maps, upsample
from lumos.methods.base import ActivationMethod, register


@register
class ScoreCAM(ActivationMethod):
    """Score-CAM with bounded memory and an optional channel budget (as in Faster Score-CAM).

    Each kept channel is upsampled, scaled to [0, 1] and used as a soft mask
    ``x * m + baseline * (1 - m)``; its weight is the target's probability on that input minus the
    probability on the baseline alone (the score itself for callable targets or ``probs="none"``).
    Masked inputs run in chunks of ``batch_size``. ``max_channels`` keeps the channels whose activation has
    the highest spatial variance (``None`` = all channels, the original method).
    """

    name = "scorecam"

    def __init__(
        self, *args: Any, batch_size: int = 32, max_channels: int | None = 32, baseline: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_channels = None if max_channels is None else positive_int("max_channels", max_channels)
        self.baseline = float(baseline)

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "batch_size": self.batch_size,
            "max_channels": self.max_channels,
            "baseline": self.baseline,
        }

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        x = fw.x
        size = tuple(x.shape[-2:])
        raws = []
        for a_all in fw.maps():
            per_image = []
            for i in range(x.shape[0]):
                a = a_all[i]
                keep = torch.arange(a.shape[0], device=a.device)
                if self.max_channels is not None and self.max_channels < a.shape[0]:
                    keep = a.flatten(1).var(1).topk(self.max_channels).indices
                xi = x[i:i + 1]
                target = fw.target.select(torch.tensor([i]))
                base = score_inputs(self.model, lambda s, e, xi=xi: (torch.full_like(xi, self.baseline), None), 1,
                                    target, output=self.output)

                def masked(start: int, stop: int, a=a, keep=keep, xi=xi) -> tuple[torch.Tensor, torch.Tensor]:
                    masks = normalize_maps(upsample(a[keep[start:stop]].float(), size, "bilinear"), "minmax")[:, None]
                    inputs = (xi * masks + self.baseline * (1 - masks)).to(x.dtype)
                    return inputs, torch.zeros(stop - start, dtype=torch.long)

                scores = score_inputs(self.model, masked, len(keep), target, output=self.output,
                                      batch_size=self.batch_size)
                weights = torch.zeros(a.shape[0], scores.shape[1], device=a.device)
                weights[keep] = (scores - base).to(weights)
                per_image.append(torch.einsum("ck,chw->khw", weights.to(a.dtype), a))
            raws.append(torch.cat(per_image))
        return raws
