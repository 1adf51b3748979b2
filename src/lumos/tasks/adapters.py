"""Adapters: any detector as a module taking (B, 3, H, W) and returning dense (B, N, 4 + C) detections.

- :class:`TorchvisionDetector` wraps torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD, Mask
  R-CNN): lists of images in, lists of ``{"boxes", "scores", "labels"}`` out, resized internally. Its
  output row is a box followed by C class columns holding the detection's score in its label's column.
- :class:`DenseDetector` wraps models with raw dense YOLO-style outputs, (B, N, 4 + C) or with an
  objectness column (B, N, 5 + C), boxes ``xyxy`` or ``cxcywh``.
- Any other format: a module whose forward returns ``dense_from_dicts(...)`` or a (B, N, 4 + C) tensor
  (boxes in input pixels) works with :class:`lumos.tasks.DetectionTarget`.

torchvision is never imported here: the wrapped detector is built by the caller (``lumos[detection]``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lumos.errors import LumosError
from lumos.layers import LayerError


def dense_from_dicts(detections: Sequence[Mapping[str, torch.Tensor]], num_classes: int) -> torch.Tensor:
    """(B, N, 4 + C) from per-image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}``; rows padded with 0.

    The score goes in the label's column (on the autograd graph of ``scores``), the other columns are 0.
    """
    n = max([1, *(len(d["scores"]) for d in detections)])
    rows = []
    for d in detections:
        boxes, scores, labels = d["boxes"], d["scores"], d["labels"].long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise LumosError(f"The detector returned label {int(labels.max())} but num_classes is {num_classes}.")
        cls = torch.zeros(len(scores), num_classes, dtype=scores.dtype, device=scores.device)
        cls = cls.scatter(1, labels[:, None], scores[:, None])
        row = torch.cat([boxes.to(scores.dtype), cls], 1)
        rows.append(nn.functional.pad(row, (0, 0, 0, n - len(scores))))
    return torch.stack(rows)


def torchvision_num_classes(detector: nn.Module) -> int:
    """The number of classes a torchvision detector scores (label indices 0..C-1, background included)."""
    roi = getattr(detector, "roi_heads", None)
    if roi is not None and hasattr(roi, "box_predictor"):
        return int(roi.box_predictor.cls_score.out_features)
    head = getattr(getattr(detector, "head", None), "classification_head", None)
    for attr in ("num_classes", "num_columns"):
        if head is not None and hasattr(head, attr):
            return int(getattr(head, attr))
    raise LumosError("Cannot tell how many classes this detector scores; pass num_classes=.")


class RowSparseLinear(torch.autograd.Function):
    """``F.linear`` whose backward only multiplies the rows with a non-zero output gradient (exact).

    A two-stage detector's box head runs every proposal (1000 by default) through large linear layers; one
    box's score depends on one proposal, so each per-box gradient pass would otherwise cost a full box head."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        rows = grad.any(1).nonzero()[:, 0]
        g = grad[rows]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad.new_zeros(x.shape).index_copy_(0, rows, (g @ weight).to(grad.dtype))
        if ctx.needs_input_grad[1]:
            gw = g.t() @ x[rows]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


class RowSparseRoIAlign(torch.autograd.Function):
    """torchvision's ``roi_align`` whose backward only runs the regions with a non-zero gradient (exact).

    Its CPU backward visits every region (1000 proposals) whatever its gradient: ~3.5x its forward per pass.
    """

    @staticmethod
    def forward(ctx, op, x: torch.Tensor, rois: torch.Tensor, *params: object) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.params = op, params
        ctx.save_for_backward(x, rois)
        return op(x, rois, *params)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, rois = ctx.saved_tensors
        rows = grad.flatten(1).any(1).nonzero()[:, 0]
        if rows.numel() == 0:
            gx = torch.zeros_like(x)
        else:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                (gx,) = torch.autograd.grad(ctx.op(leaf, rois[rows], *ctx.params), leaf, grad[rows])
        return (None, gx, None, *(None for _ in ctx.params))


class WindowConv2d(torch.autograd.Function):
    """A stride-1, ungrouped ``conv2d`` whose backward only runs over the window where the output gradient is
    non-zero (exact; the whole map when the window covers most of it). One box's score reaches a detection
    head's last convolution at a few cells; a dense backward would convolve the whole (mostly zero) map."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.save_for_backward(x, weight)
        return nn.functional.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[-2:]
        live = grad.detach().abs().amax((0, 1))
        rows, cols = live.any(1).nonzero()[:, 0], live.any(0).nonzero()[:, 0]
        if rows.numel() == 0:  # a zero gradient (the box is gone), not a missing one: zeros reach the input
            need = ctx.needs_input_grad
            return (torch.zeros_like(x) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                    grad.new_zeros(grad.shape[1]) if ctx.has_bias and need[2] else None, None)
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if (y1 - y0) * (x1 - x0) > 0.5 * live.numel():  # most of the map: the dense backward is as cheap
            y0, y1, x0, x1 = 0, grad.shape[-2], 0, grad.shape[-1]
        g = grad[:, :, y0:y1, x0:x1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # output rows y0:y1 read input rows y0 - ph ... y1 - ph + kh - 2
            part = nn.functional.conv_transpose2d(g, weight)
            gx = torch.zeros_like(x)
            top, left = y0 - ph, x0 - pw
            iy0, ix0 = max(top, 0), max(left, 0)
            iy1, ix1 = min(top + part.shape[-2], x.shape[-2]), min(left + part.shape[-1], x.shape[-1])
            gx[:, :, iy0:iy1, ix0:ix1] = part[:, :, iy0 - top:iy1 - top, ix0 - left:ix1 - left]
        if ctx.needs_input_grad[1]:
            xp = nn.functional.pad(x, (pw, pw, ph, ph))[:, :, y0:y1 + kh - 1, x0:x1 + kw - 1]
            gw = torch.nn.grad.conv2d_weight(xp, weight.shape, g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None


def _window_conv_args(args: tuple, kwargs: dict) -> tuple | None:
    """(x, weight, bias, (ph, pw)) of a ``conv2d`` call :class:`WindowConv2d` can take, else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = dict(zip(names, args, strict=False)) | kwargs
    x, weight = call.get("input"), call.get("weight")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return None

    def pair(v: object) -> tuple:
        """int, (v,) or (a, b) as a pair; anything else as it is (then not a pair: dense backward)."""
        v = (v,) if isinstance(v, int) else tuple(v)  # type: ignore[arg-type]
        return v * 2 if len(v) == 1 else v

    padding = call.get("padding", 0)
    if isinstance(padding, str) or pair(call.get("stride", 1)) != (1, 1) or pair(call.get("dilation", 1)) != (1, 1) \
            or call.get("groups", 1) != 1 or len(pair(padding)) != 2:
        return None
    return x, weight, call.get("bias"), pair(padding)


class SparseCat(torch.autograd.Function):
    """``torch.cat`` whose backward gives no gradient (instead of zeros) to the pieces whose gradient is all zero
    (exact). A one-stage detector concatenates its heads' outputs over pyramid levels; one box's score comes
    from one level, and without this every level's head would be back-propagated with zeros for every box.
    When the whole gradient is zero (the explained box is not detected: its score is a constant 0) the pieces
    get zeros, so that the input's gradient is zero rather than missing (missing reads as a cut graph)."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]
        return torch.cat(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pieces = grad.split(ctx.sizes, ctx.dim)
        if not bool(grad.any()):
            return (None, *(g if need else None for g, need in zip(pieces, ctx.needs_input_grad[1:], strict=True)))
        return (None, *(g if need and bool(g.any()) else None
                        for g, need in zip(pieces, ctx.needs_input_grad[1:], strict=True)))


class SparseMultiScaleRoIAlign(torch.autograd.Function):
    """torchvision's multi-level RoI pooling (``MultiScaleRoIAlign``: each region pooled from its pyramid level
    into one (N, C, h, w) tensor) with a backward that only pools the regions with a non-zero gradient (exact).

    torchvision assembles the levels with ``result[idx] = ...``; back-propagating that copies and scans the
    whole (1000, 256, 7, 7) gradient several times per explained box."""

    @staticmethod
    def forward(ctx, pool: Callable[..., torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,  # type: ignore[override]
                scales: Sequence[float], *features: torch.Tensor) -> torch.Tensor:
        ctx.pool, ctx.scales = pool, scales
        ctx.save_for_backward(rois, levels, *features)
        parts = [pool(f, rois[levels == k], s) for k, (f, s) in enumerate(zip(features, scales, strict=True))]
        out = parts[0].new_empty((len(rois), *parts[0].shape[1:]))
        for k, part in enumerate(parts):
            out[levels == k] = part.to(out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rois, levels, *features = ctx.saved_tensors
        rows = grad.flatten(1).any(1).nonzero()[:, 0]
        grads: list[torch.Tensor | None] = []
        for k, (f, s) in enumerate(zip(features, ctx.scales, strict=True)):
            mine = rows[levels[rows] == k]
            if not ctx.needs_input_grad[4 + k]:
                grads.append(None)
            elif mine.numel() == 0:
                grads.append(torch.zeros_like(f))
            else:
                with torch.enable_grad():
                    leaf = f.detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(ctx.pool(leaf, rois[mine], s), leaf, grad[mine].to(f.dtype))
                grads.append(g)
        return (None, None, None, None, *grads)


def _sparse_pooler_forward(pooler: nn.Module) -> Callable[..., torch.Tensor]:
    """A forward for torchvision's ``MultiScaleRoIAlign`` ``pooler`` through :class:`SparseMultiScaleRoIAlign`
    (same values), using the helpers of the pooler's own module (torchvision is not imported here)."""
    tv = sys.modules[type(pooler).__module__]

    def pool(feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        return tv.roi_align(feature, rois, output_size=pooler.output_size, spatial_scale=scale,
                            sampling_ratio=pooler.sampling_ratio)

    def forward(x: Mapping[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = [v for k, v in x.items() if k in pooler.featmap_names]
        if pooler.scales is None or pooler.map_levels is None:
            pooler.scales, pooler.map_levels = tv._setup_scales(feats, image_shapes, pooler.canonical_scale,
                                                                pooler.canonical_level)
        rois = tv._convert_to_roi_format(boxes)
        levels = pooler.map_levels(boxes) if len(feats) > 1 else rois.new_zeros(len(rois), dtype=torch.long)
        return SparseMultiScaleRoIAlign.apply(pool, rois, levels, list(pooler.scales), *feats)

    return forward


def _poolers(detector: nn.Module) -> list[nn.Module]:
    return [m for m in detector.modules() if type(m).__name__ == "MultiScaleRoIAlign"
            and type(m).__module__.startswith("torchvision.") and hasattr(m, "featmap_names")]


@contextmanager
def sparse_backward(detector: nn.Module) -> Iterator[None]:
    """Within it, ``detector``'s box head (linear layers, RoI pooling) back-propagates only the proposals an
    explained score depends on: :class:`SparseRowBackward` plus torchvision's multi-level RoI pooler
    temporarily swapped for :class:`SparseMultiScaleRoIAlign`. Values are unchanged."""
    poolers = [m for m in _poolers(detector) if "forward" not in vars(m)]
    try:
        for m in poolers:
            m.forward = _sparse_pooler_forward(m)
        with SparseRowBackward():
            yield
    finally:
        for m in poolers:
            vars(m).pop("forward", None)


class SparseRowBackward(TorchFunctionMode):
    """Within it, calls that record autograd take a backward that skips what no explained score depends on,
    with the same forward: 2-D ``F.linear`` (:class:`RowSparseLinear`) and torchvision ``roi_align``
    (:class:`RowSparseRoIAlign`) skip the proposals, ``torch.cat`` (:class:`SparseCat`) the pieces, stride-1
    ``conv2d`` (:class:`WindowConv2d`) the cells outside the gradient's window."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func is nn.functional.linear and not kwargs.keys() - {"bias"}:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.ndim == 2 and (x.requires_grad or weight.requires_grad):
                return RowSparseLinear.apply(x, weight, bias)
        elif func is torch.conv2d:
            conv = _window_conv_args(args, kwargs)
            if conv is not None and (conv[0].requires_grad or conv[1].requires_grad):
                return WindowConv2d.apply(*conv)
        elif func is torch.cat and not kwargs.keys() - {"dim"} and len(args) + len(kwargs) <= 2:
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int) and len(tensors) > 1 and any(t.requires_grad for t in tensors):
                return SparseCat.apply(dim, *tensors)
        elif getattr(func, "__name__", "") == "roi_align" and "torchvision" in str(func) and not kwargs:
            if args[0].requires_grad and not args[1].requires_grad:
                return RowSparseRoIAlign.apply(func, *args)
        return func(*args, **kwargs)


class TorchvisionDetector(nn.Module):
    """A torchvision detector as ``(B, 3, H, W) in [0, 1] -> (B, N, 4 + C)`` (see :func:`dense_from_dicts`).

    Boxes are in the input's pixels (torchvision maps them back from its internal resize). Layers keep the
    detector's names under ``detector.``, e.g. ``detector.backbone.body.16``; ``layer="auto"`` is a backbone
    map every box reaches (:meth:`lumos_auto_layer`). Random-weight detectors score
    low: build them with ``box_score_thresh=0`` (``score_thresh=0`` for RetinaNet/FCOS) to get boxes.
    """

    def __init__(self, detector: nn.Module, num_classes: int | None = None, sparse_backward: bool = True) -> None:
        super().__init__()
        self.detector = detector
        self.num_classes = num_classes if num_classes is not None else torchvision_num_classes(detector)
        self.sparse_backward = sparse_backward

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The detector's own output (a list of dicts) for a (B, 3, H, W) batch.

        With ``sparse_backward`` (default) the box head's linear layers and RoI pooling back-propagate only
        the proposals that reach an explained score (:func:`sparse_backward`): same values, K box gradients
        for about the price of one forward instead of K."""
        if not self.sparse_backward:  # (grad mode may switch on inside: lumos records from the target layer)
            return self.detector(list(x))
        with sparse_backward(self.detector):
            return self.detector(list(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_from_dicts(self.detect(x), self.num_classes)

    def lumos_auto_layer(self, x: torch.Tensor, names: Sequence[str]) -> str:
        """The layer ``layer="auto"`` explains, among ``names`` (maps with one map per image, forward order):
        the last backbone map that every feature level the heads read depends on -- for FPN detectors the
        last backbone stage (or its FPN projection), which every pyramid level is computed from, so every
        box's score reaches it whatever level the box is pooled or predicted from. A later map (one pyramid
        level) gives boxes of the other levels an empty map; the box head's RoI maps are per proposal."""
        prefix = "detector.backbone."
        candidates = [n for n in names if n.startswith(prefix)]
        backbone = getattr(self.detector, "backbone", None)
        transform = getattr(self.detector, "transform", None)
        if not candidates or backbone is None or transform is None:
            raise LayerError("Found no backbone feature map of this detector to explain with layer='auto'; "
                             "pass layer= (a backbone layer, see `lumos layers` or docs/detection.md).")
        modules = dict(self.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: tuple, output: object) -> None:
                if isinstance(output, torch.Tensor):
                    seen.setdefault(name, output)
            return hook

        handles = [modules[n].register_forward_hook(record(n)) for n in candidates]
        try:
            with torch.enable_grad():
                images, _ = transform(list(x.detach().clone().requires_grad_(True)))
                features = backbone(images.tensors)
        finally:
            for h in handles:
                h.remove()
        levels = list(features.values()) if isinstance(features, Mapping) else [features]
        reach = [_graph_nodes(t) for t in levels if isinstance(t, torch.Tensor)]
        for name in reversed(candidates):
            fn = seen[name].grad_fn if name in seen else None
            if fn is not None and reach and all(fn in nodes for nodes in reach):
                return name
        raise LayerError("Found no backbone feature map every feature level of this detector depends on; pass "
                         "layer= (a backbone layer, see `lumos layers` or docs/detection.md).")


def _graph_nodes(t: torch.Tensor) -> set[object]:
    """Every autograd node ``t`` was computed through."""
    nodes: set[object] = set()
    todo = [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in nodes:
            nodes.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return nodes


class DenseDetector(nn.Module):
    """A raw dense (YOLO-style) detector as ``(B, 3, H, W) -> (B, N, 4 + C)``, boxes ``xyxy`` in pixels.

    Args:
        model: returns (B, N, 4 + C) -- or (B, 4 + C, N) with ``channels_first`` -- per anchor/cell.
        box_format: ``"xyxy"`` or ``"cxcywh"`` of the model's boxes.
        objectness: the model has an objectness column after the box (YOLOv5 style): class scores are
            multiplied by it.
        activation: applied to the class (and objectness) columns: ``"none"`` (already probabilities),
            ``"sigmoid"`` or ``"softmax"``.
        scale: multiply boxes by this (e.g. the input size, for boxes normalised to [0, 1]).
    """

    def __init__(self, model: nn.Module, box_format: str = "xyxy", objectness: bool = False,
                 activation: str = "none", channels_first: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        if box_format not in ("xyxy", "cxcywh"):
            raise LumosError(f"box_format={box_format!r}: use 'xyxy' or 'cxcywh'.")
        if activation not in ("none", "sigmoid", "softmax"):
            raise LumosError(f"activation={activation!r}: use 'none', 'sigmoid' or 'softmax'.")
        self.model, self.box_format, self.objectness = model, box_format, objectness
        self.activation, self.channels_first, self.scale = activation, channels_first, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise LumosError(f"DenseDetector needs a (B, N, 4 + C) tensor from the model; got {got}.")
        if self.channels_first:
            out = out.transpose(1, 2)
        boxes, rest = out[..., :4] * self.scale, out[..., 4:]
        if self.box_format == "cxcywh":
            boxes = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
        obj, cls = (rest[..., :1], rest[..., 1:]) if self.objectness else (None, rest)
        if self.activation == "sigmoid":
            cls = cls.sigmoid()
            obj = None if obj is None else obj.sigmoid()
        elif self.activation == "softmax":
            cls = cls.softmax(-1)
            obj = None if obj is None else obj.sigmoid()
        if obj is not None:
            cls = cls * obj
        return torch.cat([boxes, cls], -1)
