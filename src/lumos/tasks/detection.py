"""Detection targets: explain one box, or every box above a score, of a detector's dense output.

The one output format (what :mod:`lumos.tasks.adapters` turn every detector into): a ``(B, N, 4 + C)``
tensor per batch -- N predictions per image, each a box ``(x0, y0, x1, y1)`` in input pixels followed by
C class scores (probabilities, or whatever the model scores classes with). Padding rows are all zeros.

A :class:`DetectionTarget` holds K reference boxes with their classes per image. On *any* output of the
same images (the clean forward, a masked or occluded copy, a path point) the score of reference box k is
the class score of the prediction that best matches it: among the predictions that score its class above
``min_score``, the one of highest IoU with the box; 0 when that IoU is below ``iou_threshold`` (the box
is gone). So Score-CAM, occlusion, RISE and deletion curves follow the box as the input is perturbed, and
K boxes of one image cost one forward and K gradient passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lumos.targets import TargetError, Targets


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a`` (..., n, 4) and ``b`` (..., m, 4), both ``(x0, y0, x1, y1)``: (..., n, m)."""
    a, b = a.detach().float(), b.detach().float()
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes (n, 4), best score first."""
    order = scores.argsort(descending=True)
    overlap = box_iou(boxes[order], boxes[order])
    keep: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlap[i] > iou
    return order[torch.tensor(keep, dtype=torch.long)] if keep else order[:0]


def check_detections(output: object) -> torch.Tensor:
    """The dense (B, N, 4 + C) detection tensor, or a one-line error saying how to get one."""
    if not isinstance(output, torch.Tensor) or output.ndim != 3 or output.shape[2] < 5:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(
            f"A detection target needs a (batch, predictions, 4 + classes) output; got {got}. Wrap the detector "
            "with lumos.tasks.TorchvisionDetector or DenseDetector (see docs/detection.md)."
        )
    return output


def detections(
    output: torch.Tensor, score_threshold: float = 0.5, nms_iou: float | None = 0.5, max_boxes: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image: ``(boxes (n, 4), labels (n,), scores (n,))`` of the predictions whose best class scores at
    least ``score_threshold``, best first, after class-wise NMS at ``nms_iou`` (None: none)."""
    out = check_detections(output).detach()
    result = []
    for rows in out:
        scores, labels = rows[:, 4:].float().max(1)
        boxes = rows[:, :4].float()
        keep = (scores >= score_threshold).nonzero()[:, 0]
        if nms_iou is not None and keep.numel():
            # class-wise NMS by offsetting each class's boxes far apart
            offset = labels[keep, None].float() * (boxes[keep].abs().max() + 1) * 2
            keep = keep[nms(boxes[keep] + offset, scores[keep], nms_iou)]
        else:
            keep = keep[scores[keep].argsort(descending=True)]
        if max_boxes is not None:
            keep = keep[:max_boxes]
        result.append((boxes[keep], labels[keep], scores[keep]))
    return result


class DetectionTarget:
    """Explain detections: K reference boxes with classes per image (see the module docstring).

    Args:
        boxes: (K, 4) for every image of the batch or (B, K, 4), ``(x0, y0, x1, y1)`` in input pixels.
            None: every detection of the clean output whose best class scores at least ``score_threshold``
            (after class-wise NMS at ``nms_iou``), best first, at most ``max_boxes``; every image of the
            batch must then have the same number (explain images one at a time otherwise).
        labels: (K,) or (B, K) class indices of the boxes (None with ``boxes``: each box's best class in
            the clean output's best-matching prediction).
        iou_threshold: a reference box whose best match has a lower IoU scores 0 (the detection is gone).
        min_score: predictions that score the box's class at most this are not matched (torchvision
            outputs carry one class per row: the other classes' columns are 0).
    """

    classes = None  # not a class target: methods that need class indices (CAM) refuse it
    fn = None
    kind = "none"

    def __init__(
        self,
        boxes: torch.Tensor | Sequence[Sequence[float]] | None = None,
        labels: torch.Tensor | Sequence[int] | int | None = None,
        *,
        score_threshold: float = 0.5,
        max_boxes: int | None = None,
        nms_iou: float | None = 0.5,
        iou_threshold: float = 0.5,
        min_score: float = 0.0,
    ) -> None:
        self.boxes = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)
        if self.boxes is not None and (self.boxes.ndim not in (2, 3) or self.boxes.shape[-1] != 4
                                       or self.boxes.shape[-2] == 0):
            raise TargetError(f"boxes must be (K, 4) or (B, K, 4) with K >= 1; got {tuple(self.boxes.shape)}.")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.ndim == 0:
            self.labels = self.labels.expand(self.boxes.shape[-2] if self.boxes is not None else 1)
        self.score_threshold, self.max_boxes, self.nms_iou = score_threshold, max_boxes, nms_iou
        self.iou_threshold, self.min_score = iou_threshold, min_score

    # -- resolution on the clean output -----------------------------------------------------------------
    @property
    def resolved(self) -> bool:
        return self.boxes is not None and self.boxes.ndim == 3 and self.labels is not None

    def _like(self, boxes: torch.Tensor, labels: torch.Tensor | None) -> DetectionTarget:
        return DetectionTarget(boxes, labels, iou_threshold=self.iou_threshold, min_score=self.min_score)

    def resolve(self, output: torch.Tensor) -> DetectionTarget:
        """The same target with (B, K, 4) boxes and (B, K) labels fixed from the clean ``output``."""
        out = check_detections(output)
        b, c = out.shape[0], out.shape[2] - 4
        if self.boxes is None:
            found = detections(out, self.score_threshold, self.nms_iou, self.max_boxes)
            counts = {len(f[0]) for f in found}
            if 0 in counts:
                raise TargetError(
                    f"No detection scores {self.score_threshold} or more; lower score_threshold or pass boxes=."
                )
            if len(counts) > 1:
                raise TargetError(
                    f"The images have different numbers of detections ({sorted(counts)}); explain one image at a "
                    "time, or pass max_boxes= no larger than the smallest."
                )
            return self._like(torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found]))
        boxes = self.boxes.to(out.device)
        if boxes.ndim == 2:
            boxes = boxes.expand(b, -1, -1)
        if boxes.shape[0] != b:
            raise TargetError(f"Got boxes for {boxes.shape[0]} images and {b} images; give (K, 4) or (B, K, 4).")
        k = boxes.shape[1]
        if self.labels is None:  # each box's class: the best class of its best-matching prediction
            best = box_iou(boxes, out[..., :4]).argmax(2)  # (B, K)
            labels = out[..., 4:].detach().gather(1, best[..., None].expand(-1, -1, c)).argmax(2)
        else:
            labels = self.labels.to(out.device)
            labels = labels.expand(b, -1) if labels.ndim == 1 else labels
            if labels.shape != (b, k):
                raise TargetError(f"labels must be (K,) or (B, K) = ({b}, {k}); got {tuple(self.labels.shape)}.")
        bad = labels[(labels < 0) | (labels >= c)]
        if bad.numel():
            raise TargetError(f"Class {int(bad[0])} is out of range: the detector scores {c} classes.")
        return self._like(boxes, labels)

    def resolve_targets(self, output: torch.Tensor) -> Targets:
        """Resolve on the clean output and score it (the hook ``lumos.targets.resolve_targets`` calls)."""
        target = self.resolve(output)
        _, best_iou = target.match(output)
        missing = (best_iou < self.iou_threshold).nonzero()
        if missing.numel():
            i, j = missing[0].tolist()
            raise TargetError(
                f"Box {j} of image {i} matches no prediction of class {int(target.labels[i, j])} in the model output "
                f"(best IoU {max(float(best_iou[i, j]), 0):.2f} < {self.iou_threshold}); nothing to explain there."
            )
        return Targets(target.scores(output), None, None, target)  # type: ignore[arg-type]

    # -- the target protocol ------------------------------------------------------------------------------
    def _fixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.resolved:
            raise TargetError("This detection target is not resolved yet: call resolve(output) first.")
        return self.boxes, self.labels  # type: ignore[return-value]

    @property
    def k(self) -> int:
        return self._fixed()[0].shape[1]

    def match(self, output: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output row and reference box: the matched prediction (n, K) and its IoU (n, K)."""
        out = check_detections(output)
        boxes, labels = self._fixed()
        if index is not None:
            boxes, labels = boxes[index.to(boxes.device)], labels[index.to(labels.device)]
        if boxes.shape[0] != out.shape[0]:
            raise TargetError(f"The target holds {boxes.shape[0]} images and the output {out.shape[0]}.")
        boxes, labels = boxes.to(out.device), labels.to(out.device)
        iou = box_iou(boxes, out[..., :4])  # (n, K, N)
        cls = out[..., 4:].detach().transpose(1, 2).gather(1, labels[:, :, None].expand(-1, -1, out.shape[1]))
        carries = cls > self.min_score  # (n, K, N): the prediction scores the box's class
        best_iou, best = torch.where(carries, iou, -1.0).max(2)
        return best, best_iou

    def scores(self, output: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Explained scores (n, K) on the graph of ``output``: the matched predictions' class scores."""
        out = check_detections(output)
        best, best_iou = self.match(out, index)
        _, labels = self._fixed()
        labels = (labels if index is None else labels[index.to(labels.device)]).to(out.device)
        rows = out.gather(1, best[..., None].expand(-1, -1, out.shape[2]))  # (n, K, 4 + C)
        values = rows[..., 4:].gather(2, labels[..., None])[..., 0]
        return torch.where(best_iou >= self.iou_threshold, values, values * 0)

    def check_path(self, images: torch.Tensor, scores: torch.Tensor) -> None:
        """Path methods (integrated gradients) call this with the explained scores (m, K) at every path point they
        evaluated, row r on the path of image ``images[r]``. A box not found at some points (its score there is
        exactly 0: a found box scores its class above ``min_score``) makes the score jump from 0 where the box
        appears, which no gradient sees: a one-line :class:`TargetError` saying where and how often."""
        gone = (scores.detach() == 0).cpu()
        images = images.cpu()
        if not bool(gone.any()):
            return
        i, j = (int(v) for v in gone.nonzero()[0])
        i = int(images[i])
        mine = images == i
        _, labels = self._fixed()
        raise TargetError(
            f"Box {j} of image {i} is not found at {int(gone[mine, j].sum())} of {int(mine.sum())} path points from "
            f"the baseline to the image (no prediction of class {int(labels[i, j])} at IoU >= {self.iou_threshold} "
            "there: its score is 0, and the jump where it appears is in no gradient); use a baseline where the "
            "detector finds the box (e.g. baseline='blur' or a tensor) or a method without a path (gradcam, occlusion)."
        )

    def probs(self, output: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """None: detection scores are compared as they are (see :meth:`confidence`)."""
        return None

    def confidence(self, output: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """What perturbation methods and metrics compare: the matched class scores (n, K)."""
        return self.scores(output.detach(), index).float()

    def select(self, index: torch.Tensor) -> DetectionTarget:
        """The same boxes for the images ``index`` only."""
        boxes, labels = self._fixed()
        return self._like(boxes[index.to(boxes.device)], labels[index.to(labels.device)])

    def box(self, j: int) -> DetectionTarget:
        """Reference box ``j`` alone (of every image); given boxes need no :meth:`resolve` first."""
        if self.boxes is None:
            raise TargetError("This detection target is not resolved yet: call resolve(output) first.")
        k = self.boxes.shape[-2]
        if not -k <= j < k:
            raise TargetError(f"Box {j} does not exist: this target holds {k} box(es) per image.")
        j %= k
        labels = None if self.labels is None else self.labels[..., j:j + 1]
        return self._like(self.boxes[..., j:j + 1, :], labels)

    def spec(self) -> DetectionTarget:
        """This target (one box per image); several boxes cannot be one class-like spec per rank."""
        if self.k != 1:
            raise TargetError(
                f"This method explains one box per image at a time; this target holds {self.k}. "
                "Use target.box(j) for each box."
            )
        return self

    def __repr__(self) -> str:
        if self.boxes is None:
            return f"DetectionTarget(score_threshold={self.score_threshold}, max_boxes={self.max_boxes})"
        labels = None if self.labels is None else self.labels.tolist()
        return f"DetectionTarget(boxes={self.boxes.tolist()}, labels={labels})"
