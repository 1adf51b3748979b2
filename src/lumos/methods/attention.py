"""Attention methods for vision transformers: attention rollout and gradient-weighted attention rollout.

Both read the attention probabilities of every self-attention call of one forward (``lumos.attention``:
fused or not) and give a map on the patch grid, drawn like a CAM (kind ``"layer"``).

Tokens: the first ``prefix`` tokens are not patches (class, distillation, register tokens); the last
``gh * gw`` are the patch grid, row-major. The map is the class token's row (token 0) of the relevance
matrix, restricted to the patch columns; a model without prefix tokens (global pooling) takes the mean of
all rows. ``prefix`` and the grid are inferred from the token count and the input's aspect ratio (the
smallest prefix whose remaining tokens form a grid of that shape), or given as ``prefix=`` / ``grid=``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lumos.attention import AttentionRecorder, capture_attention
from lumos.engine import Forward, build, check_input, forward, grad, guard
from lumos.errors import LumosError, positive_int
from lumos.explanation import Explanation, Kind, Normalize, finish_maps, normalize_maps
from lumos.methods.base import Method, register, upsample_check
from lumos.targets import TargetSpec

HEAD_FUSIONS = ("mean", "max", "min")
MAX_PREFIX = 16  # class + distillation + register tokens considered when inferring the layout


def token_layout(n: int, size: tuple[int, int], prefix: int | None = None,
                 grid: tuple[int, int] | None = None) -> tuple[int, tuple[int, int]]:
    """(prefix, (gh, gw)) for ``n`` tokens of an input of ``size`` (H, W): given, or inferred as the smallest
    prefix whose remaining tokens form a grid with the input's aspect ratio (patch sizes dividing the input
    preferred). A token count that fits no grid is a one-line error."""
    if grid is not None:
        gh, gw = grid
        p = n - gh * gw if prefix is None else prefix
        if p < 0 or p + gh * gw != n:
            raise LumosError(f"grid={tuple(grid)} with prefix={p} does not match the {n} attention tokens.")
        return p, (gh, gw)
    h, w = size
    found: list[tuple[bool, int, tuple[int, int]]] = []
    for p in range(0, min(MAX_PREFIX, n - 1) + 1) if prefix is None else [prefix]:
        m = n - p
        gh = round(math.sqrt(m * h / w))
        if gh < 1 or m % gh or gh * w != (m // gh) * h:
            continue
        gw = m // gh
        found.append((h % gh == 0 and w % gw == 0, p, (gh, gw)))
    if not found:
        raise LumosError(f"The attention has {n} tokens, which form no patch grid for a {h} x {w} input after "
                         f"{'0' if prefix is None else prefix}..{MAX_PREFIX if prefix is None else prefix} prefix "
                         "tokens; give grid=(rows, columns) (and prefix=).")
    divides = [f for f in found if f[0]]
    _, p, g = (divides or found)[0]
    return p, g


def fuse_heads(probs: torch.Tensor, how: str) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if how == "mean":
        return probs.mean(1)
    if how == "max":
        return probs.amax(1)
    return probs.amin(1)


def discard_lowest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, per image, the ``ratio`` fraction of the entries of (B, N, N) with the smallest values."""
    k = int(a[0].numel() * ratio)
    if k == 0:
        return a
    flat = a.flatten(1).clone()
    flat.scatter_(1, flat.topk(k, 1, largest=False).indices, 0.0)
    return flat.view_as(a)


def rollout(probs: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): per block, heads fused, the lowest ``discard_ratio`` of the
    entries zeroed, the identity added (the residual) and rows re-normalised; the product over blocks,
    last block on the left. (B, heads, N, N) per block -> (B, N, N)."""
    out = None
    for p in probs:
        a = discard_lowest(fuse_heads(p.float(), head_fusion), discard_ratio)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    assert out is not None
    return out


def gradient_rollout(probs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021): R = I; per block in forward
    order, R += mean_heads(relu(grad * A)) @ R. (B, heads, N, N) per block -> (B, N, N)."""
    n = probs[0].shape[-1]
    r = torch.eye(n, dtype=torch.float32, device=probs[0].device).expand(probs[0].shape[0], n, n)
    for a, g in zip(probs, grads, strict=True):
        r = r + (g.float() * a.float()).clamp_min(0).mean(1) @ r
    return r


def token_map(relevance: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, N) relevance -> (B, gh, gw): the class token's row (mean of all rows without prefix tokens),
    patch columns only."""
    row = relevance[:, 0] if prefix > 0 else relevance.mean(1)
    return row[:, prefix:].reshape(-1, *grid)


class AttentionMethod(Method):
    """Base of the attention methods: one forward with :func:`lumos.attention.capture_attention`.

    Args (besides :class:`~lumos.methods.base.Method`'s; ``layer`` is ignored, every attention call is used):
        prefix: number of non-patch tokens before the patches (class, distillation, registers); inferred.
        grid: (rows, columns) of the patch grid; inferred from the token count and the input's aspect ratio.
        normalize: ``"minmax"`` (each map to [0, 1]) or ``None``.
        upsample: interpolation to the input size: bilinear, bicubic, nearest or area.
    """

    kind: ClassVar[Kind] = "layer"
    grad_mode: ClassVar[str] = "none"
    uses_layer: ClassVar[bool] = False
    any_model: ClassVar[bool] = False  # a transformer only: not part of ``--method all``
    needs_grad: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: Any = "auto", *, prefix: int | None = None,
                 grid: Sequence[int] | None = None, normalize: Normalize = "minmax", upsample: str = "bilinear",
                 **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
            raise LumosError(f"prefix must be a non-negative integer, got {prefix!r}.")
        if grid is not None:
            if not isinstance(grid, list | tuple) or len(grid) != 2:
                raise LumosError(f"grid must be two integers (rows, columns), got {grid!r}.")
            grid = (positive_int("grid", grid[0]), positive_int("grid", grid[1]))
        normalize_maps(torch.zeros(1, 1), normalize)
        upsample_check(upsample)
        self.prefix = prefix
        self.grid = grid
        self.normalize = normalize
        self.upsample = upsample

    def __call__(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        x = check_input(x)
        with guard(self.model, self.eval_mode), torch.enable_grad() if self.needs_grad else torch.no_grad():
            with capture_attention(self.model, grad=self.needs_grad) as rec:
                fw = forward(self.model, x, [], target, output=self.output, labels=self.labels, probs=self.probs,
                             grad_mode="none")
                probs = self._checked(rec, x)
                prefix, grid = token_layout(probs[0].shape[-1], tuple(x.shape[-2:]), self.prefix, self.grid)
                per_rank = [token_map(r, prefix, grid) for r in self.relevance(fw, probs)]
        raw = torch.stack(per_rank, 1).flatten(0, 1)
        extra = {"blocks": len(probs), "heads": probs[0].shape[1], "prefix": prefix, "grid": list(grid)}
        return build(self, x, [raw], fw, extra)

    def _checked(self, rec: AttentionRecorder, x: torch.Tensor) -> list[torch.Tensor]:
        if not rec.probs:
            raise LumosError(
                f"{type(self.model).__name__} made no attention call that lumos can record "
                "(F.scaled_dot_product_attention, nn.MultiheadAttention or a softmax over B x heads x N x N); "
                f"{self.name} needs a vision transformer."
            )
        shape = rec.probs[0].shape
        for p in rec.probs:
            if p.shape[0] != x.shape[0] or p.shape[-1] != p.shape[-2] or p.shape[-2:] != shape[-2:]:
                raise LumosError(
                    f"{self.name} needs global self-attention over the same tokens in every block; this model's "
                    f"attention has shapes {tuple(shape)} and {tuple(p.shape)} for {x.shape[0]} image(s) (windowed "
                    "attention, as in Swin, has no token-to-token rollout)."
                )
        return rec.probs

    def relevance(self, fw: Forward, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per target rank: the (B, N, N) token relevance."""
        raise NotImplementedError

    def layer_names(self, fw: Forward) -> list[str]:
        return []

    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return finish_maps(raws, size, False, self.normalize, self.upsample)

    def params(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "upsample": self.upsample}


@register
class AttentionRollout(AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020): how much attention flows from each patch to the class token
    through every block, residuals included. Class-agnostic (the same map for every target).

    Extra args:
        head_fusion: how a block's heads are combined: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        discard_ratio: fraction of each block's fused attention entries (the smallest) set to zero before the
            residual is added, in [0, 1) (0: the paper; 0.9 is a common choice to sharpen trained ViTs).
    """

    name = "rollout"

    def __init__(self, *args: Any, head_fusion: str = "mean", discard_ratio: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if head_fusion not in HEAD_FUSIONS:
            raise LumosError(f"head_fusion={head_fusion!r} is not known; use one of {', '.join(HEAD_FUSIONS)}.")
        if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, int | float) \
                or not 0.0 <= discard_ratio < 1.0:
            raise LumosError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}.")
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)

    def relevance(self, fw: Forward, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        r = rollout([p.detach() for p in probs], self.head_fusion, self.discard_ratio)
        return [r] * fw.k

    def params(self) -> dict[str, Any]:
        return {"head_fusion": self.head_fusion, "discard_ratio": self.discard_ratio, **super().params()}


@register
class GradientRollout(AttentionMethod):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic attention-model
    explainability"): each block's attention weighted by the gradient of the explained score, positive part,
    mean over heads, accumulated as R += A_bar @ R. Class-specific; one backward per target rank."""

    name = "grad_rollout"
    needs_grad = True

    def relevance(self, fw: Forward, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for j in range(fw.k):
            grads = grad(fw.targets.scores[:, j].sum(), probs, retain=j < fw.k - 1, what="the attention")
            out.append(gradient_rollout([p.detach() for p in probs], grads))
        return out
