"""Shared input checks and helpers for the evaluation metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lumos.capture import model_guard
from lumos.errors import LumosError, check_model  # noqa: F401 (check_model: the evaluators import it here)
from lumos.rules import squash_watch
from lumos.targets import OutputSpec, Target, probability_kind, select_output
from lumos.targets import probabilities as target_probabilities

TargetLike = int | list[int] | torch.Tensor | None


def check_images(images: object) -> torch.Tensor:
    """A float B x C x H x W tensor, detached."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point() or not images.numel():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise LumosError(f"images must be a non-empty float tensor B x C x H x W; got {shape}.")
    return images.detach()


def check_maps(maps: object, images: torch.Tensor, *, resize: bool = True) -> torch.Tensor:
    """Maps as float (B, H, W) at the images' size (bilinear upsampling of smaller maps)."""
    if not isinstance(maps, torch.Tensor):
        raise LumosError(f"maps must be a tensor (B, H, W), not {type(maps).__name__}.")
    m = maps.detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2 and images.shape[0] == 1:
        m = m[None]
    if m.ndim != 3 or m.shape[0] != images.shape[0]:
        raise LumosError(
            f"maps must be (B, H, W) with B = {images.shape[0]} images; got {tuple(maps.shape)}."
        )
    m = m.to(device=images.device, dtype=torch.float32)
    if not bool(m.isfinite().all()):
        bad = sorted({int(i) for i in (~m.isfinite()).flatten(1).any(1).nonzero()[:, 0]})
        raise LumosError(f"maps must be finite; the map of image(s) {bad} holds NaN or infinite values.")
    size = tuple(images.shape[-2:])
    if resize and tuple(m.shape[-2:]) != size:
        m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return m


def check_masks(masks: object, images_or_maps: torch.Tensor) -> torch.Tensor:
    """Ground truth as bool (B, H, W): masks as given, or boxes (B, 4) ``x0, y0, x1, y1`` (exclusive)."""
    if not isinstance(masks, torch.Tensor):
        raise LumosError(f"masks must be a tensor (B, H, W) or boxes (B, 4), not {type(masks).__name__}.")
    b = images_or_maps.shape[0]
    h, w = images_or_maps.shape[-2:]
    if masks.ndim == 2 and masks.shape == (b, 4) and masks.dtype != torch.bool:
        return boxes_to_masks(masks, (h, w)).to(images_or_maps.device)
    m = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if m.ndim != 3 or m.shape[0] != b or tuple(m.shape[-2:]) != (h, w):
        raise LumosError(f"masks must be (B, H, W) = ({b}, {h}, {w}) or boxes (B, 4); got {tuple(masks.shape)}.")
    return m.to(images_or_maps.device).bool()


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bool masks (B, H, W) from boxes (B, 4) ``x0, y0, x1, y1`` with ``x1, y1`` exclusive.

    Integer boxes hold pixels ``x0 <= x < x1``. Fractional boxes (a detector's, in continuous coordinates where
    pixel i spans [i, i + 1)) hold the pixels whose centre is inside, ``x0 <= x + 0.5 < x1``: the same for integer
    values, and symmetric (truncating both edges added a partly covered left/top pixel and dropped the right/bottom
    one, a half-pixel shift)."""
    h, w = size
    bx = torch.ceil(boxes - 0.5).to(torch.long) if boxes.is_floating_point() else boxes.to(torch.long)
    ys = torch.arange(h, device=boxes.device)[None, :, None]
    xs = torch.arange(w, device=boxes.device)[None, None, :]
    x0, y0, x1, y1 = (bx[:, i, None, None] for i in range(4))
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (B, 4) ``x0, y0, x1, y1`` (exclusive) around bool masks; an empty mask gives zeros."""
    b = masks.shape[0]
    rows = masks.any(2)
    cols = masks.any(1)
    out = torch.zeros(b, 4, dtype=torch.long, device=masks.device)
    for i in range(b):
        ys = rows[i].nonzero()
        xs = cols[i].nonzero()
        if len(ys):
            out[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return out


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LumosError(f"{name} must be a positive integer, got {value!r}.")
    return value


def probabilities(out: torch.Tensor) -> torch.Tensor:
    """Class probabilities of a B x K output, by the library's one decision (``lumos.targets.probabilities``)."""
    if out.ndim != 2:
        raise LumosError(f"The model output must be B x classes to score a class; got {tuple(out.shape)}.")
    return target_probabilities(out.float())  # type: ignore[return-value]


def class_target(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, output: OutputSpec = None) -> Target:
    """The target protocol for one class per image, its probability kind decided on the clean images."""
    with squash_watch() as watch:
        out = select_output(model(x), output)
    if out.ndim != 2:
        raise LumosError(f"The model output must be B x classes to score a class; got {tuple(out.shape)}.")
    return Target(classes[:, None].to(out.device), None, probability_kind(out, squashed=watch.produced(out)))


def target_probs(model: nn.Module, x: torch.Tensor, target: Target, index: torch.Tensor,
                 output: OutputSpec = None) -> torch.Tensor:
    """Probability (n,) of each row's target class (call inside :func:`scoring`)."""
    return target.confidence(select_output(model(x), output), index)[:, 0]


@contextmanager
def scoring(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Model left as found, no autograd."""
    with model_guard(model, eval_mode), torch.inference_mode():
        yield


def resolve_classes(
    model: nn.Module, images: torch.Tensor, targets: TargetLike, output: OutputSpec = None
) -> torch.Tensor:
    """One class per image: ``None`` = the model's top-1, an int for all, or one per image."""
    b = images.shape[0]
    if targets is None:
        p = probabilities(select_output(model(images), output))
        return p.argmax(1) if p.shape[1] > 1 else torch.zeros(b, dtype=torch.long, device=images.device)
    t = torch.as_tensor(targets, device=images.device).reshape(-1)
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise LumosError(f"targets must be whole class indices; got {[round(v, 4) for v in t.tolist()[:8]]}.")
    if t.dtype == torch.bool or t.is_complex():
        raise LumosError(f"targets must be class indices (int); got {t.dtype}.")
    t = t.long()
    out = select_output(model(images[:1]), output)
    if out.ndim == 2:  # a class per image needs a B x K output; that is checked where it is scored
        bad = t[(t < 0) | (t >= out.shape[1])]
        if bad.numel():
            raise LumosError(f"Target class {int(bad[0])} is out of range: the model has {out.shape[1]} classes "
                             f"(0 to {out.shape[1] - 1}).")
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise LumosError(f"Got {t.numel()} targets for {b} images; give one per image, one for all, or None.")
    return t.clone()


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B,) True where a map has one value everywhere (all zero, say): it ranks no pixel above another, so a
    metric that needs a ranking or a weighting of the pixels is undefined for it."""
    flat = maps.flatten(1)
    return flat.amax(1) == flat.amin(1)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    safe = span.clamp_min(torch.finfo(flat.dtype).tiny)
    return torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat)).view_as(maps)
