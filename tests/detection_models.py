"""Shared by the detection tests: torchvision detectors with random weights made usable."""

from __future__ import annotations

import torch
from torch import nn

from lumos.tasks import TorchvisionDetector


def calibrated(detector: nn.Module, size: int) -> TorchvisionDetector:
    """Random-init BatchNorm keeps unit running stats, so activations vanish with depth (1e-8 at the FPN):
    set the stats from a few random ``size`` x ``size`` images, as training would, so that boxes and gradients
    mean something. Returns the wrapped detector in eval mode."""
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    wrapped = TorchvisionDetector(detector).eval()
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        wrapped(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return wrapped.eval()
