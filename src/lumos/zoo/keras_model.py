"""Saved Keras 3 models (``.keras``) as channels-first torch modules that lumos explains like any other.

Keras runs on its torch backend, so a Keras model *is* torch code and gradients flow through it. The
wrapper :class:`KerasModule` takes B x C x H x W input (what lumos feeds), permutes it to the model's
channels-last layout and calls the model with ``training=False``. Every Keras layer gets a child module
named exactly as Keras names it (nested models give dotted names, ``"block.conv"``); a forward hook on the
Keras layer routes its output through that child, with 4-D outputs presented as B x C x h x w. So
``named_modules()``, ``layer="auto"``, ``lumos layers`` and every method see Keras names and
channels-first maps, and the layer's own parameters (the Keras variables, same tensors) are the child's.
Children of 4-D layers carry ``lumos_layout`` (identity: their output is B x C x h x w already), so no layout
is inferred for them.

Input range: a model whose first layer is a ``Rescaling`` that scales by 1/100 or less (``Rescaling(1/255)``,
``Rescaling(1/127.5, offset=-1)``), or a ``Normalization`` adapted to 0-255 images (mean or std above 2), expects
pixel values 0-255 and gets them; any other model gets 0-1. Layers that keep the range (``Reshape``, ``Resizing``,
...) and random augmentation may come first.
``mean``/``std`` given to :func:`lumos.load_model` override this (on the usual 0-1 scale).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lumos.errors import LumosError, ModelLoadError

__all__ = ["KerasModule", "import_keras", "load_keras", "module_name", "takes_channels_last"]

log = logging.getLogger(__name__)


def import_keras() -> Any:
    """Import Keras on the torch backend (setting ``KERAS_BACKEND=torch`` if Keras is not imported yet).

    One-line :class:`LumosError` if Keras is missing, if ``KERAS_BACKEND`` names another backend, or if
    Keras was already imported with another backend.
    """
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND", "").strip()
        if wanted and wanted != "torch":
            raise LumosError(
                f"KERAS_BACKEND is '{wanted}', but lumos runs Keras models on the torch backend: "
                "set KERAS_BACKEND=torch (or unset it)."
            )
        os.environ["KERAS_BACKEND"] = "torch"
    try:  # by name, like every optional package: the core's import contract sees no keras dependency
        keras = importlib.import_module("keras")
    except ImportError:
        raise LumosError("keras is not installed; install it with: pip install 'lumos[keras]'") from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise LumosError(
            f"keras was already imported with the '{backend}' backend; lumos runs Keras models on the torch "
            "backend: set KERAS_BACKEND=torch before keras is first imported."
        )
    return keras


class _LayerTap(nn.Module):
    """Identity stand-in for one Keras layer: the module lumos records. Holds the layer's variables."""

    keras_class = "Layer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _DenseTap(nn.Linear):
    """Identity stand-in for a Keras ``Dense`` on B x D input, seen as the ``nn.Linear`` it is: ``weight`` is
    the Keras kernel transposed (a view, same storage), so CAM finds the head and model randomisation
    re-initialises the Keras variables."""

    keras_class = "Dense"

    def __init__(self, layer: Any) -> None:
        nn.Module.__init__(self)
        kernel = layer.kernel.value
        self.in_features, self.out_features = int(kernel.shape[0]), int(kernel.shape[1])
        self.register_parameter("kernel", kernel)
        self.register_parameter("bias", layer.bias.value if layer.bias is not None else None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.kernel.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


_TAP_CLASSES: dict[str, type[nn.Module]] = {}


def _tap_for(layer: Any, keras: Any) -> nn.Module:
    """A tap whose class is named after the Keras class (so ``lumos layers`` shows ``Conv2D``)."""
    name = type(layer).__name__
    dense = isinstance(layer, keras.layers.Dense) and _rank(layer, "input") == 2 \
        and isinstance(getattr(layer.kernel, "value", None), nn.Parameter)
    base = _DenseTap if dense else _LayerTap
    key = f"{name}/{base.__name__}"
    if key not in _TAP_CLASSES:
        _TAP_CLASSES[key] = type(name, (base,), {"keras_class": name, "__module__": __name__})
    return _TAP_CLASSES[key](layer) if dense else _TAP_CLASSES[key]()


def _as_is(t: torch.Tensor) -> torch.Tensor:
    """The layout of a tap of a 4-D Keras layer: its output is B x C x h x w already."""
    return t


def _rank(layer: Any, which: str = "output") -> int | None:
    """Rank of a Keras layer's symbolic input or output; None if it has none or several."""
    try:
        return len(getattr(layer, which).shape)
    except (AttributeError, ValueError, TypeError):  # a layer used several times or never called symbolically
        return None


def takes_channels_last(model: Any) -> bool:
    """Whether a Keras model takes channels-last images: the ``data_format`` of its first layer that has one
    (``Conv2D``, pooling, ``Flatten``, ...; nested models searched in order), else the input shape's guess
    (channels-first when axis 1 holds 1 or 3 and the last axis does not)."""
    def first_format(m: Any) -> str | None:
        for layer in getattr(m, "layers", None) or []:
            fmt = first_format(layer) if hasattr(layer, "layers") else getattr(layer, "data_format", None)
            if fmt in ("channels_first", "channels_last"):
                return fmt
        return None

    fmt = first_format(model)
    if fmt is not None:
        return fmt == "channels_last"
    inputs = getattr(model, "inputs", None) or []
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    return not (len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3))


def module_name(name: str) -> str:
    """A Keras layer name as a torch module name (``lumos layers`` shows it so): dots, which torch forbids in a
    module name (``mobilenetv2_1.00_224``), as ``_``."""
    return name.replace(".", "_") or "layer"


class KerasModule(nn.Module):
    """A Keras 3 model (torch backend) as a channels-first ``nn.Module`` whose sub-modules carry Keras names.

    ``forward(x)`` takes B x C x H x W and returns ``keras_model(x_nhwc, training=False)``. Build it with
    :func:`load_keras` (from a file) or directly from a model object.
    """

    def __init__(self, keras_model: Any) -> None:
        super().__init__()
        keras = import_keras()
        if not isinstance(keras_model, keras.Model):
            raise LumosError(f"Expected a Keras model, got {type(keras_model).__name__}.")
        inputs = getattr(keras_model, "inputs", None) or []
        if not inputs and not getattr(keras_model, "built", True):
            raise LumosError(
                f"The Keras model '{keras_model.name}' is not built, so its input is unknown: start it with "
                "keras.Input((H, W, C)) or call it once on a batch of images."
            )
        subclassed = not inputs  # built, but no symbolic input: a subclassed keras.Model (input shape unknown)
        if not subclassed and (len(inputs) != 1 or len(inputs[0].shape) not in (3, 4)):
            shapes = ", ".join(str(tuple(i.shape)) for i in inputs)
            raise LumosError(
                f"lumos explains Keras models with one image input (B x H x W x C, or B x H x W grayscale); this "
                f"one has inputs {shapes}."
            )
        shape = (None,) * 4 if subclassed else tuple(inputs[0].shape)
        self.gray_hw = len(shape) == 3  # Input((H, W)): grayscale images without a channel axis
        if self.gray_hw:
            self.channels_last = True
            shape = (*shape, 1)
        else:
            self.channels_last = takes_channels_last(keras_model)
        h, w = (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])
        channels = shape[3] if self.channels_last else shape[1]
        self.input_size: tuple[int, int] | None = (int(h), int(w)) if h and w else None
        self.channels: int | None = int(channels) if channels else None
        self.pixel_range = _pixel_range(keras_model, keras)
        object.__setattr__(self, "keras_model", keras_model)  # not a submodule: guards never touch Keras state
        self._handles: list[Any] = []
        self._add_taps(self, keras_model, keras, "")

    def _add_taps(self, owner: nn.Module, model: Any, keras: Any, prefix: str) -> None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            name = module_name(layer.name)
            if name in owner._modules or hasattr(owner, name):
                raise LumosError(f"The Keras layer name '{prefix}{layer.name}' clashes with another name; rename it.")
            tap = _tap_for(layer, keras)
            if _rank(layer) == 4:  # the tap already presents B x C x h x w: say so (no inference)
                tap.lumos_layout = _as_is
            owner.add_module(name, tap)
            self._handles.append(layer.register_forward_hook(self._route(tap)))
            if isinstance(layer, keras.Model):
                self._add_taps(tap, layer, keras, f"{prefix}{name}.")
            elif not isinstance(tap, _DenseTap):
                for var in layer.weights:
                    value = getattr(var, "value", None)
                    path = str(getattr(var, "path", var.name)).removeprefix(f"{layer.name}/")
                    pname = re.sub(r"\W", "_", path)  # "kernel", or "inner_kernel" inside a composite layer
                    if isinstance(value, nn.Parameter) and pname not in tap._parameters:
                        tap.register_parameter(pname, value)

    def _route(self, tap: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return output  # a layer with several outputs is not recorded (it is not listed either)
            if self.channels_last and output.ndim == 4:
                return tap(output.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return tap(output)

        return hook

    def forward(self, x: torch.Tensor) -> Any:
        """Scores of B x C x H x W images: the Keras model on the channels-last copy, ``training=False``.

        A grayscale model (one channel, or an ``Input((H, W))``) given B x 3 x H x W gets its luma
        (0.299 R + 0.587 G + 0.114 B, PIL's ``convert("L")``); other channel counts than the model's are refused.
        """
        if x.ndim == 4 and self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1 and x.shape[1] == 3:
                luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
                x = (x * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise LumosError(
                    f"The Keras model '{self.keras_model.name}' takes {self.channels}-channel images; got "
                    f"{x.shape[1]} channels (input of shape {tuple(x.shape)}, B x C x H x W)."
                )
        if self.gray_hw and x.ndim == 4:
            return self.keras_model(x[:, 0], training=False)
        if self.channels_last and x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
        return self.keras_model(x, training=False)

    def remove_hooks(self) -> None:
        """Detach the wrapper from the Keras layers (the Keras model runs as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> KerasModule:
        """A wrapper around a clone of the Keras model (same weights, own variables): for model randomisation."""
        keras = import_keras()
        clone = keras.models.clone_model(self.keras_model)
        clone.set_weights([copy.deepcopy(w) for w in self.keras_model.get_weights()])
        other = KerasModule(clone)
        other.train(self.training)
        return other

    def extra_repr(self) -> str:
        return f"keras_model={self.keras_model.name!r}, pixel_range=0-{self.pixel_range:g}"


# Layers that move, crop, pad or resize pixels without changing their range, and random augmentation (``RandomFlip``,
# ``RandomRotation``, ...: off at inference): passed on the way to a model's first Rescaling.
_RANGE_KEEPING = ("InputLayer", "Reshape", "Permute", "Resizing", "CenterCrop", "Cropping2D", "ZeroPadding2D")


def _first_value_layer(model: Any, keras: Any) -> Any:
    """The model's first layer that changes pixel values (nested models entered), or None."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found = _first_value_layer(layer, keras)
            if found is not None:
                return found
        elif not (type(layer).__name__ in _RANGE_KEEPING or type(layer).__name__.startswith("Random")):
            return layer
    return None


def _pixel_range(model: Any, keras: Any) -> float:
    """255 if the model starts with a Rescaling layer that divides by 100 or more, or with a Normalization whose
    mean or standard deviation is above 2 (adapted to 0-255 pixels), else 1 (layers that keep the range, such as
    Reshape, and random augmentation may come before it)."""
    first = _first_value_layer(model, keras)
    if isinstance(first, keras.layers.Rescaling):
        scale = first.scale
        scales = [float(s) for s in (scale if isinstance(scale, list | tuple) else [scale])]
        if scales and max(abs(s) for s in scales) <= 0.01:
            return 255.0
    if isinstance(first, keras.layers.Normalization) and not getattr(first, "invert", False):
        try:
            mean = torch.as_tensor(keras.ops.convert_to_numpy(first.mean)).abs().max().item()
            std = torch.as_tensor(keras.ops.convert_to_numpy(first.variance)).sqrt().max().item()
        except (AttributeError, TypeError, ValueError):  # not built or not adapted: no statistics to read
            return 1.0
        if mean > 2 or std > 2:
            return 255.0
    return 1.0


def load_keras(path: str | os.PathLike[str]) -> KerasModule:
    """Load a saved Keras 3 model (``.keras``, ``safe_mode=True``: no lambda code runs) as a :class:`KerasModule`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Model file not found: {path}.")
    keras = import_keras()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"Cannot load {path} as a Keras 3 model ({first}).") from None
    module = KerasModule(model)
    log.info("lumos: Keras model %s takes pixel values 0-%g", path.name, module.pixel_range)
    return module.eval()
