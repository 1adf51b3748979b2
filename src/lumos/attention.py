"""Attention probabilities of every self-attention call in a forward, even when the attention is fused.

``capture_attention(grad=...)`` pushes a ``torch.overrides.TorchFunctionMode`` (as ``rules.backward_rules``
does) that sees three kinds of call:

- ``F.scaled_dot_product_attention`` (timm with ``fused_attn``, Hugging Face's ``sdpa``, hand-written
  models): the fused call runs as it is; the probabilities ``softmax(q k^T * scale + mask)`` are computed
  beside it from the same ``q``, ``k`` (``is_causal``, boolean/additive masks and grouped heads honoured);
- ``nn.MultiheadAttention`` (e.g. torchvision's ViT with ``need_weights=False``): the module runs as it
  does without the capture (torch functions are off inside it, so its native fast path is still taken);
  the probabilities are computed beside it from its input projections and masks (``bias_k``/``bias_v``/
  ``add_zero_attn``/static keys are refused). The modules of the ``model`` given are wrapped for the
  capture; a bare ``F.multi_head_attention_forward`` call is intercepted by the mode;
- ``softmax`` over the last dimension of a 4-D tensor (B x heads x N x S): unfused attention (timm's
  eager path, Hugging Face's ``eager``); the softmax output itself is recorded.

The model's output is bit-identical with and without the capture (``torch.equal``). With ``grad=True`` the
recorded probabilities carry gradients: a fused call returns ``fused.detach() + (A @ V - (A @ V).detach())``,
equal to ``fused`` to the bit but differentiable through ``A`` (and only through ``A @ V``, so nothing is
counted twice); autograd is switched on at the first attention call if it was off (as ``capture.Capture``
does at the first recorded layer) and restored on exit. Attention dropout while recording gradients is an
error: the probabilities would not be the ones that were used.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lumos.errors import LumosError

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
# one lock per model whose nn.MultiheadAttention modules a capture wraps: the wrap is shared by every thread
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class AttentionError(LumosError):
    """Attention that cannot be recorded faithfully (dropout while differentiating, unsupported options)."""


class AttentionRecorder(TorchFunctionMode):
    """The mode behind :func:`capture_attention`: ``probs`` holds one (B, heads, N, S) tensor per attention
    call, in call order (block order), and ``sources`` what each came from (``sdpa``, ``mha``, ``softmax``)."""

    def __init__(self, grad: bool = False) -> None:
        super().__init__()
        self.grad = grad
        self.probs: list[torch.Tensor] = []
        self.sources: list[str] = []
        self.caller_grad: bool | None = None  # the grad mode the model ran under (seen at the first MHA call)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._sdpa(func, args, kwargs)
        if func is _MHA:
            return self._mha(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in _SOFTMAX and _is_attention_softmax(out, args, kwargs):
            out = self._leaf(out)
            self._record(out, "softmax")
        return out

    # -- helpers ---------------------------------------------------------------------------------------------
    def _record(self, probs: torch.Tensor, source: str) -> None:
        self.probs.append(probs)
        self.sources.append(source)

    def _leaf(self, probs: torch.Tensor) -> torch.Tensor:
        """With ``grad``: probabilities that autograd can differentiate (a leaf if nothing upstream is)."""
        if not self.grad or probs.requires_grad:
            return probs
        torch.set_grad_enabled(True)  # record from the first attention call on (the caller restores the mode)
        return probs.detach().requires_grad_(True)

    def _no_dropout(self, p: float, training: bool = True) -> None:
        if self.grad and training and p > 0:
            raise AttentionError(
                f"Attention dropout (p={p}) is active, so the attention used is random; explain the model in "
                "eval mode (eval_mode=True, the default)."
            )

    def _sdpa(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        a = dict(zip(_SDPA_NAMES, args, strict=False)) | kwargs
        q, k, v = a["query"], a["key"], a["value"]
        self._no_dropout(float(a.get("dropout_p", 0.0) or 0.0))
        if q.shape[-3] != k.shape[-3]:  # grouped-query attention: each key head serves several query heads
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        logits = (q.float() @ k.float().transpose(-2, -1)) * scale
        mask = a.get("attn_mask")
        if a.get("is_causal"):
            n, s = logits.shape[-2:]
            mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
        probs = self._leaf(logits.softmax(-1))
        self._record(probs, "sdpa")
        if not self.grad:
            return out
        y = probs.to(v.dtype) @ v
        return out.detach() + (y - y.detach())

    def _mha(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        out, weights = func(*args, **kwargs)
        a = _MHA_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        y = self._mha_probs(a.arguments)
        return (out, weights) if y is None else (out.detach() + (y - y.detach()), weights)

    def _mha_probs(self, p: dict[str, Any]) -> torch.Tensor | None:
        """Record the probabilities of one ``multi_head_attention_forward`` call (its arguments ``p``, inputs
        sequence-first); with ``grad``, return the attention output recomputed as ``A @ V`` (else None)."""
        if p["bias_k"] is not None or p["add_zero_attn"] or p["static_k"] is not None:
            raise AttentionError("nn.MultiheadAttention with bias_k/bias_v, add_zero_attn or static keys adds keys "
                                 "that are not tokens; attention methods do not support it.")
        self._no_dropout(float(p["dropout_p"]), bool(p["training"]))
        query, key, value, heads = p["query"], p["key"], p["value"], int(p["num_heads"])
        batched = query.ndim == 3
        if not batched:
            query, key, value = query[:, None], key[:, None], value[:, None]
        n, b, e = query.shape
        s = key.shape[0]
        if p["use_separate_proj_weight"]:
            w = (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
        else:
            w = p["in_proj_weight"].chunk(3)
        bias = (None,) * 3 if p["in_proj_bias"] is None else p["in_proj_bias"].chunk(3)
        hd = e // heads

        def heads_first(t: torch.Tensor, wi: torch.Tensor, bi: torch.Tensor | None) -> torch.Tensor:
            return F.linear(t, wi, bi).reshape(t.shape[0], b * heads, hd).transpose(0, 1)  # (B*h, L, hd)

        q, k = heads_first(query, w[0], bias[0]), heads_first(key, w[1], bias[1])
        logits = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(hd)
        logits = logits.view(b, heads, n, s)
        for m, kind in ((p["attn_mask"], "attn"), (p["key_padding_mask"], "keys")):
            if m is None:
                continue
            m = m.view(b, 1, 1, s) if kind == "keys" else m.view(-1, heads, n, s) if m.ndim == 3 else m
            logits = logits.masked_fill(m, -math.inf) if m.dtype == torch.bool else logits + m.float()
        probs = self._leaf(logits.softmax(-1))
        self._record(probs, "mha")
        if not self.grad:
            return None
        v = heads_first(value, w[2], bias[2]).view(b, heads, s, hd)
        y = (probs.to(v.dtype) @ v).permute(2, 0, 1, 3).reshape(n, b, e)
        y = F.linear(y, p["out_proj_weight"], p["out_proj_bias"])
        return y if batched else y[:, 0]

    def wrap(self, module: nn.MultiheadAttention) -> Callable:
        """An instance ``forward`` for an ``nn.MultiheadAttention`` that runs it exactly as without the capture
        (torch functions off inside, so its native fast path is still taken where it would be; no grad there
        if the caller had none) and records its probabilities beside it. Calls from other threads than the one
        that wrapped it run the module untouched and are not recorded."""
        forward, owner = module.forward, threading.get_ident()

        def wrapped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                    attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
            if threading.get_ident() != owner:
                return forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                               is_causal)
            if self.caller_grad is None:
                self.caller_grad = torch.is_grad_enabled()
            with torch._C.DisableTorchFunction():  # any mode would force the slower path: other bits
                with torch.no_grad() if self.grad and not self.caller_grad else nullcontext():
                    out, weights = forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                           average_attn_weights, is_causal)
                seq_first = module.batch_first and query.ndim == 3
                q, k, v = (t.transpose(0, 1) if seq_first else t for t in (query, key, value))
                y = self._mha_probs({
                    "query": q, "key": k, "value": v, "num_heads": module.num_heads,
                    "in_proj_weight": module.in_proj_weight, "in_proj_bias": module.in_proj_bias,
                    "bias_k": module.bias_k, "add_zero_attn": module.add_zero_attn, "static_k": None,
                    "dropout_p": module.dropout, "training": module.training,
                    "use_separate_proj_weight": not module._qkv_same_embed_dim, "q_proj_weight": module.q_proj_weight,
                    "k_proj_weight": module.k_proj_weight, "v_proj_weight": module.v_proj_weight,
                    "out_proj_weight": module.out_proj.weight, "out_proj_bias": module.out_proj.bias,
                    "attn_mask": attn_mask, "key_padding_mask": key_padding_mask})
            if y is None:
                return out, weights
            y = y.transpose(0, 1) if seq_first else y
            return out.detach() + (y - y.detach()), weights

        return wrapped


def _is_attention_softmax(out: Any, args: tuple, kwargs: dict) -> bool:
    """A softmax over the last dimension of a 4-D (B x heads x N x S) tensor."""
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or not out.is_floating_point():
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return dim in (-1, 3)


@contextmanager
def capture_attention(model: nn.Module | None = None, grad: bool = False) -> Iterator[AttentionRecorder]:
    """Record the attention probabilities of forwards run inside (see the module docstring).

    Yields the :class:`AttentionRecorder`; ``recorder.probs`` fills as the model runs. With ``grad=True``
    the probabilities are on the autograd graph (``torch.autograd.grad(score, recorder.probs)``). Give the
    ``model`` so its ``nn.MultiheadAttention`` modules keep their native fast path (without it they run the
    functional path: the same math, not always the same bits). The grad mode and the modules are restored
    and the mode removed on exit (exceptions included). The mode is per thread; a capture that wraps a model's
    modules holds that model's lock, so a second thread capturing the same model waits for the first, and
    plain forwards of the model on other threads meanwhile run unrecorded.
    """
    grad_mode = torch.is_grad_enabled()
    recorder = AttentionRecorder(grad)
    wrapped = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)] if model is not None else []
    done: list[nn.Module] = []
    with _model_lock(model) if wrapped else nullcontext():
        try:
            for m in wrapped:
                if "forward" in m.__dict__:
                    raise AttentionError(f"An nn.MultiheadAttention of {type(model).__name__} has its forward "
                                         "replaced; attention methods cannot record it.")
                m.forward = recorder.wrap(m)
                done.append(m)
            with recorder:
                yield recorder
        finally:
            for m in done:  # only ours: a forward someone else replaced stays
                m.__dict__.pop("forward", None)
            torch.set_grad_enabled(grad_mode)


def _model_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.RLock())
