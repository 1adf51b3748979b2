"""Layouts: how a layer's output becomes a B x C x h x w map, inferred from one dry forward.

A layout is any function from a layer's output (and its gradient) to B x C x h x w. Three kinds are inferred:

- **channels-first** ``B x C x h x w`` (CNNs): no layout;
- **channels-last** ``B x h x w x C`` (Swin stages, the inside of ConvNeXt blocks): :class:`ChannelsLast`;
- **tokens** ``B x N x D`` (ViT, DeiT, HF ViT; also Swin's flattened ``B x hw x C``): :class:`Tokens`, which drops
  the prefix tokens (class, distillation, registers: they come first) and folds the rest into the grid.

Which axis holds the channels is read off the modules around the tensor in a traced forward, never guessed
from sizes: a convolution, batch/group norm or 2-D pooling that produces or consumes it says channels-first;
a ``Linear`` or ``nn.LayerNorm`` acting on its last axis says channels-last (permutes and shape-preserving
modules such as dropout or activations are followed through). Producer and consumer must agree. The token
grid is the latest known spatial map before the layer (the patch embedding's output for a ViT, the previous
stage for Swin) with ``N - h*w`` prefix tokens (``0 <= prefix < h*w``); it follows the input size through the
stride ``input / grid``. A tensor whose channel axis cannot be told is a one-line error asking for ``layout=``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lumos.capture import add_forward_hook
from lumos.errors import LumosError

Layout = Callable[[torch.Tensor], torch.Tensor]
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)
_POOLS_2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_DEPTH = 64  # how far producer/consumer chains are followed


class LayoutError(LumosError):
    """A layer whose output cannot be turned into a B x C x h x w map without help (``layout=``)."""


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module returns: itself, or the first element of a tuple (Hugging Face layers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def model_output(output: object) -> object:
    """A Hugging Face ``ModelOutput`` (or anything with a tensor ``logits``) as its logits; else unchanged."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and not isinstance(output, torch.Tensor) else output


def main_output(output: object) -> torch.Tensor | None:
    """The tensor a model's output leads with: itself, a Hugging Face output's logits, the first of a tuple,
    the first value of a dict (torchvision segmentation's ``"out"`` beside ``"aux"``); None if there is none."""
    output = model_output(output)
    if isinstance(output, dict):
        output = next(iter(output.values()), None)
    return first_tensor(output)


# -- the layouts ---------------------------------------------------------------------------------------------
def channels_last(t: torch.Tensor) -> torch.Tensor:
    """B x h x w x C -> B x C x h x w."""
    return t.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ChannelsLast:
    """B x h x w x C -> B x C x h x w (Swin stages, ConvNeXt block insides)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 4:
            raise LayoutError(f"A channels-last layout needs a 4-D B x h x w x C tensor, got shape {tuple(t.shape)}.")
        return channels_last(t)

    def describe(self, shape: tuple[int, ...]) -> str:
        return f"NHWC {shape[1]}x{shape[2]}"


@dataclass(frozen=True)
class Tokens:
    """B x N x D tokens (``channels_first``: B x D x N) -> B x D x h x w: the first ``prefix`` tokens dropped,
    the rest read row by row into an h x w grid.

    The grid follows the input: bound to an input size by :meth:`for_input` (the engine does it per forward),
    it is the (h, w) with ``h*w = N - prefix`` among ``floor``/``ceil`` of ``input / stride``; at the traced
    size it is the traced grid itself.
    """

    prefix: int
    grid: tuple[int, int]
    size: tuple[int, int]
    stride: tuple[float, float] = (1.0, 1.0)
    channels_first: bool = False
    batch: int | None = None
    traced_size: tuple[int, int] | None = None

    def for_input(self, shape: tuple[int, ...]) -> Tokens:
        """The layout for inputs of ``shape`` (B, C, H, W)."""
        return replace(self, size=(int(shape[-2]), int(shape[-1])), batch=int(shape[0]))

    def grid_for(self, n_tokens: int) -> tuple[int, int]:
        n = n_tokens - self.prefix
        if self.size == (self.traced_size or self.size) and self.grid[0] * self.grid[1] == n:
            return self.grid
        found = {(h, w) for h in _near(self.size[0] / self.stride[0]) for w in _near(self.size[1] / self.stride[1])
                 if h * w == n}
        if len(found) != 1:
            raise LayoutError(
                f"Cannot fold {n_tokens} tokens ({self.prefix} prefix) into a grid for a {self.size[0]}x{self.size[1]} "
                "input; pass layout= (a function to B x C x h x w)."
            )
        return found.pop()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3:
            raise LayoutError(f"A token layout needs a 3-D B x N x D tensor, got shape {tuple(t.shape)}.")
        if self.batch is not None and t.shape[0] != self.batch:
            raise LayoutError(
                f"The layer outputs {t.shape[0]} rows for {self.batch} images (windows or a reshaped batch); "
                "pass layout= or choose the enclosing block."
            )
        if self.channels_first:
            t = t.transpose(1, 2)
        h, w = self.grid_for(t.shape[1])
        return t[:, self.prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def describe(self, shape: tuple[int, ...]) -> str:
        pre = f"{self.prefix}+" if self.prefix else ""
        return f"tokens {pre}{self.grid[0]}x{self.grid[1]}"


def _near(v: float) -> set[int]:
    return {max(1, math.floor(v + 1e-6)), max(1, math.ceil(v - 1e-6))}


def describe(layout: object, shape: tuple[int, ...] | None) -> str:
    """A short text for ``lumos layers``: ``NCHW``, ``NHWC 7x7``, ``tokens 1+14x14``, ``custom``."""
    if layout is None:
        return "NCHW" if shape is not None and len(shape) == 4 else ""
    return layout.describe(shape) if hasattr(layout, "describe") else "custom"


# -- the traced forward --------------------------------------------------------------------------------------
@dataclass
class _Call:
    name: str
    module: nn.Module
    leaf: bool
    inputs: list[torch.Tensor]
    output: torch.Tensor | None
    order: int


@dataclass(frozen=True)
class LayerLayout:
    """One module as seen in a dry forward: output shape, how often it ran, its channel axis and its layout.

    ``status``: ``"map"`` (B x C x h x w as is), ``"layout"`` (``layout`` turns it into one), ``"ambiguous"``
    (``reason`` says why), ``"none"`` (no spatial map: 2-D, 5-D, not a tensor)."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    status: str
    layout: Layout | None = None
    reason: str = ""
    leaf: bool = False
    norm: bool = False

    @property
    def grid(self) -> tuple[int, int] | None:
        if self.status == "map" and self.shape is not None:
            return self.shape[2], self.shape[3]
        if isinstance(self.layout, Tokens):
            return self.layout.grid
        if isinstance(self.layout, ChannelsLast) and self.shape is not None:
            return self.shape[1], self.shape[2]
        return None


@dataclass
class Trace:
    """Every module's :class:`LayerLayout` for one input shape, in the order the modules finished."""

    layers: dict[str, LayerLayout] = field(default_factory=dict)
    channels_last_seen: bool = False
    auto: str | None = None  # the automatic layer, once chosen (see ``lumos.layers.auto_layer``)
    output_shape: tuple[int, ...] | None = None  # the model's main output (see :func:`main_output`)


_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Trace]] = weakref.WeakKeyDictionary()


def trace(model: nn.Module, x: torch.Tensor) -> Trace:
    """One no-grad forward of ``x[:1]`` with every module hooked; the result is cached per model and input
    shape (layouts depend on structure and shapes, not on weights). Call inside ``capture.model_guard``."""
    key = (tuple(x.shape[1:]), x.dtype, sum(1 for _ in model.modules()))
    cached = _TRACES.get(model, {}).get(key)
    if cached is not None:
        return cached
    result = _trace(model, x[:1])
    _TRACES.setdefault(model, {})[key] = result
    return result


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    values = [*args, *kwargs.values()]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _trace(model: nn.Module, x: torch.Tensor) -> Trace:
    names = {m: n for n, m in model.named_modules() if n}
    calls: list[_Call] = []
    counts: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        name = names[module]
        counts[name] = counts.get(name, 0) + 1
        leaf = next(module.children(), None) is None
        calls.append(_Call(name, module, leaf, _tensors(args, kwargs), first_tensor(output), len(calls)))

    handles = []
    try:
        for m, n in names.items():
            add_forward_hook(m, lambda *a: None, n).remove()  # TorchScript cannot be hooked: the usual one-line error
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        with torch.no_grad():
            out = main_output(model(x))
    finally:
        for h in handles:
            h.remove()
    result = _analyse(calls, counts, (int(x.shape[-2]), int(x.shape[-1])))
    result.output_shape = None if out is None else tuple(out.shape)
    return result


class _Graph:
    """Who produced and who consumed each tensor (leaf modules only), by identity."""

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.producers: dict[int, list[_Call]] = {}
        self.consumers: dict[int, list[_Call]] = {}
        for c in calls:
            if not c.leaf:
                continue
            if c.output is not None:
                self.producers.setdefault(id(c.output), []).append(c)
            for t in c.inputs:
                self.consumers.setdefault(id(t), []).append(c)

    def producer_axis(self, t: torch.Tensor, depth: int = 0) -> int | None:
        made = self.producers.get(id(t), [])
        for c in made:
            axis = _leaf_axis(c.module, t, output=True)
            if axis is not None:
                return axis
        if not made or depth > _DEPTH or not made[0].inputs:
            return None
        first, src = made[0], made[0].inputs[0]
        if src is t:
            return None
        dims = _permute_dims(first.module, t.ndim)
        if dims is not None:
            axis = self.producer_axis(src, depth + 1)
            return None if axis is None else dims.index(axis)
        if src.shape == t.shape and _passes_through(first.module):
            return self.producer_axis(src, depth + 1)
        return None

    def consumer_axis(self, t: torch.Tensor, depth: int = 0) -> int | None:
        for c in self.consumers.get(id(t), []):
            axis = _leaf_axis(c.module, t, output=False)
            if axis is not None:
                return axis
            out = c.output
            if out is None or out is t or depth > _DEPTH or not c.inputs or c.inputs[0] is not t:
                continue
            dims = _permute_dims(c.module, t.ndim)
            if dims is not None:
                axis = self.consumer_axis(out, depth + 1)
                if axis is not None:
                    return dims[axis]
            elif out.shape == t.shape and _passes_through(c.module):
                axis = self.consumer_axis(out, depth + 1)
                if axis is not None:
                    return axis
        return None

    def axis(self, t: torch.Tensor) -> int | str | None:
        """The channel axis of ``t`` (non-negative), ``"conflict"`` or None (unknown)."""
        p, c = self.producer_axis(t), self.consumer_axis(t)
        p = None if p is None else p % t.ndim
        c = None if c is None else c % t.ndim
        if p is not None and c is not None and p != c:
            return "conflict"
        return p if p is not None else c


def _leaf_axis(m: nn.Module, t: torch.Tensor, output: bool) -> int | None:
    """The channel axis module ``m`` implies for ``t``, its output (``output``) or an input; None: no say."""
    if t.ndim < 2:
        return None
    if isinstance(m, _CHANNELS_FIRST):
        n = _channel_count(m, output)
        return 1 if n is None or t.shape[1] == n else None
    if isinstance(m, _POOLS_2D):
        return 1 if t.ndim == 4 else None
    if isinstance(m, nn.Linear):
        n = m.out_features if output else m.in_features
        return t.ndim - 1 if t.shape[-1] == n else None
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        n = m.normalized_shape[0]
        if type(m) is nn.LayerNorm or type(m).forward is nn.LayerNorm.forward:
            return t.ndim - 1 if t.shape[-1] == n else None
        last, second = t.shape[-1] == n, t.shape[1] == n  # a subclass (e.g. timm's LayerNorm2d) may permute
        return t.ndim - 1 if last and not second else 1 if second and not last else None
    return None


def _channel_count(m: nn.Module, output: bool) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels if output else m.in_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    return None


def _permute_dims(m: nn.Module, ndim: int) -> list[int] | None:
    dims = getattr(m, "dims", None)
    if "permute" in type(m).__name__.lower() and isinstance(dims, list | tuple) and sorted(dims) == list(range(ndim)):
        return [int(d) for d in dims]
    return None


def _passes_through(m: nn.Module) -> bool:
    """A shape-preserving module that does not move axes (dropout, activations, identity, drop-path, scales)."""
    return not any(p.ndim > 1 for p in m.parameters(recurse=False))


def _analyse(calls: list[_Call], counts: dict[str, int], size: tuple[int, int]) -> Trace:
    graph = _Graph(calls)
    firsts: dict[str, _Call] = {}
    for c in calls:
        firsts.setdefault(c.name, c)
    axes: dict[str, int | str | None] = {}
    known: dict[int, int | str | None] = {}  # tensor id -> channel axis, for blocks that keep their input's
    for name, c in firsts.items():
        t = c.output
        axis = graph.axis(t) if t is not None and t.ndim in (3, 4) else None
        if axis is None and t is not None:  # the same tensor an inner module returned (Sequential, stage)
            axis = known.get(id(t))
        if axis is None and t is not None and not c.leaf and c.inputs and c.inputs[0].shape == t.shape:
            src = c.inputs[0]  # a block mapping B x N x D to B x N x D (a residual block) keeps its input's layout
            axis = known[id(src)] if id(src) in known else graph.axis(src)
        axes[name] = axis
        if t is not None and axis is not None:
            known.setdefault(id(t), axis)
    # channels on the last axis anywhere (tokens, NHWC): then a 4-D output nothing explains is not taken as NCHW
    channels_last_seen = any(c.output is not None and axes[n] == c.output.ndim - 1 for n, c in firsts.items())
    result = Trace(channels_last_seen=channels_last_seen)
    grids: list[tuple[int, int]] = []  # spatial maps with a known channel axis, in the order they finished
    finished: set[str] = set()
    for c in calls:
        if c.name in finished:
            continue
        finished.add(c.name)
        info = _layer_layout(c, counts[c.name], axes[c.name], grids, size, channels_last_seen)
        result.layers[c.name] = info
        t = c.output
        if t is not None and t.ndim == 4 and info.status in ("map", "layout") and axes[c.name] in (1, 3):
            grids.append((t.shape[2], t.shape[3]) if axes[c.name] == 1 else (t.shape[1], t.shape[2]))
    return result


def _layer_layout(c: _Call, calls: int, axis: int | str | None, grids: list[tuple[int, int]],
                  size: tuple[int, int], channels_last_seen: bool) -> LayerLayout:
    t = c.output
    base = dict(name=c.name, type=type(c.module).__name__, shape=None if t is None else tuple(t.shape), calls=calls,
                leaf=c.leaf, norm=isinstance(c.module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm))
    if t is None or t.ndim not in (3, 4):
        return LayerLayout(**base, status="none")
    if axis == "conflict":
        return LayerLayout(**base, status="ambiguous", reason="the modules around it disagree on its channel axis")
    if t.ndim == 4:
        if axis == 3:
            return LayerLayout(**base, status="layout", layout=ChannelsLast())
        if axis == 1 or (axis is None and not channels_last_seen):
            return LayerLayout(**base, status="map")
        why = ("its channel axis cannot be told (channels-first or -last)" if axis is None
               else f"its channels are on axis {axis}")
        return LayerLayout(**base, status="ambiguous", reason=why)
    if axis not in (1, 2):
        why = "its channel axis cannot be told (B x N x D or B x D x N)"
        return LayerLayout(**base, status="ambiguous", reason=why)
    if t.shape[0] != 1:  # traced with one image: more rows are windows or a reshaped batch, not images
        return LayerLayout(**base, status="ambiguous", reason=f"it outputs {t.shape[0]} rows per image (windows?)")
    n = t.shape[2] if axis == 1 else t.shape[1]
    for h, w in reversed(grids):
        prefix = n - h * w
        if h * w > 1 and 0 <= prefix < h * w:
            layout = Tokens(prefix, (h, w), size, stride=(size[0] / h, size[1] / w), channels_first=axis == 1,
                            traced_size=size)
            return LayerLayout(**base, status="layout", layout=layout)
    merged = _merged_grid(n, grids)
    if merged is not None:  # a hierarchical transformer (HF Swin) merges 2x2 patches per stage, in row order
        h, w = merged
        layout = Tokens(0, (h, w), size, stride=(size[0] / h, size[1] / w), channels_first=axis == 1,
                        traced_size=size)
        return LayerLayout(**base, status="layout", layout=layout)
    return LayerLayout(**base, status="ambiguous",
                       reason=f"its {n} tokens fit no spatial grid seen before it in the forward")


def _merged_grid(n: int, grids: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The grid of ``n`` tokens when it is the latest seen grid halved 1-5 times on both sides (patch merging:
    HF Swin keeps its stages as B x N x D tokens, so no map of the smaller grid is seen), else None."""
    if not grids:
        return None
    h, w = grids[-1]
    for _ in range(5):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == n and h * w > 1:
            return h, w
    return None
