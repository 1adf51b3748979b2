"""A tiny fully convolutional segmentation net for the synthetic scenes, and its weights.

Classes: 0 background, ``c + 1`` for shape class ``c`` (disc, square, triangle, plus).
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

from lumos.synthetic.detector import trunk

WEIGHTS_FILE = "tinysegmenter.pt"


class TinySegmenter(nn.Module):
    """Stride-4 trunk + 1x1 classifier, bilinear upsampling: (B, 3, H, W) -> (B, 1 + C, H, W) logits.

    ``features.block5`` (the natural CAM layer) gives a 16x16 map at 64x64 input.
    """

    def __init__(self, num_classes: int = 5, width: int = 32) -> None:
        super().__init__()
        self.features = trunk(width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def load_tinysegmenter() -> TinySegmenter:
    """The TinySegmenter trained on :func:`lumos.synthetic.scenes.make_scenes` (seed 0), in eval mode."""
    ref = resources.files("lumos.synthetic").joinpath(WEIGHTS_FILE)
    with resources.as_file(ref) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = TinySegmenter(num_classes=state["classifier.weight"].shape[0], width=state["classifier.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval()
