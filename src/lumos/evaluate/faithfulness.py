"""Faithfulness: deletion / insertion curves (Petsiuk et al. 2018) and Average Drop / Increase in
Confidence (Chattopadhay et al. 2018, as used in the Score-CAM paper).

Metrics are configured once and called on ``(model, images, maps, targets)``. Everything runs batched in
torch on the images' device; multi-pass metrics forward at most ``batch_size`` images at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lumos.engine import score_inputs
from lumos.errors import LumosError
from lumos.evaluate._common import (
    TargetLike,
    check_images,
    check_maps,
    check_model,
    check_positive,
    class_target,
    constant_maps,
    minmax,
    resolve_classes,
    scoring,
    target_probs,
)
from lumos.targets import OutputSpec, resolve_targets, select_output

Substrate = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CurveResult:
    """Deletion or insertion curves.

    ``curves`` (B, steps+1): probability of the target class after step k; ``fractions`` (steps+1,):
    the share of pixels removed/inserted at step k; ``auc`` (B,): trapezoid area over ``fractions``
    (in [0, 1] since probabilities are); ``classes`` (B,): the scored classes; ``defined`` (B,): False where the
    map is constant (all zero, say): it ranks no pixel above another, so its curve and AUC are NaN; ``plateau`` (B,):
    the share of the pixels in the map's largest set of equal values (a CAM's zeros, the untouched background of a
    nearly blank occlusion map), whose order the map leaves to the tie rule (:func:`pixel_ranks`). When it is large
    the AUC measures how the model reacts to that rule's deletion pattern more than the map.
    """

    curves: torch.Tensor
    fractions: torch.Tensor
    auc: torch.Tensor
    classes: torch.Tensor
    defined: torch.Tensor | None = None
    plateau: torch.Tensor | None = None

    @property
    def mean_auc(self) -> float:
        """Mean AUC over the images whose map is defined (NaN when none is)."""
        ok = ~self.auc.isnan()
        return float(self.auc[ok].mean()) if bool(ok.any()) else float("nan")


def pixel_ranks(maps: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """Rank (B, H*W) of every pixel: 0 = most important.

    Tied pixels (a plateau of a map, its zeros) are ordered by one random permutation of the pixel positions
    drawn from ``seed`` (the same for every image, so an image's ranks do not depend on the batch), not in raster
    order: raster order would remove a plateau's top rows first and so favour objects at the top of the image.
    ``seed=None``: raster order (the previous behaviour)."""
    flat = maps.flatten(1)
    n = flat.shape[1]
    if seed is None:
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(flat.device)
        order = perm[torch.argsort(flat[:, perm], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def plateau_share(maps: torch.Tensor) -> torch.Tensor:
    """(B,) share of each map's pixels in its largest set of equal values (1 / (H*W) when all differ)."""
    out = []
    for row in maps.flatten(1):
        _, counts = torch.unique_consecutive(row.sort().values, return_counts=True)
        out.append(counts.max())
    return torch.stack(out).float() / maps[0].numel()


def step_counts(n_pixels: int, steps: int) -> torch.Tensor:
    """Pixels changed after each step: ``floor(k * n_pixels / steps)`` for k = 0..steps."""
    return torch.arange(steps + 1, dtype=torch.long) * n_pixels // steps


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect-padded (the image border stays unbiased)."""
    if sigma <= 0 or kernel_size < 1:
        return images.clone()
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    mode = "reflect" if min(images.shape[-2:]) > r else "replicate"
    x = F.pad(images, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode=mode)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _substrate(spec: Substrate, images: torch.Tensor) -> torch.Tensor:
    if callable(spec) and not isinstance(spec, torch.Tensor):
        out = spec(images)
    else:
        out = torch.as_tensor(spec, dtype=images.dtype, device=images.device)
    try:
        return torch.broadcast_to(out.to(images), images.shape)
    except RuntimeError:
        raise LumosError(
            f"The substrate of shape {tuple(out.shape)} does not broadcast to the images {tuple(images.shape)}."
        ) from None


def curve_target(model: nn.Module, x: torch.Tensor, targets: object, output: OutputSpec = None
                 ) -> tuple[torch.Tensor, object]:
    """Classes (B,) and the scored target: a class per image (None = top-1), or any other target of the target
    protocol (a ``lumos.tasks`` detection box or segmentation region) resolved on the clean images, classes -1."""
    if not hasattr(targets, "resolve_targets") and not (callable(targets) and not isinstance(targets, torch.Tensor)):
        classes = resolve_classes(model, x, targets, output)
        return classes, class_target(model, x, classes, output)
    resolved = resolve_targets(targets, select_output(model(x), output))  # type: ignore[arg-type]
    if resolved.scores.ndim != 2 or resolved.scores.shape[1] != 1:
        raise LumosError(f"A curve scores one target per image; this one gives {tuple(resolved.scores.shape)} "
                         "scores (explain one box at a time: target.box(j)).")
    return torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device), resolved.target


class _PixelCurve:
    """Shared engine: move pixels from ``start`` to ``end`` in map order, score each step."""

    kind = ""

    def __init__(self, steps: int = 100, batch_size: int = 64, output: OutputSpec = None, eval_mode: bool = True,
                 seed: int | None = 0):
        self.steps = check_positive("steps", steps)
        self.batch_size = check_positive("batch_size", batch_size)
        self.output = output
        self.eval_mode = eval_mode
        self.seed = seed

    def endpoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self, model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: TargetLike = None
    ) -> CurveResult:
        """Curves and AUC for ``maps`` (B, H, W) of ``images`` (B, C, H, W); targets default to top-1 (or any
        target of the target protocol scoring one value per image, e.g. ``DetectionTarget(boxes (B, 1, 4), ...)``)."""
        model = check_model(model)
        x = check_images(images)
        m = check_maps(maps, x)
        b, c, h, w = x.shape
        n_pix = h * w
        if self.steps > n_pix:
            raise LumosError(f"steps={self.steps} exceeds the {n_pix} pixels of the image.")
        with scoring(model, self.eval_mode):
            classes, target = curve_target(model, x, targets, self.output)
            start, end = self.endpoints(x)
            start, end = start.flatten(2), end.flatten(2)
            ranks = pixel_ranks(m, self.seed)
            counts = step_counts(n_pix, self.steps).to(x.device)
            n_points = self.steps + 1

            def perturbed(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
                job = torch.arange(lo, hi, device=x.device)
                img, step = job // n_points, job % n_points
                changed = ranks[img] < counts[step, None]  # (n, H*W): one mask for the whole chunk
                return torch.where(changed[:, None], end[img], start[img]).view(-1, c, h, w), img

            curves = score_inputs(model, perturbed, b * n_points, target, output=self.output,
                                  batch_size=self.batch_size)[:, 0]
        defined = ~constant_maps(m)
        curves = curves.view(b, n_points).masked_fill(~defined[:, None], float("nan"))
        fractions = counts.float() / n_pix
        return CurveResult(curves, fractions, torch.trapezoid(curves, fractions, dim=1), classes, defined,
                           plateau_share(m))


class Deletion(_PixelCurve):
    """Deletion (Petsiuk et al. 2018): the most important pixels first are set to a constant substrate.

    A faithful map makes the probability fall fast: **lower AUC is better**.

    Args:
        steps: points on the curve after the start (``steps + 1`` forwards per image); step k has changed
            ``floor(k * H * W / steps)`` pixels, all channels of a pixel together.
        substrate: what deleted pixels become, in model input space: a number (default 0), a tensor
            broadcastable to the images, or a callable ``images -> tensor``.
        batch_size: perturbed images per forward (memory bound).
        output: selects the tensor to score when the model returns a tuple/dict.
        eval_mode: score in eval mode (restored afterwards).
        seed: the order of tied pixels (:func:`pixel_ranks`); None: raster order.

    A constant map (all zero, say) orders no pixel: its curve and AUC are NaN (``CurveResult.defined`` False).
    """

    kind = "deletion"

    def __init__(
        self,
        steps: int = 100,
        substrate: Substrate = 0.0,
        batch_size: int = 64,
        output: OutputSpec = None,
        eval_mode: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__(steps, batch_size, output, eval_mode, seed)
        self.substrate = substrate

    def endpoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, _substrate(self.substrate, images)


class Insertion(_PixelCurve):
    """Insertion (Petsiuk et al. 2018): start from a blurred image, restore the most important pixels first.

    A faithful map makes the probability rise fast: **higher AUC is better**.

    Args:
        steps: as for :class:`Deletion`.
        blur_kernel, blur_sigma: the Gaussian blur of the starting image (default 11 px, sigma 5, as in
            the RISE code).
        substrate: overrides the blur: a number, tensor or callable giving the starting image.
        batch_size, output, eval_mode, seed: as for :class:`Deletion`.
    """

    kind = "insertion"

    def __init__(
        self,
        steps: int = 100,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        substrate: Substrate | None = None,
        batch_size: int = 64,
        output: OutputSpec = None,
        eval_mode: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__(steps, batch_size, output, eval_mode, seed)
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.substrate = substrate

    def endpoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.substrate is not None:
            return _substrate(self.substrate, images), images
        return gaussian_blur(images, self.blur_kernel, self.blur_sigma), images


@dataclass
class DropResult:
    """Per image: ``drop`` = max(0, Y - O) / Y and ``increase`` = 1 if O > Y, with Y the target's
    probability on the image and O on the image multiplied by the map. The paper's percentages are
    ``100 * avg_drop`` and ``100 * increase_rate``. ``defined`` False: the map is constant (all zero, say), so
    it weights no pixel above another, or signed with no positive value, so it has no evidence for the target; its
    ``drop`` is NaN, its ``increase`` False, and both averages leave it out."""

    drop: torch.Tensor
    increase: torch.Tensor
    probs: torch.Tensor
    masked_probs: torch.Tensor
    classes: torch.Tensor
    defined: torch.Tensor | None = None

    def _ok(self) -> torch.Tensor:
        return torch.ones_like(self.increase, dtype=torch.bool) if self.defined is None else self.defined

    @property
    def avg_drop(self) -> float:
        ok = self._ok()
        return float(self.drop[ok].mean()) if bool(ok.any()) else float("nan")

    @property
    def increase_rate(self) -> float:
        ok = self._ok()
        return float(self.increase[ok].float().mean()) if bool(ok.any()) else float("nan")


def evidence_weights(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, H, W) as weights in [0, 1] for :class:`AverageDropIncrease`, and (B,) True where they exist.

    A non-negative map is min-max normalised (Score-CAM's convention). A signed map (some value < 0) keeps its
    positive part divided by its maximum, the evidence *for* the target: min-max scaling would give its most
    negative pixel weight 0 and its zero-attribution pixels a mid-grey weight. A map with no positive value has
    no evidence to weight with: its weights are zeros and it is marked undefined (as a constant map is)."""
    flat = maps.flatten(1)
    signed = flat.amin(1) < 0
    top = flat.amax(1)
    pos = flat.clamp_min(0) / top.clamp_min(torch.finfo(flat.dtype).tiny)[:, None]
    out = torch.where(signed[:, None], pos, minmax(maps).flatten(1)).view_as(maps)
    return out, ~signed | (top > 0)


class AverageDropIncrease:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018; Score-CAM's definition).

    The image (in model input space) is multiplied by its map, scaled to [0, 1] at the map's own resolution and
    then bilinearly upsampled: a non-negative map min-max normalised, a signed one as its positive part over its
    maximum (:func:`evidence_weights`; ``normalize=False``: the map as given). **Lower drop, higher increase are
    better.** Targets as for :class:`Deletion`: a class per image (None = top-1), or any target scoring one value
    per image (a detection box, ``DetectionTarget(...).box(j)``, or a segmentation region), whose confidence is
    compared. A constant map, or (normalised) a signed map with no positive value, is undefined: NaN drop.
    """

    def __init__(self, batch_size: int = 64, normalize: bool = True, output: OutputSpec = None,
                 eval_mode: bool = True) -> None:
        self.batch_size = check_positive("batch_size", batch_size)
        self.normalize = normalize
        self.output = output
        self.eval_mode = eval_mode

    def __call__(
        self, model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: TargetLike = None
    ) -> DropResult:
        model = check_model(model)
        x = check_images(images)
        m = check_maps(maps, x, resize=False)
        defined = ~constant_maps(m)
        if self.normalize:
            m, positive = evidence_weights(m)
            defined &= positive
        m = check_maps(m, x)
        with scoring(model, self.eval_mode):
            classes, target = curve_target(model, x, targets, self.output)
            y, o = [], []
            for lo in range(0, x.shape[0], self.batch_size):
                sl = slice(lo, lo + self.batch_size)
                index = torch.arange(x.shape[0], device=x.device)[sl]
                y.append(target_probs(model, x[sl], target, index, self.output))
                o.append(target_probs(model, x[sl] * m[sl, None], target, index, self.output))
        y_, o_ = torch.cat(y), torch.cat(o)
        drop = (y_ - o_).clamp_min(0) / y_.clamp_min(torch.finfo(y_.dtype).tiny)
        defined = defined.to(drop.device)
        drop = drop.masked_fill(~defined, float("nan"))
        return DropResult(drop, (o_ > y_) & defined, y_, o_, classes, defined)
