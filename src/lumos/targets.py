"""What to explain: which model output, which score of it per image, and its probability.

A target spec is ``None`` (each image's top-1 class), an ``int``, a list/tensor with one class per image,
a class name (``"tabby cat"``), ``"topk:N"`` (N maps per image, best first), or a callable on the model
output returning one score per image (segmentation, embedding similarity, ...; see the two below).

``resolve_targets`` turns a spec and a model output into a :class:`Target` -- the one protocol every
method, metric and front end uses: ``Target.scores(output)`` gives the (B, K) explained scores of *any*
output for the same images (the clean forward, masked or perturbed copies, path points), and
``Target.probs(output)`` their probabilities. The probability decision (softmax, sigmoid, the output
itself, or none) is made here and only here: :func:`probability_kind` / :func:`to_probabilities`.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lumos.errors import LumosError, close_matches

TargetSpec = None | int | str | Sequence[int | str] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
OutputSpec = None | int | str | Callable[[object], torch.Tensor]
Probs = Literal["auto", "softmax", "sigmoid", "none"]
PROBS = ("auto", "softmax", "sigmoid", "none")
TOPK = re.compile(r"\s*top(?:k:?|-?)(\d+)\s*")


class TargetError(LumosError):
    """A target that does not fit the batch or the model output."""


def select_output(output: object, selector: OutputSpec) -> torch.Tensor:
    """Pick the tensor to explain from a model output (tensor, tuple/list or dict)."""
    logits = getattr(output, "logits", None)  # a Hugging Face ModelOutput: the prediction is .logits
    if selector is None and isinstance(logits, torch.Tensor) and not isinstance(output, torch.Tensor):
        output = logits
    if callable(selector):
        output = selector(output)
    elif selector is not None:
        if isinstance(output, torch.Tensor):  # indexing it would take a batch row, not an output
            raise TargetError(f"output={selector!r} selects from a tuple, list or dict, but the model returns one "
                              "tensor: leave output= out.")
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


# -- probabilities: the one decision -------------------------------------------------------------------
def check_probs(probs: str) -> str:
    """Validate a ``probs=`` choice."""
    if probs not in PROBS:
        raise TargetError(f"probs={probs!r} is not known; use one of {', '.join(PROBS)}.")
    return probs


def probability_kind(output: torch.Tensor, probs: str = "auto", squashed: bool | None = None) -> str:
    """How probabilities come from a (B, C) output: ``softmax``, ``sigmoid``, ``identity`` or ``none``.

    ``auto``: an output the model itself passed through a final sigmoid or softmax (``squashed``, seen by
    ``lumos.rules.squash_watch`` during the forward) already is a probability (``identity``: a multi-label
    head must not be softmaxed again); otherwise a single output is a binary logit (``sigmoid``) and
    anything else is softmaxed. When ``squashed`` is unknown (None), rows in [0, 1] that sum to 1 count as
    probabilities. Decided once, on the clean forward, and kept for every perturbed copy of the same images.
    """
    check_probs(probs)
    if probs != "auto":
        return probs
    if output.ndim != 2:
        return "none"
    if squashed is None and output.shape[1] > 1:
        values = output.detach().float()
        squashed = (bool(torch.isfinite(values).all()) and float(values.min()) >= 0.0 and float(values.max()) <= 1.0
                    and bool(((values.sum(1) - 1).abs() <= 1e-3).all()))
    if squashed:
        return "identity"
    return "sigmoid" if output.shape[1] == 1 else "softmax"


def to_probabilities(output: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Probabilities (B, C) of an output by a :func:`probability_kind`; None for ``none``."""
    if kind == "none":
        return None
    out = output.float()
    if kind == "softmax":
        return out.softmax(1)
    if kind == "sigmoid":
        return out.sigmoid()
    if kind == "identity":
        return out
    raise TargetError(f"Unknown probability kind {kind!r}.")


def probabilities(output: torch.Tensor, probs: str = "auto", squashed: bool | None = None) -> torch.Tensor | None:
    """Class probabilities (B, C) of a (B, C) output (None when ``probs="none"``)."""
    if output.ndim != 2:
        raise TargetError(f"Class probabilities need a (batch, classes) output; this one is {tuple(output.shape)}.")
    return to_probabilities(output, probability_kind(output, probs, squashed))


# -- the target protocol --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A resolved target: the same explained quantity for any output of the same images.

    ``classes`` (B, K) for class targets (K maps per image, image-major), or ``fn`` for a callable target
    (K = 1). ``kind`` is the probability kind decided on the clean output.
    """

    classes: torch.Tensor | None
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    kind: str

    @property
    def k(self) -> int:
        return 1 if self.classes is None else self.classes.shape[1]

    def rows(self, n: int, index: torch.Tensor | None) -> torch.Tensor | None:
        """Classes (n, K) for output rows that belong to images ``index`` (n,); all images when None."""
        if self.classes is None:
            return None
        return self.classes if index is None else self.classes[index.to(self.classes.device)]

    def scores(self, output: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Explained scores (n, K) on the graph of ``output``; row r belongs to image ``index[r]``."""
        if self.fn is not None:
            fn = self.fn
            if index is not None and hasattr(fn, "select"):
                fn = fn.select(index)  # type: ignore[union-attr]
            values = fn(output)
            n = output.shape[0]
            if not isinstance(values, torch.Tensor) or values.shape != (n,):
                got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise TargetError(f"A callable target must return one score per image, shape ({n},); got {got}.")
            return values[:, None]
        classes = self.rows(output.shape[0], index)
        return output.gather(1, classes.to(output.device))

    def probs(self, output: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor | None:
        """Probabilities (n, K) of the explained classes (None for callables or ``probs="none"``)."""
        if self.classes is None:
            return None
        dist = to_probabilities(output.detach(), self.kind)
        return None if dist is None else dist.gather(1, self.rows(output.shape[0], index).to(output.device))

    def confidence(self, output: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """What perturbation methods and metrics compare: the probability where there is one, else the score."""
        p = self.probs(output, index)
        return self.scores(output.detach(), index).float() if p is None else p

    def select(self, index: torch.Tensor) -> Target:
        """The same target for the images ``index`` only (their classes, the callable restricted)."""
        fn = self.fn.select(index) if self.fn is not None and hasattr(self.fn, "select") else self.fn  # type: ignore
        return Target(None if self.classes is None else self.classes[index.to(self.classes.device)], fn, self.kind)

    def spec(self) -> TargetSpec:
        """A target spec that resolves to exactly these targets for rank ``0`` (one class per image)."""
        return self.fn if self.classes is None else self.classes[:, 0]


@dataclass
class Targets:
    """Resolved targets of one forward: ``scores`` (B, K) on its graph, ``classes`` (B, K) or None,
    ``probs`` (B, K) or None, and the reusable :class:`Target`."""

    scores: torch.Tensor
    classes: torch.Tensor | None
    probs: torch.Tensor | None
    target: Target


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


_TARGET_FORMS = ("give None (top-1), a class index, a class name, 'topk:N', one index or name per image, or a "
                 "callable on the model output")


def _index(value: object) -> int:
    """A class index from an int (also numpy's); a bool or a float is a one-line :class:`TargetError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise TargetError(f"target {value!r} is {kind}, not a class index: {_TARGET_FORMS}.")
    return int(value)


def _classes(target: TargetSpec, output: torch.Tensor, labels: Sequence[str] | None) -> torch.Tensor:
    batch, num_classes = output.shape
    if target is None:
        return output.argmax(1, keepdim=True)
    if isinstance(target, str) and (m := TOPK.fullmatch(target.lower())):
        k = int(m.group(1))
        if not 1 <= k <= num_classes:
            raise TargetError(f"'{target}' asks for {k} classes; the model has {num_classes}.")
        return output.topk(k, dim=1).indices
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(f"A target tensor must hold integer class indices; this one is {target.dtype}.")
        target = target.item() if target.ndim == 0 else target
    if isinstance(target, int | str | numbers.Number):
        index = _class_index(target, labels, num_classes) if isinstance(target, str) else _index(target)
        return torch.full((batch, 1), index, dtype=torch.long, device=output.device)
    if not isinstance(target, torch.Tensor | Iterable):
        raise TargetError(f"target={target!r} is not a target: {_TARGET_FORMS}.")
    items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
    if len(items) != batch:
        raise TargetError(f"Got {len(items)} targets for {batch} images; give one per image or a single one.")
    items = [_class_index(i, labels, num_classes) if isinstance(i, str) else _index(i) for i in items]
    return torch.tensor(items, dtype=torch.long, device=output.device)[:, None]


def resolve_targets(
    target: TargetSpec, output: torch.Tensor, labels: Sequence[str] | None = None, probs: str = "auto",
    squashed: bool | None = None,
) -> Targets:
    """Turn a target spec into per-image scores (B, K) on the graph of ``output``, and its :class:`Target`."""
    if hasattr(target, "resolve_targets"):  # a task target (lumos.tasks: detection boxes) resolves itself
        return target.resolve_targets(output)  # type: ignore[union-attr]
    if callable(target) and not isinstance(target, torch.Tensor):
        resolved = Target(None, target, "none")
        return Targets(resolved.scores(output), None, None, resolved)
    if output.ndim != 2:
        raise TargetError(
            f"Class targets need a (batch, classes) output; this one is {tuple(output.shape)}. "
            "Use a callable target (see lumos.targets)."
        )
    classes = _check_classes(_classes(target, output.detach(), labels), output.shape[1])
    resolved = Target(classes, None, probability_kind(output, probs, squashed))
    return Targets(resolved.scores(output), classes, resolved.probs(output), resolved)


class SegmentationTarget:
    """Score = sum of a class's logits over a region of a (B, classes, H, W) segmentation output.

    ``mask`` (H, W) or (B, H, W) restricts the region; by default the pixels predicted as ``category`` on
    *each* output scored, so perturbed copies (Score-CAM, occlusion, RISE, deletion) are scored on their own
    predicted pixels. :class:`lumos.tasks.SegmentationTarget` (which extends this one) fixes the region on the
    clean output and adds ``box=`` and ``reduce=``: use it for those methods.
    """

    def __init__(self, category: int, mask: torch.Tensor | None = None) -> None:
        self.category = category
        self.mask = mask

    def select(self, index: torch.Tensor) -> SegmentationTarget:
        """The target for output rows of images ``index`` (a per-image mask follows its images)."""
        if self.mask is None or self.mask.ndim < 3:
            return self
        return SegmentationTarget(self.category, self.mask[index.to(self.mask.device)])

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
