"""Probe images: layout (channels-first/last), display copies, captions and panels; the Keras adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from lumos.errors import LumosError


def to_nchw(images: Any, batch: int | None = None, what: str = "probes") -> tuple[torch.Tensor, bool]:
    """Probe images as a float (B, C, H, W) tensor, and whether they were given channels-last.

    A 3-D tensor is read as ``batch`` grayscale images (B, H, W) when ``batch`` (the number of labels or masks)
    is its first size, as one image (C, H, W) or (H, W, C) when ``batch`` is 1, and is otherwise refused in
    one line (one image with B channels and B grayscale images look alike).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        if x.shape[0] == 1 or (batch is not None and batch == x.shape[0]):
            x = x[:, None]  # B grayscale images without a channel axis ((1, H, W) is the same either way)
        elif batch == 1:
            x = x[None]  # one image
        else:
            shape = tuple(x.shape)
            raise LumosError(
                f"Probe images of shape {shape} are ambiguous (one image with {shape[0]} channels, or {shape[0]} "
                f"grayscale images?): give a (B, C, H, W) batch: for grayscale images add a channel axis "
                f"({what}.unsqueeze(1)), for one image a batch axis ({what}.unsqueeze(0)).")
    if x.ndim != 4 or x.shape[0] == 0:
        raise LumosError(f"Probe images must be a (B, C, H, W) or (B, H, W, C) batch; got {tuple(x.shape)}.")
    channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    return x.detach().float().contiguous(), channels_last


def display_array(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, 3) float in [0, 1] for drawing (min/max scaled if outside [0, 1])."""
    a = image.detach().float().cpu()
    if a.shape[0] == 1:
        a = a.expand(3, -1, -1)
    a = a[:3]
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - lo) / max(hi - lo, 1e-12)
    return a.permute(1, 2, 0).numpy()


def upscale(image: np.ndarray, size: int | None) -> Image.Image:
    """(H, W, 3) float image -> PIL, the longer side scaled to ``size`` (nearest, so pixels stay crisp)."""
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    if size and max(pil.size) != size:
        scale = size / max(pil.size)
        new = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(new, Image.Resampling.NEAREST)
    return pil


_FONT: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """The image with ``caption`` written in a white strip below it."""
    font = _font()
    draw = ImageDraw.Draw(image)
    lines = [w for part in caption.split("\n") for w in _wrap(draw, part, font, image.width - 4)]
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    out = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 2), "white")
    out.paste(image.convert("RGB"), (0, 0))
    d = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        d.text((2, image.height + 1 + k * line_h), line, fill="black", font=font)
    return out


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels (a word longer than a line stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def hstack(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Images side by side on white, top-aligned."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def is_keras_model(model: object) -> bool:
    """True for a Keras 3 model/layer (any backend)."""
    return any(c.__module__.split(".")[0] == "keras" for c in type(model).__mro__)  # not a user's keras_nets.py


class _Tap(nn.Module):
    """Identity on a channels-first map: the module lumos records for a channels-last Keras layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class KerasAdapter(nn.Module):
    """A Keras 3 model on the torch backend seen as a channels-first ``nn.Module`` lumos can explain.

    Inputs are (B, C, H, W), permuted to (B, H, W, C) for a channels-last model (the layout is the layers'
    ``data_format``, see :func:`lumos.zoo.keras_model.takes_channels_last`). Each requested Keras layer (a
    ``model.summary()`` name; a layer of a nested model as ``outer.inner``) gets a forward hook that routes its
    output through a tap, ``taps.<name>`` with dots as underscores (:meth:`tap_name`); 4-D outputs are presented
    channels-first (B, C, H, W), so every lumos method works unchanged. The Keras model is called with
    ``training=False`` and is not registered as a submodule, so guarding the adapter never touches Keras' own
    state.
    """

    def __init__(self, model: Any, layers: Sequence[str], channels_last: bool | None = None) -> None:
        super().__init__()
        from lumos.zoo.keras_model import takes_channels_last

        object.__setattr__(self, "keras_model", model)
        self.channels_last = takes_channels_last(model) if channels_last is None else channels_last
        self.taps = nn.ModuleDict()
        self._handles: list[Any] = []
        for name in layers:
            layer = keras_layer(model, name)
            tap = _Tap()
            self.taps[_tap_key(name)] = tap
            self._handles.append(layer.register_forward_hook(self._hook(tap)))

    @staticmethod
    def tap_name(name: str) -> str:
        """The module name lumos records for the Keras layer ``name``."""
        return f"taps.{_tap_key(name)}"

    def _hook(self, tap: _Tap):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return output
            if self.channels_last and output.ndim == 4:
                return tap(output.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return tap(output)

        return hook

    def remove(self) -> None:
        """Remove the hooks from the Keras layers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
        return self.keras_model(x, training=False)


def _tap_key(name: str) -> str:
    """The tap's module name: the Keras name as ``lumos layers`` shows it (one rule with KerasModule)."""
    from lumos.zoo.keras_model import module_name

    return module_name(name)


def keras_layer(model: Any, name: str) -> Any:
    """The Keras layer called ``name`` in ``model``; a nested model's layer as ``outer.inner`` (a name with dots,
    such as ``mobilenetv2_1.00_224``, may be written as Keras or as ``lumos layers`` shows it, dots as ``_``)."""
    for layer in getattr(model, "layers", None) or []:
        for own in {layer.name, _tap_key(layer.name)}:
            if name == own:
                return layer
            if name.startswith(own + ".") and hasattr(layer, "layers"):
                try:
                    return keras_layer(layer, name[len(own) + 1:])
                except LumosError:
                    pass
    known = ", ".join(lay.name for lay in getattr(model, "layers", None) or [])
    raise LumosError(f"The Keras model has no layer '{name}' (a nested model's layer is 'outer.inner'). "
                     f"Layers: {known}.")


def keras_auto_layer(model: Any) -> str:
    """The last Keras layer with a 4-D (image-like) output: the usual CAM layer."""
    if not getattr(model, "built", True):
        raise LumosError(f"The Keras model '{model.name}' is not built, so its layers have no output shapes: start it "
                         "with keras.Input((H, W, C)), call it once on a batch, or pass layer='<name>'.")
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4:
            return layer.name
    if not getattr(model, "inputs", None):  # built, but a subclassed keras.Model: its layers have no symbolic outputs
        raise LumosError(f"layer='auto' needs the layers' output shapes, which the subclassed Keras model "
                         f"'{model.name}' does not have; pass layer='<name>' (see model.summary()).")
    raise LumosError("No Keras layer with a 4-D output found; pass layer='<name>' (see model.summary()).")


def channel_tiles(acts: torch.Tensor, channels: torch.Tensor, cell: int = 48, cols: int | None = None,
                  colormap: str = "viridis") -> Image.Image:
    """Grid of chosen channels of a (C, h, w) activation, each min/max scaled; numpy + PIL (fast)."""
    from lumos.render import get_colormap

    chosen = [int(c) for c in channels]
    cols = cols or max(1, int(np.ceil(np.sqrt(len(chosen)))))
    rows = int(np.ceil(len(chosen) / cols))
    gap = 2
    a = acts.detach().float().cpu()[chosen].flatten(1)
    lo, hi = a.min(1, keepdim=True).values, a.max(1, keepdim=True).values
    unit = torch.where(hi > lo, (a - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(a))
    lut = get_colormap(colormap)(np.linspace(0, 1, 256), bytes=True)[:, :3]
    rgb = lut[(unit * 255).round().long().numpy()].reshape(len(chosen), *acts.shape[1:], 3)
    out = Image.new("RGB", (cols * (cell + gap) - gap, rows * (cell + gap) - gap), "white")
    for k in range(len(chosen)):
        tile = Image.fromarray(np.ascontiguousarray(rgb[k])).resize((cell, cell), Image.Resampling.NEAREST)
        out.paste(tile, ((k % cols) * (cell + gap), (k // cols) * (cell + gap)))
    return out
