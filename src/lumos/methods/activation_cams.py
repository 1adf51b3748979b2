"""Layer maps that need no gradient: CAM (from the linear head) and Eigen-CAM."""

from __future__ import annotations

import torch
from torch import nn

from lumos.errors import LumosError
from lumos.methods.base import LayerMethod, register


class HeadError(LumosError):
    """The model's head does not have the global-average-pool + linear form that CAM needs."""


@register
class CAM(LayerMethod):
    """CAM (Zhou et al. 2016) for models ending in global average pooling + one linear layer.

    The map for class c is sum_k w[c, k] A_k with ``w`` the head's weights. The head is found and
    checked on the first call: the logits must equal ``linear(mean_hw(A))``.
    """

    name = "cam"
    needs_grad = False

    def __init__(self, *args, head: nn.Linear | str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = head
        self._weight: torch.Tensor | None = None

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
        pooled = acts.float().mean((2, 3))
        for fc in fitting:
            with torch.no_grad():
                bias = None if fc.bias is None else fc.bias.float()
                predicted = nn.functional.linear(pooled, fc.weight.float(), bias)
            if torch.allclose(predicted, out.float(), rtol=1e-3, atol=1e-3 * out.abs().max().item() + 1e-5):
                return fc.weight.detach()
        raise HeadError(
            f"CAM needs the output of '{layer}' to go straight through global average pooling and a linear "
            "layer, and this model does more in between; use method='gradcam' instead."
        )

    def forward(self, x, layers):
        out, acts = super().forward(x, layers)
        if len(acts) != 1:
            raise HeadError("CAM explains one layer, the one that feeds the pooling + linear head.")
        (name, a), = acts.items()
        self._weight = self._find_head(a, out.detach(), name)
        return out, acts

    def layer_map(self, acts, grads, classes):
        return torch.einsum("bc,bchw->bhw", self._weight[classes].to(acts.dtype), acts)


@register
class EigenCAM(LayerMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations' first principal component (class-agnostic).

    The sign of a principal component is arbitrary; it is fixed so that the map correlates positively
    with the channel-summed activations.
    """

    name = "eigencam"
    needs_grad = False

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
