"""Which layer to explain: a module, a dotted name from ``named_modules()``, or ``"auto"``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lumos.capture import add_forward_hook
from lumos.errors import LumosError, close_matches

log = logging.getLogger(__name__)

LayerSpec = nn.Module | str | Sequence[nn.Module | str]
Layout = Callable[[torch.Tensor], torch.Tensor]


class LayerError(LumosError):
    """A layer that does not exist or does not give a map."""


class AutoLayer(str):
    """A layer name chosen by ``layer="auto"``: passing it on keeps the choice marked as automatic
    without tracing the model again."""


@dataclass(frozen=True)
class Site:
    """A recorded layer: its name, its module and its layout, a function from the layer's output to a
    B x C x h x w map applied to activations and gradients alike (None: the output already is one)."""

    name: str
    module: nn.Module
    layout: Layout | None = None

    @property
    def auto(self) -> bool:
        return isinstance(self.name, AutoLayer)

    def to_map(self, t: torch.Tensor) -> torch.Tensor:
        """The layer output (or its gradient) as B x C x h x w; anything else is a one-line error."""
        shape = tuple(t.shape)
        if self.layout is not None:
            t = self.layout(t)
        if t.ndim != 4:
            raise LayerError(
                f"Layer '{self.name}' outputs shape {shape}, not a B x C x h x w map; choose a convolutional "
                "layer (see `lumos layers`) or give a layout that turns it into one."
            )
        return t


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a dry forward: its name, type, output shape and how often it ran."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int


def trace_layers(model: nn.Module, x: torch.Tensor) -> list[LayerInfo]:
    """Run one no-grad forward of ``x`` and list every sub-module in the order it finished.

    The caller is responsible for model state (see ``capture.model_guard``).
    """
    names = {m: n for n, m in model.named_modules() if n}
    order: dict[str, LayerInfo] = {}

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        name = names[module]
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        calls = order.pop(name).calls + 1 if name in order else 1
        order[name] = LayerInfo(name, type(module).__name__, shape, calls)

    handles = []
    try:
        for m, n in names.items():
            handles.append(add_forward_hook(m, hook, n))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return list(order.values())


def auto_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module (in forward order) that outputs a spatial 4-D map (H, W > 1) once."""
    candidates = [
        info
        for info in trace_layers(model, x[:1])
        if info.calls == 1 and info.shape is not None and len(info.shape) == 4 and min(info.shape[2:]) > 1
    ]
    if not candidates:
        raise LayerError(
            "Found no layer with a spatial 4-D output (B x C x H x W, H and W > 1); pass layer= explicitly."
        )
    return candidates[-1].name


def resolve_layers(model: nn.Module, layer: LayerSpec, x: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """Map a layer spec (module, dotted name, ``"auto"``, or a list of them) to ``{name: module}``.

    Names chosen by ``"auto"`` are :class:`AutoLayer` strings."""
    specs = [layer] if isinstance(layer, nn.Module | str) else list(layer)
    if not specs:
        raise LayerError("layer= is an empty list; give at least one layer or 'auto'.")
    modules = dict(model.named_modules())
    by_module = {m: n for n, m in modules.items()}
    out: dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            if spec not in by_module:
                raise LayerError(f"The given {type(spec).__name__} module is not part of this model.")
            name = by_module[spec] or type(spec).__name__
            out[name] = spec
        elif isinstance(spec, AutoLayer) and spec in modules:
            out[spec] = modules[spec]
        elif spec == "auto":
            if x is None:
                raise LayerError("layer='auto' needs an input to trace the model.")
            name = AutoLayer(auto_layer(model, x))
            log.info("lumos: layer='auto' chose '%s'", name)
            out[name] = modules[name]
        elif spec in modules and spec:
            out[str(spec)] = modules[spec]
        else:
            hint = close_matches(str(spec), [n for n in modules if n])
            raise LayerError(f"No layer named '{spec}' in this model.{hint}")
    return out


def resolve_sites(
    model: nn.Module, layer: LayerSpec, x: torch.Tensor | None = None, layout: Layout | None = None
) -> list[Site]:
    """The layers of a spec as :class:`Site` objects, each with ``layout`` (None: conv maps)."""
    return [Site(name, module, layout) for name, module in resolve_layers(model, layer, x).items()]


def is_auto(layer: LayerSpec) -> bool:
    """Whether a layer spec asks for (or carries) the automatic choice."""
    return isinstance(layer, AutoLayer) or (isinstance(layer, str) and layer == "auto")
