"""Which layer to explain: a module, a dotted name from ``named_modules()``, or ``"auto"``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from lumos import layouts
from lumos.errors import LumosError, close_matches
from lumos.layouts import ChannelsLast, LayoutError, first_tensor

log = logging.getLogger(__name__)

LayerSpec = nn.Module | str | Sequence[nn.Module | str]
Layout = Callable[[torch.Tensor], torch.Tensor]
LayoutSpec = Layout | str | None


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

    def for_input(self, shape: Sequence[int]) -> Site:
        """This site for inputs of ``shape`` (B, C, H, W): a token layout follows the input's size."""
        bind = getattr(self.layout, "for_input", None)
        return self if bind is None else replace(self, layout=bind(tuple(shape)))

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
    """One module as seen in a dry forward: its name, type, output shape (the first tensor of a tuple), how
    often it ran, and how its output becomes a map (``layout``: ``NCHW``, ``NHWC 7x7``, ``tokens 1+14x14``,
    empty when it does not)."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    layout: str = ""


def trace_layers(model: nn.Module, x: torch.Tensor) -> list[LayerInfo]:
    """Run one no-grad forward of ``x[:1]`` and list every sub-module in the order it finished.

    The forward is cached per model and input shape (see ``lumos.layouts.trace``). The caller is responsible
    for model state (see ``capture.model_guard``).
    """
    return [LayerInfo(i.name, i.type, i.shape, i.calls,
                      layouts.describe(i.layout, i.shape) if i.status in ("map", "layout") else "")
            for i in layouts.trace(model, x[:1]).layers.values()]


def _gives_map(info: layouts.LayerLayout) -> bool:
    grid = info.grid
    # traced with one image: an output with more rows (RoI pooling's one map per proposal) is not a map per image
    return (info.calls == 1 and info.status in ("map", "layout") and grid is not None and min(grid) > 1
            and info.shape is not None and info.shape[0] == 1)


def auto_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The layer ``layer="auto"`` explains.

    CNNs: the last module (in forward order) that outputs a spatial 4-D map (H, W > 1) once, one map per
    image. A model whose output is a dense prediction (a (B, K, H, W) segmentation map, (B, N, D) dense
    detections) rather than one vector per image: the last such map before its prediction head (see
    :func:`_before_head`). Models with token or channels-last layers (transformers): the last block, block
    norm or stage output whose spatial positions receive gradient from the top-scoring output -- not the
    layers after a class token's last attention, whose patch tokens no longer reach the prediction (their
    maps would be zero). A model with a ``lumos_auto_layer(x, names)`` method (``lumos.tasks``' detector
    adapter) chooses among the candidate names itself.
    """
    trace_layers(model, x[:1])
    trace = layouts.trace(model, x[:1])
    if trace.auto is None:
        infos = [i for i in trace.layers.values() if _gives_map(i)]
        own = getattr(model, "lumos_auto_layer", None)
        trace.auto = (own(x[:1], [i.name for i in infos]) if callable(own)
                      else _choose(model, x[:1], infos, trace.output_shape))
    return trace.auto


def _choose(model: nn.Module, x: torch.Tensor, infos: list[layouts.LayerLayout],
            output_shape: tuple[int, ...] | None = None) -> str:
    if not infos:
        raise LayerError(
            "Found no layer with a spatial 4-D output (B x C x H x W, H and W > 1) or token grid; pass layer= "
            "explicitly."
        )
    if not any(i.status == "layout" for i in infos):
        dense = output_shape is not None and len(output_shape) in (3, 4)
        return _before_head(model, x, infos) if dense else infos[-1].name
    candidates = [i for i in infos if not i.leaf or i.norm][::-1]
    reached = _spatial_gradients(model, x[:1], candidates)
    for info in candidates:
        if reached.get(info.name, False):
            return info.name
    raise LayerError(
        "The top output's gradient reaches the spatial positions of no block or norm layer (an untrained head "
        "initialised to zero?); pass layer= explicitly."
    )


def _before_head(model: nn.Module, x: torch.Tensor, infos: list[layouts.LayerLayout]) -> str:
    """For a model whose output is a dense prediction (4-D (B, K, H, W): segmentation; 3-D (B, N, K): dense
    detections), the last of ``infos`` (spatial maps, forward order) before the prediction head: maps the main
    output (see ``layouts.main_output``: ``"out"`` beside ``"aux"``) does not depend on are passed over (an
    auxiliary head), and so are the trailing maps with the output's K channels (the per-pixel classifier and
    what follows it: Grad-CAM there would show the class's own logits). One forward with autograd."""
    with torch.enable_grad(), _recording(model, infos) as seen:
        out = layouts.main_output(model(x.detach().clone().requires_grad_(True)))
    if out is None or out.ndim not in (3, 4) or out.grad_fn is None:
        return infos[-1].name
    reached: set[object] = set()
    todo = [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in reached:
            continue
        reached.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    k = out.shape[1] if out.ndim == 4 else out.shape[2]
    feeding = [i for i in infos if seen.get(i.name) is not None and seen[i.name].grad_fn in reached]
    for info in reversed(feeding):
        if info.shape is not None and info.shape[1] != k:
            return info.name
    return infos[-1].name


@contextmanager
def _recording(model: nn.Module, infos: list[layouts.LayerLayout]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, forwards record the first output tensor of each of ``infos``' modules (first call only)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            seen.setdefault(name, first_tensor(output))

        return hook

    handles = [modules[i.name].register_forward_hook(record(i.name)) for i in infos]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _spatial_gradients(model: nn.Module, x: torch.Tensor, infos: list[layouts.LayerLayout]) -> dict[str, bool]:
    """Per layer: whether the top output's gradient reaches at least half of its spatial positions."""
    with torch.enable_grad():
        with _recording(model, infos) as acts:
            out = first_tensor(layouts.model_output(model(x.detach().clone().requires_grad_(True))))
        if out is None or not out.requires_grad:
            return {}
        score = out.flatten(1)[0].max()
        names = [i.name for i in infos if acts.get(i.name) is not None and acts[i.name].requires_grad]
        grads = torch.autograd.grad(score, [acts[n] for n in names], allow_unused=True)
    by_name = {i.name: i for i in infos}
    reached = {}
    for name, g in zip(names, grads, strict=True):
        if g is None:
            continue
        layout = by_name[name].layout
        g = layout(g) if layout is not None else g
        reached[name] = bool(((g.abs().sum(1) > 0).float().mean() >= 0.5).item())
    return reached


def resolve_layers(model: nn.Module, layer: LayerSpec, x: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """Map a layer spec (module, dotted name, ``"auto"``, or a list of them) to ``{name: module}``.

    Names chosen by ``"auto"`` are :class:`AutoLayer` strings."""
    if isinstance(layer, nn.Module | str):
        specs = [layer]
    elif isinstance(layer, list | tuple):
        specs = list(layer)
    else:
        raise LayerError(f"layer={layer!r} is not a layer: give a dotted name, a module, 'auto', or a list of them.")
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
        elif isinstance(spec, str) and spec in modules and spec:
            out[spec] = modules[spec]
        else:
            hint = close_matches(str(spec), [n for n in modules if n])
            raise LayerError(f"No layer named '{spec}' in this model.{hint}")
    return out


def resolve_sites(
    model: nn.Module, layer: LayerSpec, x: torch.Tensor | None = None, layout: LayoutSpec = None
) -> list[Site]:
    """The layers of a spec as :class:`Site` objects.

    A site's layout is ``layout`` when given (a function to B x C x h x w, or ``"nchw"`` / ``"nhwc"``), else
    the module's own ``lumos_layout`` attribute when it has one (model adapters set it), else inferred from a
    dry forward of ``x`` (see :mod:`lumos.layouts`: token grids, channels-last maps; cached per model and
    input shape). A layer whose layout cannot be inferred is a one-line :class:`LayoutError`."""
    given = parse_layout(layout)
    sites = []
    for name, module in resolve_layers(model, layer, x).items():
        site_layout = given if given is not None else getattr(module, "lumos_layout", None)
        if site_layout is None and x is not None:
            site_layout = infer_layout(model, name, x)
        sites.append(Site(name, module, site_layout))
    return sites


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def parse_layout(layout: LayoutSpec) -> Layout | None:
    """``layout=``: a function, ``"nchw"`` (the output as it is) or ``"nhwc"`` (channels last), or None."""
    if layout is None or callable(layout):
        return layout
    key = str(layout).strip().lower()
    if key in ("nchw", "channels_first"):
        return _as_is
    if key in ("nhwc", "channels_last"):
        return ChannelsLast()
    raise LayoutError(f"layout={layout!r} is not known; give 'nchw', 'nhwc' or a function to B x C x h x w.")


def infer_layout(model: nn.Module, name: str, x: torch.Tensor) -> Layout | None:
    """The inferred layout of layer ``name`` for inputs like ``x`` (None: its output already is a map, or it
    gives none and :meth:`Site.to_map` says so)."""
    info = layouts.trace(model, x[:1]).layers.get(name)
    if info is None or info.calls > 1:
        return None  # did not run, or ran twice: the engine's own one-line errors follow
    if info.status == "ambiguous":
        shape = "x".join(map(str, info.shape or ()))
        raise LayoutError(
            f"Layer '{name}' outputs {shape} and {info.reason}; pass layout= ('nhwc', 'nchw' or a function to "
            "B x C x h x w)."
        )
    return info.layout


def is_auto(layer: LayerSpec) -> bool:
    """Whether a layer spec asks for (or carries) the automatic choice."""
    return isinstance(layer, AutoLayer) or (isinstance(layer, str) and layer == "auto")
