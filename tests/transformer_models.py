"""Real transformer and modern-CNN architectures with random weights (no downloads), small inputs/configs.

Shared by the transformer tests: ``build(name)`` returns ``Arch`` -- the model in eval mode, an input size and
what lumos should infer for it (a token layer with its layout, the automatic layer). Heads that the libraries
initialise to zero (torchvision's ViT) get small random weights, so gradients are not all zero. torchvision's
constructors take no depth, so their models keep fewer blocks of their longest stage (same classes, faster).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")


@dataclass(frozen=True)
class Arch:
    """A model plus what lumos should find in it.

    ``layer``: a token/channels-last layer to explain explicitly and ``layout`` its inferred description
    (``tokens P+hxw``, ``NHWC hxw``); ``auto``: the layer ``layer="auto"`` picks; ``cam_at_auto``: whether
    that layer feeds a global-average-pool + linear head (so CAM applies there)."""

    name: str
    model: nn.Module
    size: tuple[int, int]
    layer: str
    layout: str
    auto: str
    cam_at_auto: bool = False


def _tv_vit() -> nn.Module:
    from torchvision.models import vit_b_16

    model = vit_b_16(image_size=64)
    model.encoder.layers = model.encoder.layers[:3]  # 3 of the 12 encoder blocks: the same classes, 4x faster
    return model


def _tv_swin() -> nn.Module:
    from torchvision.models import swin_t

    model = swin_t()
    model.features[5] = model.features[5][:2]  # 2 of the third stage's 6 blocks
    return model


def _tv_convnext() -> nn.Module:
    from torchvision.models import convnext_tiny

    model = convnext_tiny()
    model.features[5] = model.features[5][:2]  # 2 of the third stage's 9 blocks
    return model


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=5)
    return ViTForImageClassification(cfg)


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 2], num_heads=[1, 2, 4],
                     window_size=4, num_labels=5)
    return SwinForImageClassification(cfg)


# name: (constructor, input size, explicit layer, its layout, auto layer, CAM applies at auto)
SPECS: dict[str, tuple] = {
    "tv_vit_b_16": (_tv_vit, (64, 64), "encoder.layers.encoder_layer_1", "tokens 1+4x4",
                    "encoder.layers.encoder_layer_2.ln_1", False),
    "tv_swin_t": (_tv_swin, (64, 64), "features.5", "NHWC 4x4", "norm", True),
    "tv_convnext_tiny": (_tv_convnext, (64, 64), "features.5.0.block.2", "NHWC 4x4", "features", False),
    "timm_deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=64, depth=4), (64, 64), "blocks.2",
                            "tokens 2+4x4", "blocks.3.norm1", False),
    "timm_vit_registers": (_timm("vit_small_patch14_reg4_dinov2", img_size=56, depth=2, embed_dim=64, num_heads=2),
                           (56, 56), "blocks.0", "tokens 5+4x4", "blocks.1.norm1", False),
    "timm_swin_tiny": (_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4), (64, 64), "layers.2",
                       "NHWC 4x4", "norm", True),
    "hf_vit": (_hf_vit, (32, 32), "vit.layers.0", "tokens 1+4x4", "vit.layers.1.layernorm_before", False),
    "hf_swin": (_hf_swin, (64, 64), "swin.encoder.layers.1", "tokens 4x4", "swin.layernorm", True),
}
NAMES = list(SPECS)


def randomise_zero_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give all-zero weight matrices (zero-initialised heads) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@cache
def build(name: str) -> Arch:
    """The architecture ``name`` (built once per process, seed 0, eval mode)."""
    make, size, layer, layout, auto, cam = SPECS[name]
    torch.manual_seed(0)
    model = randomise_zero_weights(make()).eval()
    return Arch(name, model, size, layer, layout, auto, cam)


def images(arch: Arch, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *arch.size, generator=torch.Generator().manual_seed(seed))
