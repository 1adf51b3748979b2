"""Gradient-weighted CAMs: each is a few lines on how channels are weighed or combined."""

from __future__ import annotations

import torch

from lumos.methods.base import LayerMethod, register, spatial_mean, spatial_sum


def gradcam_weights(grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's channel weights (N, C): the spatial mean of the gradient."""
    return spatial_mean(grads)


@register
class GradCAM(LayerMethod):
    """Grad-CAM (Selvaraju et al. 2017): channel weight = spatial mean of the gradient."""

    name = "gradcam"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return gradcam_weights(grads)


@register
class GradCAMPlusPlus(LayerMethod):
    """Grad-CAM++ (Chattopadhay et al. 2018), the general closed form.

    Assumes the explained score is ``exp(logit)``, so its higher derivatives are powers of the first
    one: alpha = g^2 / (2 g^2 + sum_ab(A) g^3), weight = sum_ab(alpha * relu(g)).
    """

    name = "gradcam++"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        denom = 2 * g2 + spatial_sum(acts)[..., None, None] * grads.pow(3)
        alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        return spatial_sum(alpha * grads.relu())


@register
class XGradCAM(LayerMethod):
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the normalised activations."""

    name = "xgradcam"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        total = spatial_sum(acts)[..., None, None]
        return spatial_sum(grads * acts / (total + 1e-7))


@register
class LayerCAM(LayerMethod):
    """LayerCAM (Jiang et al. 2021): element-wise positive gradient times activation, summed."""

    name = "layercam"

    def layer_map(self, acts, grads, classes):
        return (grads.relu() * acts).sum(1)


@register
class HiResCAM(LayerMethod):
    """HiResCAM (Draelos & Carin 2020): element-wise gradient times activation, summed over channels."""

    name = "hirescam"

    def layer_map(self, acts, grads, classes):
        return (grads * acts).sum(1)
