"""A tiny one-stage detector for the synthetic scenes (dense YOLO/CenterNet-style head), and its weights.

Every cell of a stride-4 grid predicts C class probabilities (sigmoid: "an object of this class is
centred in this cell") and a box (centre offset within the cell, log width and height). The output is
already the dense format of :mod:`lumos.tasks`: (B, cells, 4 + C), boxes ``(x0, y0, x1, y1)`` in input
pixels -- no adapter needed.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources

import torch
from torch import nn

WEIGHTS_FILE = "tinydetector.pt"
STRIDE = 4


def conv_block(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv (padding keeps the size at stride 1), BatchNorm, ReLU."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        bn=nn.BatchNorm2d(cout),
        relu=nn.ReLU(inplace=True),
    ))


def trunk(width: int = 32) -> nn.Sequential:
    """The stride-4 feature extractor both synthetic task models share (``block5`` is the CAM layer)."""
    return nn.Sequential(OrderedDict(
        block1=conv_block(3, 16, stride=2),
        block2=conv_block(16, width, stride=2),
        block3=conv_block(width, width),
        block4=conv_block(width, width, dilation=2),
        block5=conv_block(width, width, dilation=4),
    ))


class TinyDetector(nn.Module):
    """Stride-4 trunk + 1x1 head: (B, 3, H, W) in [0, 1] -> (B, H/4 * W/4, 4 + C) detections.

    ``features.block5`` (the natural CAM layer) gives a 16x16 map at 64x64 input.
    """

    def __init__(self, num_classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = trunk(width)
        self.head = nn.Conv2d(width, 4 + num_classes, 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw (B, 4 + C, h, w) output (box terms, class logits): what training fits."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.raw(x)
        b, _, h, w = raw.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        cx = (xs + 0.5 + raw[:, 0].tanh()) * STRIDE
        cy = (ys + 0.5 + raw[:, 1].tanh()) * STRIDE
        bw, bh = raw[:, 2].clamp(-4, 4).exp() * 4 * STRIDE, raw[:, 3].clamp(-4, 4).exp() * 4 * STRIDE
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        out = torch.cat([boxes, raw[:, 4:].sigmoid()], 1)  # (B, 4 + C, h, w)
        return out.flatten(2).transpose(1, 2)


def load_tinydetector() -> TinyDetector:
    """The TinyDetector trained on :func:`lumos.synthetic.scenes.make_scenes` (seed 0), in eval mode."""
    ref = resources.files("lumos.synthetic").joinpath(WEIGHTS_FILE)
    with resources.as_file(ref) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyDetector(num_classes=state["head.weight"].shape[0] - 4, width=state["head.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval()
