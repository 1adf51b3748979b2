"""The shared pipeline of every layer-map method: guard -> forward with capture -> targets -> maps.

A gradient CAM only says how it weighs channels (``channel_weights``) or, when it is not a weighted sum
of channels, how it forms the map (``layer_map``). One forward and one backward per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lumos.capture import Capture, model_guard
from lumos.errors import LumosError
from lumos.explanation import Explanation, Normalize, finish_maps
from lumos.layers import LayerSpec, resolve_layers
from lumos.targets import OutputSpec, Targets, TargetSpec, resolve_targets, select_output

REGISTRY: dict[str, type[LayerMethod]] = {}


def register(cls: type[LayerMethod]) -> type[LayerMethod]:
    """Class decorator: make a method available by its ``name`` in ``lumos.explain``."""
    REGISTRY[cls.name] = cls
    return cls


def check_input(x: object) -> torch.Tensor:
    """Accept a (B, C, H, W) or (C, H, W) floating tensor; anything else is a one-line error."""
    if not isinstance(x, torch.Tensor):
        raise LumosError(
            f"Input must be a torch.Tensor (B x C x H x W), not {type(x).__name__}; preprocess images first, "
            "e.g. with the preprocess returned by lumos.load_model."
        )
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise LumosError(f"Input must be a non-empty float tensor B x C x H x W; got {x.dtype} {tuple(x.shape)}.")
    return x.detach()


class LayerMethod:
    """Base of layer-map methods. Use as ``method(x, target)`` or ``with Method(model) as m: m(x)``.

    Args:
        model: any ``nn.Module``; left exactly as found (mode, buffers, grads, hooks).
        layer: a module, a dotted name, ``"auto"``, or a list of them (maps fused by averaging).
        output: selects the tensor to explain when the model returns a tuple/dict (index, key or callable).
        relu: clamp negative evidence before upsampling (the papers' choice).
        normalize: ``"minmax"`` (each map to [0, 1]) or ``None`` (raw scale).
        upsample: interpolation to the input size: bilinear, bicubic, nearest or area.
        eval_mode: explain the model in eval mode (deterministic, per-image); mode restored after.
        labels: class names, so targets may be given as names.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        output: OutputSpec = None,
        relu: bool = True,
        normalize: Normalize = "minmax",
        upsample: str = "bilinear",
        eval_mode: bool = True,
        labels: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise LumosError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
        self.model = model
        self.layer = layer
        self.output = output
        self.relu = relu
        self.normalize = normalize
        self.upsample = upsample
        self.eval_mode = eval_mode
        self.labels = labels
        self._layers: dict[str, nn.Module] | None = None

    def __enter__(self) -> LayerMethod:
        return self

    def __exit__(self, *exc: object) -> None:
        self._layers = None

    # -- hooks for subclasses -------------------------------------------------------------------------
    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(N, C) weight per channel; the map is the weighted channel sum."""
        raise NotImplementedError

    def layer_map(
        self, acts: torch.Tensor, grads: torch.Tensor | None, classes: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, h, w) raw map from activations (B, C, h, w), their gradients and the target classes (B,)."""
        weights = self.channel_weights(acts, grads)
        return torch.einsum("nc,nchw->nhw", weights.to(acts.dtype), acts)

    def params(self) -> dict[str, Any]:
        """The settings that produced a map (recorded on the Explanation)."""
        return {"relu": self.relu, "normalize": self.normalize, "upsample": self.upsample}

    # -- pipeline ---------------------------------------------------------------------------------------
    def resolve(self, x: torch.Tensor) -> dict[str, nn.Module]:
        """Resolve (once, then cached) the layers to explain; ``x`` is used for ``"auto"``."""
        if self._layers is None:
            self._layers = resolve_layers(self.model, self.layer, x)
        return self._layers

    def forward(self, x: torch.Tensor, layers: dict[str, nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward recording the layers; returns the selected output and the activations."""
        with torch.no_grad(), Capture(layers, grad=self.needs_grad) as cap:
            out = select_output(self.model(x), self.output)
        missing = [n for n in layers if n not in cap.activations]
        if missing:
            raise LumosError(f"Layer '{missing[0]}' did not run in the forward pass; choose another layer.")
        return out, cap.activations

    def __call__(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        x = check_input(x)
        with model_guard(self.model, self.eval_mode), torch.enable_grad():
            layers = self.resolve(x)
            out, acts = self.forward(x, layers)
            targets = resolve_targets(target, out, self.labels)
            raws = self.compute(x, list(acts.values()), targets)
        return self._explanation(x, raws, targets, list(layers))

    def compute(self, x: torch.Tensor, acts: list[torch.Tensor], targets: Targets) -> list[torch.Tensor]:
        """Raw maps (N, h, w) per layer, N = B x K (image-major), one backward per target rank."""
        k = targets.scores.shape[1]
        per_rank: list[list[torch.Tensor]] = []
        for j in range(k):
            grads = (
                torch.autograd.grad(targets.scores[:, j].sum(), acts, retain_graph=j < k - 1)
                if self.needs_grad
                else [None] * len(acts)
            )
            classes = None if targets.classes is None else targets.classes[:, j]
            per_rank.append([self.layer_map(a.detach(), g, classes) for a, g in zip(acts, grads, strict=True)])
        return [torch.stack([r[i] for r in per_rank], 1).flatten(0, 1).detach() for i in range(len(acts))]

    def _explanation(
        self, x: torch.Tensor, raws: list[torch.Tensor], targets: Targets, names: list[str]
    ) -> Explanation:
        b, k = targets.scores.shape
        maps = finish_maps(raws, tuple(x.shape[-2:]), self.relu, self.normalize, self.upsample)
        return Explanation(
            maps=maps,
            raw=raws[0] if len(raws) == 1 else tuple(raws),
            targets=_flat(targets.classes),
            scores=_flat(targets.scores),
            probs=_flat(targets.probs),
            layer=names[0] if len(names) == 1 else tuple(names),
            method=self.name,
            params=self.params(),
            image_index=torch.arange(b, device=x.device).repeat_interleave(k),
            layer_auto=self.layer == "auto",
        )


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1)
