"""Leave the training loop exactly as it was: RNG streams and parameter gradients."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the Python, NumPy and torch (CPU and CUDA) random states on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def preserve_grads(model: nn.Module) -> Iterator[None]:
    """Put back every parameter's ``.grad`` (the tensor object itself) as found.

    lumos never writes ``.grad`` (it uses ``torch.autograd.grad``); this is a safety net for user
    models or callables that call ``backward`` inside their forward.
    """
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, g in saved:
            if p.grad is not g:
                p.grad = g
