"""The one mechanism that records layer activations (and lets us take their gradients).

Forward hooks store each layer's output and hand a *clone* on to the rest of the network, so an
in-place op further down (``nn.ReLU(inplace=True)``) cannot overwrite what we recorded. Gradients are
then taken with ``torch.autograd.grad(scores.sum(), activations)``: only the path from the output down
to the layer is computed and no ``param.grad`` is touched. Never module backward hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lumos.errors import LumosError


class LayerCallError(LumosError):
    """The target layer ran more than once in a forward, or returned something that is not a tensor."""


class Capture:
    """Context manager recording the outputs of ``modules`` during forwards run inside it.

    With ``grad=True`` each recorded activation is part of the autograd graph (made a leaf that
    requires grad when the model is frozen or the caller is under ``no_grad``), so
    ``torch.autograd.grad(score, capture.activations[name])`` works.
    """

    def __init__(self, modules: Mapping[str, nn.Module], grad: bool = True) -> None:
        self.modules = dict(modules)
        self.grad = grad
        self.activations: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise LayerCallError(
                    f"Layer '{name}' returns {type(output).__name__}, not a tensor; choose a layer whose "
                    "output is a feature map."
                )
            if name in self.activations:
                raise LayerCallError(
                    f"Layer '{name}' runs more than once per forward (a shared module), so its map is "
                    "ambiguous; choose a module that runs once, e.g. the block that contains it."
                )
            if self.grad and not output.requires_grad:
                act = output.detach().requires_grad_(True)
            elif self.grad:
                act = output
            else:
                act = output.detach()
            self.activations[name] = act
            return act.clone()

        return hook

    def __enter__(self) -> Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget recorded activations (for another forward with the same hooks)."""
        self.activations.clear()


@contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run with grad enabled (and in eval mode unless ``eval_mode=False``); restore the model after.

    Restores every module's train/eval flag and, when some module ran in training mode, every buffer
    (BatchNorm running statistics and counters) -- on every exit path, exceptions included.
    """
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if any(m.training for m in model.modules()):
        saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        for module, mode in modes:
            module.training = mode
