"""Layer maps that need no gradient: CAM (from the linear head) and Eigen-CAM."""

from __future__ import annotations

import torch
from torch import nn

from lumos.engine import Forward
from lumos.errors import LumosError
from lumos.methods.base import ActivationMethod, register, spatial_mean, stack_ranks


class HeadError(LumosError):
    """The model's head does not have the global-average-pool + linear form that CAM needs."""


@register
class CAM(ActivationMethod):
    """CAM (Zhou et al. 2016) for models ending in global average pooling + one linear layer.

    The map for class c is sum_k w[c, k] A_k with ``w`` the head's weights. The head is found and
    checked on the first call: the logits must equal ``linear(mean_hw(A))``.
    """

    name = "cam"

    def __init__(self, *args, head: nn.Linear | str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = head

    def _find_head(self, acts: torch.Tensor, out: torch.Tensor, layer: str) -> torch.Tensor:
        modules = dict(self.model.named_modules())
        if isinstance(self.head, str):
            if not isinstance(modules.get(self.head), nn.Linear):
                raise HeadError(f"head='{self.head}' is not an nn.Linear of this model.")
            candidates = [modules[self.head]]
        elif isinstance(self.head, nn.Linear):
            candidates = [self.head]
        else:
            candidates = [m for m in modules.values() if isinstance(m, nn.Linear)][::-1]
        fitting = [m for m in candidates if m.in_features == acts.shape[1] and m.out_features == out.shape[1]]
        if not fitting:
            raise HeadError(
                f"CAM needs a linear layer from the {acts.shape[1]} channels of '{layer}' to the "
                f"{out.shape[1]} outputs, and this model has none; use method='gradcam' instead."
            )
        pooled = spatial_mean(acts.float())
        for fc in fitting:
            with torch.no_grad():
                bias = None if fc.bias is None else fc.bias.float()
                predicted = nn.functional.linear(pooled, fc.weight.float(), bias)
            # Tolerance follows the precision the model ran in (bfloat16 keeps ~3 significant digits).
            eps = max(torch.finfo(out.dtype).eps, torch.finfo(acts.dtype).eps, 1e-6)
            tol = max(1e-3, 16 * eps)
            if torch.allclose(predicted, out.float(), rtol=tol, atol=tol * out.float().abs().max().item() + 1e-5):
                return fc.weight.detach()
        raise HeadError(
            f"CAM needs the output of '{layer}' to go straight through global average pooling and a linear "
            "layer, and this model does more in between; use method='gradcam' instead."
        )

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        if len(fw.sites) != 1:
            raise HeadError("CAM explains one layer, the one that feeds the pooling + linear head.")
        if fw.targets.classes is None:
            raise HeadError("CAM explains classes of the linear head; a callable target needs method='gradcam'.")
        (acts,) = fw.maps()
        weight = self._find_head(acts, fw.output.detach(), fw.sites[0].name)
        return stack_ranks([[torch.einsum("bc,bchw->bhw", weight[fw.classes(j)].to(acts.dtype), acts)]
                            for j in range(fw.k)])


@register
class EigenCAM(ActivationMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations' first principal component (class-agnostic).

    The sign of a principal component is arbitrary; it is fixed so that the map correlates positively
    with the channel-summed activations.
    """

    name = "eigencam"

    def layer_map(self, acts, grads, classes):
        b, c, h, w = acts.shape
        flat = acts.float().reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
        centered = flat - flat.mean(1, keepdim=True)
        # First principal component through the smaller Gram matrix (eigh is far faster than SVD on CPU).
        if h * w <= c:
            values, vectors = torch.linalg.eigh(centered @ centered.transpose(1, 2))
            proj = vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()  # (B, hw)
        else:
            _, vectors = torch.linalg.eigh(centered.transpose(1, 2) @ centered)
            proj = (centered @ vectors[..., -1:])[..., 0]
        ref = flat.sum(2)
        sign = torch.sign(((proj - proj.mean(1, keepdim=True)) * (ref - ref.mean(1, keepdim=True))).sum(1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (proj * sign[:, None]).reshape(b, h, w)
