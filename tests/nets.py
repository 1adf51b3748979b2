"""Small models built for the tests: each exercises one thing the engine must survive."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GapNet(nn.Module):
    """conv-ReLU(inplace)-conv-ReLU(inplace) -> GAP -> linear: the form CAM needs."""

    def __init__(self, classes: int = 5, inplace: bool = True, bn: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8) if bn else nn.Identity(),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.ReLU(inplace=inplace),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


class FunctionalNet(nn.Module):
    """The same computation written with functional F.relu calls (no ReLU modules)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class ReusedReLUNet(nn.Module):
    """One ReLU module called three times per forward (a ResNet-style habit)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x) + x)
        x = self.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class TupleNet(nn.Module):
    """Returns (logits, features) or a dict of them."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = GapNet()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        logits = self.body(x)
        return {"logits": logits, "aux": logits * 2} if self.as_dict else (logits, logits * 2)


class TwiceNet(nn.Module):
    """The same conv module applied twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.shared(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Load src's parameters into dst by order (architectures with the same parameter list)."""
    with torch.no_grad():
        for p, q in zip(src.parameters(), dst.parameters(), strict=True):
            q.copy_(p)
    return dst


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class OneConvNet(nn.Module):
    """conv-ReLU ``features`` -> spatial mean -> linear: the smallest CAM-shaped net, for any input channels and
    outputs (1 channel: grayscale probes; 1 output: a binary head)."""

    def __init__(self, in_channels: int = 3, outputs: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))
