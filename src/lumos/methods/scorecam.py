"""Score-CAM (Wang et al. 2020): channels weighed by how much the input masked by them raises the score."""

from __future__ import annotations

from typing import Any

import torch

from lumos.explanation import normalize_maps, upsample
from lumos.methods.base import LayerMethod, register
from lumos.targets import Targets, TargetSpec, select_output


@register
class ScoreCAM(LayerMethod):
    """Score-CAM with bounded memory and an optional channel budget (as in Faster Score-CAM).

    Each kept channel is upsampled, scaled to [0, 1] and used as a soft mask
    ``x * m + baseline * (1 - m)``; its weight is the target's softmax probability on that input minus
    the probability on the baseline alone. Masked inputs run in chunks of ``batch_size``.
    ``max_channels`` keeps the channels whose activation has the highest spatial variance
    (``None`` = all channels, the original method).
    """

    name = "scorecam"
    needs_grad = False

    def __init__(
        self, *args: Any, batch_size: int = 32, max_channels: int | None = 32, baseline: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if batch_size < 1 or (max_channels is not None and max_channels < 1):
            raise ValueError("batch_size and max_channels must be positive.")
        self.batch_size = batch_size
        self.max_channels = max_channels
        self.baseline = baseline
        self._target: TargetSpec = None

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "batch_size": self.batch_size,
            "max_channels": self.max_channels,
            "baseline": self.baseline,
        }

    def __call__(self, x: torch.Tensor, target: TargetSpec = None):
        self._target = target
        return super().__call__(x, target)

    def _score(self, inputs: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """(n, K) target scores: softmax probability of each class, or the callable's score."""
        out = select_output(self.model(inputs), self.output)
        if classes is None:
            return self._target(out)[:, None]
        dist = torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out.float(), 1)
        return dist[:, classes]

    @torch.no_grad()
    def compute(self, x: torch.Tensor, acts: list[torch.Tensor], targets: Targets) -> list[torch.Tensor]:
        size = tuple(x.shape[-2:])
        raws = []
        for act in acts:
            per_image = []
            for i in range(x.shape[0]):
                classes = None if targets.classes is None else targets.classes[i]
                a = act[i]
                keep = torch.arange(a.shape[0], device=a.device)
                if self.max_channels is not None and self.max_channels < a.shape[0]:
                    keep = a.flatten(1).var(1).topk(self.max_channels).indices
                base_in = torch.full_like(x[i : i + 1], self.baseline)
                base = self._score(base_in, classes)
                weights = torch.zeros(a.shape[0], base.shape[1], device=a.device)
                for chunk in keep.split(self.batch_size):
                    masks = normalize_maps(upsample(a[chunk].float(), size, "bilinear"), "minmax")[:, None]
                    masked = x[i : i + 1] * masks + self.baseline * (1 - masks)
                    weights[chunk] = self._score(masked.to(x.dtype), classes) - base
                per_image.append(torch.einsum("ck,chw->khw", weights.to(a.dtype), a))
            raws.append(torch.cat(per_image))
        return raws
