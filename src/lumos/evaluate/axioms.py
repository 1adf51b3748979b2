"""Axioms where they apply: completeness (Sundararajan et al. 2017) of pixel attributions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lumos.errors import LumosError
from lumos.evaluate._common import TargetLike, check_images, check_model, resolve_classes, scoring
from lumos.evaluate.faithfulness import Substrate, _substrate
from lumos.targets import OutputSpec, select_output


@dataclass
class CompletenessResult:
    """Per image: ``total`` = Σ attributions, ``gap`` = f(x) − f(baseline) for the target logit,
    ``delta`` = |total − gap| and ``relative`` = delta / |gap|."""

    total: torch.Tensor
    gap: torch.Tensor
    delta: torch.Tensor
    relative: torch.Tensor


class Completeness:
    """Completeness: the attributions of an image sum to the change of the target's *logit* between the
    baseline and the image. Holds exactly for integrated gradients (up to the path discretisation) and for
    gradient × input on a linear model; apply it to signed pixel attributions (``Explanation.raw`` of the
    pixel-space methods, B x C x H x W), not to normalised maps."""

    def __init__(self, baseline: Substrate = 0.0, output: OutputSpec = None) -> None:
        self.baseline = baseline
        self.output = output

    def __call__(self, model: nn.Module, images: torch.Tensor, attributions: torch.Tensor,
                 targets: TargetLike = None) -> CompletenessResult:
        model = check_model(model)
        x = check_images(images)
        if not isinstance(attributions, torch.Tensor) or attributions.shape[0] != x.shape[0]:
            raise LumosError("attributions must be a tensor with one entry per image (B x C x H x W).")
        with scoring(model):
            classes = resolve_classes(model, x, targets, self.output)
            base = _substrate(self.baseline, x)
            idx = classes[:, None]
            gap = (select_output(model(x), self.output).gather(1, idx)
                   - select_output(model(base), self.output).gather(1, idx)).squeeze(1).double()
        total = attributions.detach().flatten(1).double().sum(1).to(gap.device)
        delta = (total - gap).abs()
        return CompletenessResult(total, gap, delta, delta / gap.abs().clamp_min(1e-12))
