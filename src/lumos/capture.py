"""The one mechanism that records layer activations (and lets us take their gradients).

Forward hooks store each layer's output and hand a *clone* on to the rest of the network, so an
in-place op further down (``nn.ReLU(inplace=True)``) cannot overwrite what we recorded. Gradients are
then taken with ``torch.autograd.grad(scores.sum(), activations)``: only the path from the output down
to the layer is computed and no ``param.grad`` is touched. Never module backward hooks.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lumos.errors import LumosError

log = logging.getLogger(__name__)
_TUPLE_NOTED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers whose tuple output was already logged


class LayerCallError(LumosError):
    """The target layer ran more than once in a forward, or returned something that is not a tensor."""


class Capture:
    """Context manager recording the outputs of ``modules`` during forwards run inside it.

    With ``grad=True`` each recorded activation is part of the autograd graph, so
    ``torch.autograd.grad(score, capture.activations[name])`` works. Run the forward under
    ``torch.no_grad()`` and the first recorded layer switches autograd on: nothing upstream of it is
    recorded (faster, less memory, works for frozen models). The caller restores the grad mode
    (``model_guard`` does).
    """

    def __init__(self, modules: Mapping[str, nn.Module], grad: bool = True) -> None:
        self.modules = dict(modules)
        self.grad = grad
        self.activations: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                # A layer returning (hidden states, ...) (Hugging Face blocks): record the hidden states.
                if module not in _TUPLE_NOTED:
                    _TUPLE_NOTED.add(module)
                    log.info("lumos: layer '%s' returns a tuple of %d; recording its first element, shape %s",
                             name, len(output), tuple(output[0].shape))
                return (hook(module, inputs, output[0]), *output[1:])
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
            if self.grad and not torch.is_grad_enabled():
                # Record autograd only from here on: the path from the output down to this layer.
                torch.set_grad_enabled(True)
                act = output.detach().requires_grad_(True)
            elif self.grad and not output.requires_grad:
                act = output.detach().requires_grad_(True)
            elif self.grad:
                act = output
            else:
                act = output.detach()
            self.activations[name] = act
            return act.clone()

        return hook

    def __enter__(self) -> Capture:
        try:
            for name, module in self.modules.items():
                self._handles.append(add_forward_hook(module, self._hook_for(name), name))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget recorded activations (for another forward with the same hooks)."""
        self.activations.clear()


def add_forward_hook(module: nn.Module, hook, name: str = "") -> torch.utils.hooks.RemovableHandle:
    """``register_forward_hook`` with a clear error for TorchScript modules (which cannot be hooked)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise LayerCallError(
            f"Layer '{name or type(module).__name__}' is TorchScript, which cannot record activations; "
            "load the model as package.module:callable with --weights instead."
        )
    return module.register_forward_hook(hook)


@contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run in eval mode (unless ``eval_mode=False``) and restore the model and grad mode afterwards.

    Restores every module's train/eval flag, the global grad mode and, when some module ran in
    training mode, every buffer (BatchNorm running statistics and counters) -- on every exit path,
    exceptions included.
    """
    grad_mode = torch.is_grad_enabled()
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if any(m.training for m in model.modules()):
        saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_mode)
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        for module, mode in modes:
            module.training = mode
