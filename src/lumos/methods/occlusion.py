"""Occlusion (Zeiler & Fergus 2014): how much the score drops when a window of the input is covered."""

from __future__ import annotations

import math
from typing import Any

import torch

from lumos.engine import Forward, score_inputs
from lumos.errors import LumosError, positive_int
from lumos.methods.base import RegionMethod, register


def _pair(name: str, value: Any) -> tuple[int, int]:
    items = list(value) if isinstance(value, list | tuple) else [value, value]
    if len(items) != 2:
        raise LumosError(f"{name} must be one integer or two (height, width), got {value!r}.")
    return positive_int(name, items[0]), positive_int(name, items[1])


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one axis: every ``stride`` until the window reaches the end
    (the last may stick out and is cut at the border, as in Captum)."""
    return [k * stride for k in range(math.ceil((size - window) / stride) + 1)]


@register
class Occlusion(RegionMethod):
    """Occlusion (Zeiler & Fergus 2014), the sliding-window form of Captum's ``Occlusion``.

    Each window of ``window`` pixels (all channels), moved by ``stride``, is replaced by ``baseline``; a
    pixel's attribution is the mean drop of the explained score (the logit, as in Captum; the callable's
    value for callable targets) over the windows that cover it. Occluded inputs run in batches of
    ``batch_size``; memory does not grow with the number of windows.

    Args:
        window: window size in pixels, one int or (height, width) (default 16).
        stride: step between windows, one int or (height, width) (default 8; at most the window).
        baseline: the value (or a (C, H, W) tensor) that replaces a covered window (default 0).
        batch_size: occluded inputs per forward (default 32).
    """

    name = "occlusion"

    def __init__(self, *args: Any, window: int | tuple[int, int] = 16, stride: int | tuple[int, int] = 8,
                 baseline: float | torch.Tensor = 0.0, batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = _pair("window", window)
        self.stride = _pair("stride", stride)
        if any(s > w for s, w in zip(self.stride, self.window, strict=True)):
            raise LumosError(f"stride {self.stride} must not exceed the window {self.window}: pixels would be "
                             "skipped.")
        number = isinstance(baseline, int | float) and not isinstance(baseline, bool)
        if not (number or isinstance(baseline, torch.Tensor)):
            raise LumosError(f"baseline must be a number or a tensor, got {baseline!r}.")
        self.baseline = baseline
        self.batch_size = positive_int("batch_size", batch_size)

    def params(self) -> dict[str, Any]:
        base = self.baseline if not isinstance(self.baseline, torch.Tensor) else "tensor"
        return super().params() | {"window": self.window, "stride": self.stride, "baseline": base,
                                   "batch_size": self.batch_size}

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        x = fw.x
        b, c, h, w = x.shape
        (wh, ww), (sh, sw) = self.window, self.stride
        if wh > h or ww > w:
            raise LumosError(f"The occlusion window {self.window} is larger than the input {h}x{w}.")
        fill = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        fill = fill.expand(c, h, w) if fill.ndim else fill
        boxes = [(y, xx) for y in window_starts(h, wh, sh) for xx in window_starts(w, ww, sw)]
        clean = fw.target.scores(fw.output.detach()).float()  # (B, K): the unoccluded score
        n = len(boxes)

        def occluded(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(start, stop)
            image, box = rows // n, rows % n
            inputs = x[image].clone()
            for r, k in enumerate(box.tolist()):
                i, j = boxes[k]
                patch = (slice(None), slice(i, i + wh), slice(j, j + ww))
                inputs[r][patch] = fill[patch] if fill.ndim else fill
            return inputs, image

        scores = score_inputs(self.model, occluded, b * n, fw.target, output=self.output,
                              batch_size=self.batch_size, use_probs=False).view(b, n, -1)
        drop = clean[:, None, :] - scores  # (B, n, K)
        total = torch.zeros(b, drop.shape[2], h, w, dtype=torch.float32, device=x.device)
        count = torch.zeros(h, w, dtype=torch.float32, device=x.device)
        for k, (i, j) in enumerate(boxes):
            total[:, :, i:i + wh, j:j + ww] += drop[:, k, :, None, None]
            count[i:i + wh, j:j + ww] += 1
        return [(total / count.clamp_min(1)).flatten(0, 1)]
