"""A tiny CAM-compatible CNN for the synthetic data set, and its bundled weights."""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources

import torch
from torch import nn

WEIGHTS_FILE = "tinycnn.pt"


def _block(cin: int, cout: int, *, bn: bool = True, pool: bool = False) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=nn.Conv2d(cin, cout, 3, padding=1, bias=not bn))
    if bn:
        layers["bn"] = nn.BatchNorm2d(cout)
    layers["relu"] = nn.ReLU(inplace=True)
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


class TinyCNN(nn.Module):
    """Four 3x3 conv blocks, global average pooling and a linear classifier.

    At a 64x64 input the last block (``features.block4``, the natural CAM layer) yields a
    64-channel 16x16 map.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(3, 16, pool=True),
                block2=_block(16, 32, pool=True),
                block3=_block(32, 64),
                block4=_block(64, 64),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, H, W)`` in ``[0, 1]``."""
        return self.fc(self.flatten(self.pool(self.features(x))))


def load_tinycnn(weights_file: str = WEIGHTS_FILE) -> TinyCNN:
    """The TinyCNN trained on :func:`lumos.synthetic.make_dataset` (seed 0), in eval mode; ``weights_file``:
    another TinyCNN weight file shipped in ``lumos.synthetic``."""
    ref = resources.files("lumos.synthetic").joinpath(weights_file)
    with resources.as_file(ref) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyCNN(num_classes=state["fc.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()
