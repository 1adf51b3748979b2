"""Turn images into normalised model input, and back for display.

:class:`Preprocess` resizes the *whole* image to the model's input size (no centre crop, so the
aspect ratio may change). Every pixel of the model input therefore corresponds to a known region of
the original image, and a map computed at model resolution maps back onto the whole original image
by a plain resize to the original (height, width). This is what overlays and evaluation rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.errors import LumosError

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD", "TFLITE_MEAN", "TFLITE_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF-Lite convention (x * 255 - 127) / 128 written as (x - mean) / std on x in [0, 1].
TFLITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TFLITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Preprocess:
    """Resize whole images to ``size`` and normalise with ``mean``/``std`` (per channel, on [0, 1]).

    ``size`` is an int (square) or ``(height, width)``; ``resize`` is a PIL resampling name
    (``"bilinear"``, ``"bicubic"``, ``"nearest"``, ``"lanczos"``, ``"box"``, ``"hamming"``).
    Calling it on a PIL image, a list of PIL images, or an H x W x 3 (or H x W) uint8 array returns a
    float32 tensor B x 3 x H x W.
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise LumosError(f"Input size must be a positive int or (height, width), got {self.size!r}.")
        object.__setattr__(self, "size", size)
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) == 1:
            mean = mean * 3
        if len(std) == 1:
            std = std * 3
        if len(mean) != 3 or len(std) != 3:
            raise LumosError(f"mean and std need 1 or 3 values each, got {self.mean!r} and {self.std!r}.")
        if min(std) <= 0:
            raise LumosError(f"std values must be positive, got {self.std!r}.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.resize not in _RESAMPLE:
            raise LumosError(
                f"Unknown resize mode {self.resize!r}; use one of: {', '.join(_RESAMPLE)}."
            )

    @property
    def hw(self) -> tuple[int, int]:
        """Model input (height, width)."""
        return self.size  # type: ignore[return-value]

    def to_pil(self, image: Any) -> Image.Image:
        """Convert a PIL image or uint8 array (H x W, H x W x 3, H x W x 4) to an RGB PIL image."""
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, np.ndarray):
            arr = image
            if arr.dtype != np.uint8:
                if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0 and arr.max() <= 1:
                    arr = np.round(arr * 255).astype(np.uint8)
                else:
                    raise LumosError(
                        f"Arrays must be uint8 (or float in [0, 1]), got dtype {arr.dtype}."
                    )
            if arr.ndim == 2:
                return Image.fromarray(arr, "L").convert("RGB")
            if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
                if arr.shape[2] == 1:
                    return Image.fromarray(arr[:, :, 0], "L").convert("RGB")
                if arr.shape[2] == 4:
                    return Image.fromarray(arr, "RGBA").convert("RGB")
                return Image.fromarray(arr, "RGB")
            raise LumosError(f"Arrays must be H x W or H x W x 3, got shape {tuple(arr.shape)}.")
        raise LumosError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")

    def one(self, image: ImageLike) -> torch.Tensor:
        """Preprocess a single image to a 3 x H x W tensor."""
        h, w = self.hw
        pil = self.to_pil(image)
        if pil.size != (w, h):
            pil = pil.resize((w, h), _RESAMPLE[self.resize])
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Preprocess one image or a list of images to a float32 tensor B x 3 x H x W."""
        if isinstance(images, (Image.Image, np.ndarray)):
            items: Sequence[ImageLike] = [images]
        else:
            items = list(images)
        if not items:
            raise LumosError("No images to preprocess.")
        return torch.stack([self.one(im) for im in items])

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: (B x) 3 x H x W model input -> values in [0, 1] for display."""
        shape = (3, 1, 1) if tensor.dim() == 3 else (1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(shape)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(shape)
        return (tensor * std + mean).clamp(0.0, 1.0)
