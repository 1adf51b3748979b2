"""Sanity checks (Adebayo et al. 2018): cascading model-parameter randomisation and the random-logit
(class-sensitivity) check, with Spearman rank correlation and SSIM written in torch.

Randomisation always works on a deep copy: the user's model is never altered.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lumos.engine import quiet_blank_maps
from lumos.errors import LumosError
from lumos.evaluate._common import TargetLike, check_images, check_model, probabilities, resolve_classes, scoring
from lumos.targets import OutputSpec, select_output

Explainer = str | Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) of a 1-D tensor, ties given their average rank (as ``scipy.stats.rankdata``)."""
    values, order = torch.sort(x)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(avg.repeat_interleave(counts))
    ranks[order] = avg.repeat_interleave(counts)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of (N, ...) tensors; NaN when a map is constant (a blank map has no ranks
    to correlate, as in ``scipy.stats.spearmanr``): not 0, which would read as 'uncorrelated'."""
    a, b = a.flatten(1), b.flatten(1)
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for i in range(a.shape[0]):
        ra, rb = rankdata(a[i]), rankdata(b[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = (ra.square().sum() * rb.square().sum()).sqrt()
        out[i] = (ra * rb).sum() / den if den > 0 else float("nan")
    return out.float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, win_size: int = 7) -> torch.Tensor:
    """Mean SSIM per pair of (N, H, W) maps with scikit-image's defaults (uniform 7x7 window, sample
    covariance, K1=0.01, K2=0.03, borders cropped), so it matches ``skimage.metrics.structural_similarity``.

    ``data_range`` None: per pair, the span of the two maps' values together (max - min; 1 for min-max normalised
    maps), so the result does not depend on the maps' scale; a fixed 1.0 made the constants C1, C2 swamp maps of
    small values (raw gradients) and gave SSIM near 1 for any two such maps."""
    x, y = a.double()[:, None], b.double()[:, None]
    if min(x.shape[-2:]) < win_size:
        raise LumosError(f"SSIM needs maps of at least {win_size} x {win_size} pixels.")
    if data_range is None:
        both = torch.cat([x.flatten(1), y.flatten(1)], 1)
        span = both.amax(1) - both.amin(1)
        data_range = torch.where(span > 0, span, torch.ones_like(span)).view(-1, 1, 1, 1)  # type: ignore[assignment]
    pool = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    ux, uy = pool(x), pool(y)
    n = win_size**2
    cov = n / (n - 1)
    vx = cov * (pool(x * x) - ux * ux)
    vy = cov * (pool(y * y) - uy * uy)
    vxy = cov * (pool(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def make_explainer(explainer: Explainer, **kwargs: Any) -> MapFn:
    """``fn(model, images, classes) -> maps (B, H, W)`` from a method name (with its keyword arguments)."""
    if callable(explainer):
        return explainer
    from lumos.api import method_class

    cls = method_class(explainer)

    def run(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return cls(model, **kwargs)(x, classes).maps

    return run


def randomisable_layers(model: nn.Module) -> list[str]:
    """Leaf modules with their own weight matrix/kernel (conv, linear, ...), top (output side) first."""
    names = [
        name for name, m in model.named_modules()
        if name and any(p.ndim >= 2 for p in m.parameters(recurse=False))
    ]
    return names[::-1]


def reinitialise(module: nn.Module) -> None:
    """Fresh random parameters: ``reset_parameters()`` when the module has it, else N(0, 0.02)."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.normal_(0, 0.02)


@dataclass
class CascadingResult:
    """``layers[i]`` is the last layer randomised at step i (all layers above it are random too);
    ``spearman`` and ``ssim`` are (L, B) against the original maps (Spearman NaN where either map is constant,
    e.g. a randomised model's blank map); ``maps`` is (L + 1, B, H, W) with
    the original maps first."""

    layers: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor
    maps: torch.Tensor
    classes: torch.Tensor


class CascadingRandomisation:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    Layers are re-initialised one after the other from the output towards the input, on a deep copy of the
    model; after each, the map is recomputed for the original target class and compared to the original map.
    A method that depends on the model's parameters decorrelates quickly.

    Args:
        explainer: a method name (see ``lumos.methods()``) or ``fn(model, images, classes) -> maps``.
        layers: names to randomise, top first; default: every conv/linear layer (:func:`randomisable_layers`).
        max_steps: record maps after at most this many evenly spaced layers (all are still randomised).
        seed: seed of the re-initialisation (the global RNG state is restored afterwards).
        output: selects the tensor whose classes are targeted when the model returns a tuple/dict (with a method
            name it is also passed to the method).
        method_kwargs: passed to the method class (e.g. ``layer=``).
    """

    def __init__(self, explainer: Explainer = "gradcam", layers: Sequence[str] | None = None,
                 max_steps: int | None = None, seed: int = 0, output: OutputSpec = None,
                 **method_kwargs: Any) -> None:
        if output is not None and not callable(explainer):
            method_kwargs["output"] = output
        self.output = output
        self.explain = make_explainer(explainer, **method_kwargs)
        self.layers = list(layers) if layers is not None else None
        self.max_steps = max_steps
        self.seed = seed

    def __call__(self, model: nn.Module, images: torch.Tensor, maps: torch.Tensor | None = None,
                 targets: TargetLike = None) -> CascadingResult:
        model = check_model(model)
        x = check_images(images)
        work = copy.deepcopy(model)
        with scoring(work):
            classes = resolve_classes(work, x, targets, self.output)
        modules = dict(work.named_modules())
        names = self.layers if self.layers is not None else randomisable_layers(work)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise LumosError(f"Cannot randomise layer '{unknown[0]}': the model has no such module.")
        if not names:
            raise LumosError("The model has no layer with parameters to randomise.")
        keep = set(range(len(names)))
        if self.max_steps is not None and self.max_steps < len(names):
            keep = {round(i * (len(names) - 1) / max(self.max_steps - 1, 1)) for i in range(self.max_steps)}
        original = self.explain(work, x, classes).detach()
        recorded, all_maps = [], [original]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for i, name in enumerate(names):
                reinitialise(modules[name])
                if i in keep:
                    recorded.append(name)
                    with quiet_blank_maps():  # a randomised model's blank maps are an expected outcome here
                        all_maps.append(self.explain(work, x, classes).detach())
        stacked = torch.stack(all_maps)
        rho = torch.stack([spearman(original, m) for m in stacked[1:]])
        sim = torch.stack([ssim(original, m) for m in stacked[1:]])
        return CascadingResult(recorded, rho, sim, stacked, classes)


@dataclass
class RandomLogitResult:
    """Similarity (B,) between the map of the target class and of a random other class.

    ``other_blank`` (B,): the other class's map is constant (blank: e.g. Grad-CAM of a class the image argues
    against). Its Spearman correlation is then NaN (no ranks to correlate), not 0; SSIM still compares the two maps.
    """

    spearman: torch.Tensor
    ssim: torch.Tensor
    classes: torch.Tensor
    other_classes: torch.Tensor
    maps: torch.Tensor
    other_maps: torch.Tensor
    other_blank: torch.Tensor | None = None


def image_key(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B,) a 63-bit number per image from its values (as float32) and ``seed``: the same image gives the same key
    wherever it sits in a batch and however the batch is split."""
    flat = images.detach().float().cpu().contiguous().flatten(1)
    keys = []
    for row in flat:
        digest = hashlib.blake2b(row.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)
    return torch.tensor(keys, dtype=torch.long)


def other_classes(images: torch.Tensor, classes: torch.Tensor, n_classes: int, seed: int = 0) -> torch.Tensor:
    """(B,) for each image a class other than its own ``classes``, drawn uniformly from the ``n_classes - 1``
    others by a hash of the image (:func:`image_key`): it depends on the image, its class and ``seed`` only, not
    on its place in the batch."""
    r = (image_key(images, seed) % (n_classes - 1)).to(classes.device)
    return r + (r >= classes).long()


class RandomLogit:
    """Random-logit check (Sixt et al. 2020; Adebayo et al. 2018): explain the target class and a uniformly
    drawn other class; a class-sensitive method gives dissimilar maps (low Spearman / SSIM).

    The other class of an image is drawn from a hash of the image and ``seed`` (:func:`other_classes`), so an image
    is compared with the same class whether it is checked alone or anywhere in a batch. ``output`` selects the
    tensor whose classes are counted and targeted when the model returns a tuple/dict; with a method name it is also
    passed to the method.
    """

    def __init__(self, explainer: Explainer = "gradcam", seed: int = 0, output: OutputSpec = None,
                 **method_kwargs: Any) -> None:
        if output is not None and not callable(explainer):
            method_kwargs["output"] = output
        self.explain = make_explainer(explainer, **method_kwargs)
        self.seed = seed
        self.output = output

    def __call__(self, model: nn.Module, images: torch.Tensor, maps: torch.Tensor | None = None,
                 targets: TargetLike = None) -> RandomLogitResult:
        model = check_model(model)
        x = check_images(images)
        with scoring(model):
            classes = resolve_classes(model, x, targets, self.output)
            k = probabilities(select_output(model(x[:1]), self.output)).shape[1]
        if k < 2:
            raise LumosError("The random-logit check needs a model with at least two classes.")
        other = other_classes(x, classes, k, self.seed)
        a = self.explain(model, x, classes).detach()
        with quiet_blank_maps():  # a random class's map may well be blank: an expected outcome here
            b = self.explain(model, x, other).detach()
        flat = b.flatten(1)
        blank = flat.amax(1) == flat.amin(1)
        return RandomLogitResult(spearman(a, b), ssim(a, b), classes, other, a, b, blank)
