"""What to explain: which model output, and which score of it per image.

A target is ``None`` (each image's top-1 class), an ``int``, a list/tensor with one class per image,
a class name (``"tabby cat"``), ``"topk:N"`` (N maps per image, best first), or a callable on the model
output returning one score per image (segmentation, embedding similarity, ...; see the two below).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lumos.errors import LumosError, close_matches

TargetSpec = None | int | str | Sequence[int | str] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
OutputSpec = None | int | str | Callable[[object], torch.Tensor]


class TargetError(LumosError):
    """A target that does not fit the batch or the model output."""


def select_output(output: object, selector: OutputSpec) -> torch.Tensor:
    """Pick the tensor to explain from a model output (tensor, tuple/list or dict)."""
    if callable(selector):
        output = selector(output)
    elif selector is not None:
        try:
            output = output[selector]  # type: ignore[index]
        except (KeyError, IndexError, TypeError) as err:
            raise TargetError(f"output={selector!r} does not select anything from the model output.") from err
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        keys = ", ".join(repr(k) for k in output)
        raise TargetError(f"The model returns a dict; choose the output to explain with output= one of {keys}.")
    if isinstance(output, tuple | list):
        raise TargetError(
            f"The model returns a {type(output).__name__} of {len(output)}; choose the output to explain "
            "with output=<index>."
        )
    raise TargetError(f"The model output is a {type(output).__name__}; pass output= to select a tensor.")


@dataclass
class Targets:
    """Resolved targets: ``scores`` is (B, K) -- K maps per image; ``classes`` (B, K) or None."""

    scores: torch.Tensor
    classes: torch.Tensor | None
    probs: torch.Tensor | None


def _class_index(name: str, labels: Sequence[str] | None, num_classes: int) -> int:
    if name.strip().lstrip("-").isdigit():
        return int(name)
    if labels is None:
        raise TargetError(f"Class name '{name}' needs labels=; give a class index instead or pass labels.")
    if hasattr(labels, "index_of"):
        return int(labels.index_of(name))  # type: ignore[union-attr]
    lowered = [str(label).lower() for label in labels]
    key = name.strip().lower()
    for i, label in enumerate(lowered):
        if key == label or key in (alias.strip() for alias in label.split(",")):
            return i
    raise TargetError(f"Unknown class name '{name}'.{close_matches(name, list(map(str, labels)))}")


def _check_classes(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise TargetError(f"Class {int(bad[0])} is out of range: the model has {num_classes} outputs.")
    return classes


def resolve_targets(target: TargetSpec, output: torch.Tensor, labels: Sequence[str] | None = None) -> Targets:
    """Turn a target spec into per-image scores (B, K) on the graph of ``output``."""
    batch = output.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TargetError(f"A callable target must return one score per image, shape ({batch},); got {got}.")
        return Targets(scores[:, None], None, None)
    if output.ndim != 2:
        raise TargetError(
            f"Class targets need a (batch, classes) output; this one is {tuple(output.shape)}. "
            "Use a callable target (see lumos.targets)."
        )
    num_classes = output.shape[1]
    k = 1
    if target is None:
        classes = output.argmax(1, keepdim=True)
    elif isinstance(target, str) and (m := re.fullmatch(r"\s*top(?:k:?|-?)(\d+)\s*", target.lower())):
        k = int(m.group(1))
        if not 1 <= k <= num_classes:
            raise TargetError(f"'{target}' asks for {k} classes; the model has {num_classes}.")
        classes = output.topk(k, dim=1).indices
    elif isinstance(target, int | str):
        index = target if isinstance(target, int) else _class_index(target, labels, num_classes)
        classes = torch.full((batch, 1), index, dtype=torch.long, device=output.device)
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != batch:
            raise TargetError(f"Got {len(items)} targets for {batch} images; give one per image or a single one.")
        items = [i if isinstance(i, int) else _class_index(str(i), labels, num_classes) for i in items]
        classes = torch.tensor(items, dtype=torch.long, device=output.device)[:, None]
    classes = _check_classes(classes, num_classes)
    scores = output.gather(1, classes)
    with torch.no_grad():
        dist = torch.sigmoid(output) if num_classes == 1 else torch.softmax(output.float(), dim=1)
        probs = dist.gather(1, classes)
    return Targets(scores, classes, probs)


class SegmentationTarget:
    """Score = sum of a class's logits over a region of a (B, classes, H, W) segmentation output.

    ``mask`` (H, W) or (B, H, W) restricts the region; by default the pixels predicted as ``category``.
    """

    def __init__(self, category: int, mask: torch.Tensor | None = None) -> None:
        self.category = category
        self.mask = mask

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        logits = output[:, self.category]
        mask = self.mask if self.mask is not None else (output.argmax(1) == self.category)
        return (logits * mask.to(logits.dtype)).flatten(1).sum(1)


class SimilarityTarget:
    """Score = cosine similarity between each image's embedding (B, D) and a reference embedding (D,)."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference.detach().flatten()

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        ref = self.reference.to(output.device, output.dtype)
        return torch.nn.functional.cosine_similarity(output.flatten(1), ref[None], dim=1)
