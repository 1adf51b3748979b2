"""What every method shares: the registry, the common settings, and the layer-map family.

A method is math on top of :mod:`lumos.engine`: it says which forward it needs (``grad_mode``, ``rule``),
turns a :class:`~lumos.engine.Forward` into raw maps (``compute``) and finishes them (``finish``). A
method object holds settings only -- nothing about a particular call -- so one object can serve many
calls and threads, and pickles with its settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lumos.engine import Forward, run
from lumos.errors import LumosError, check_model, close_matches
from lumos.explanation import Explanation, Kind, Normalize, finish_maps, normalize_maps, upsample
from lumos.layers import LayerSpec, Layout, Site, resolve_sites
from lumos.rules import Rule
from lumos.targets import OutputSpec, TargetSpec, check_probs

REGISTRY: dict[str, type[Method]] = {}
ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam", "score-cam": "scorecam",
           "layer-cam": "layercam", "eigen-cam": "eigencam", "grad-cam++": "gradcam++", "xgrad-cam": "xgradcam",
           "hires-cam": "hirescam", "ig": "integrated_gradients", "guided-gradcam": "guided_gradcam",
           "attention_rollout": "rollout", "grad-rollout": "grad_rollout", "gradient_rollout": "grad_rollout"}


DISPLAY_NAMES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "Layer-CAM",
    "hirescam": "HiRes-CAM",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
    "gradients": "Gradients (saliency)",
    "gradient_x_input": "Gradient x input",
    "deconvnet": "DeconvNet",
    "guided_backprop": "Guided backprop",
    "guided_gradcam": "Guided Grad-CAM",
    "integrated_gradients": "Integrated gradients",
    "smoothgrad": "SmoothGrad",
    "occlusion": "Occlusion",
    "rise": "RISE",
    "rollout": "Attention rollout",
    "grad_rollout": "Gradient-weighted rollout",
}


def display_name(method: str) -> str:
    """The one name a person reads for a method (CLI tables, app, galleries): ``gradcam++`` -> ``Grad-CAM++``.
    File names use the registered name itself."""
    return DISPLAY_NAMES.get(method, method)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` in ``lumos.explain``."""
    REGISTRY[cls.name] = cls
    return cls


def methods(*, general: bool = False) -> list[str]:
    """Names accepted by ``explain(method=...)``; ``general=True``: only those that work on any model (what
    ``--method all`` runs; attention methods need a transformer and are chosen by name)."""
    return sorted(n for n, cls in REGISTRY.items() if cls.any_model or not general)


def method_class(name: str) -> type[Method]:
    """The method class registered under ``name`` (case-insensitive, a few aliases)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise LumosError(f"Unknown method '{name}'.{close_matches(name, REGISTRY)} Known: {', '.join(methods())}.")
    return REGISTRY[key]


def constructor_settings(cls: type) -> set[str]:
    """Keyword arguments a method class's constructor accepts: its own and those of the base classes its
    ``**kwargs`` reach (up to the first constructor without them, or :class:`Method`)."""
    params: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init).parameters.values()
        params |= {p.name for p in signature if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if klass is Method or not any(p.kind == p.VAR_KEYWORD for p in signature):
            break
    return params - {"self"}


class Method:
    """Base of every method. Use as ``method(x, target)`` (or ``with Method(model) as m: m(x)``).

    Args:
        model: any ``nn.Module``; left exactly as found (mode, buffers, grads, hooks).
        layer: a module, a dotted name, ``"auto"``, or a list of them (maps fused by averaging).
        output: selects the tensor to explain when the model returns a tuple/dict (index, key or callable).
        labels: class names, so targets may be given as names.
        eval_mode: explain the model in eval mode (deterministic, per-image); mode restored after.
        probs: how probabilities come from the output: ``"auto"`` (the output itself when the model ends in
            a sigmoid or softmax; else softmax, sigmoid for a single output), ``"softmax"``, ``"sigmoid"`` or
            ``"none"`` (scores only).
        layout: for layers whose output is not B x C x h x w, a function that makes it so (applied to
            activations and gradients alike).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "layer"
    grad_mode: ClassVar[str] = "sites"
    rule: ClassVar[Rule | None] = None
    uses_layer: ClassVar[bool] = True
    any_model: ClassVar[bool] = True  # False: needs a kind of model (attention methods: a transformer)

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = "auto",
        *,
        output: OutputSpec = None,
        labels: Sequence[str] | None = None,
        eval_mode: bool = True,
        probs: str = "auto",
        layout: Layout | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            word = next(iter(unknown))
            known = sorted(constructor_settings(type(self)) - {"model", "layer"})
            raise LumosError(f"{self.name or type(self).__name__} has no setting '{word}'."
                             f"{close_matches(word, known)} Settings: {', '.join(known)}.")
        self.model = check_model(model)
        self.layer = layer
        self.output = output
        self.labels = labels
        self.eval_mode = bool(eval_mode)
        self.probs = check_probs(probs)
        self.layout = layout
        self._sites: list[Site] | None = None  # resolved once per method object (a property of the model)

    def __enter__(self) -> Method:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sites = None

    def __call__(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        return run(self, x, target)

    # -- what a method says -----------------------------------------------------------------------------
    def sites(self, x: torch.Tensor) -> list[Site]:
        """The layers to record (resolved once, then cached); none for methods that ignore the layer."""
        if not self.uses_layer:
            return []
        if self._sites is None:
            self._sites = resolve_sites(self.model, self.layer, x, self.layout)
        return self._sites

    def layer_names(self, fw: Forward) -> list[str]:
        return [s.name for s in fw.sites]

    def compute(self, fw: Forward) -> list[torch.Tensor] | tuple[list[torch.Tensor], dict[str, Any]]:
        """Raw maps from one forward (and optionally extra params for the Explanation)."""
        raise NotImplementedError

    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``maps`` (N, H, W) from the raw maps."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The settings that produced a map (recorded on the Explanation)."""
        return {}


def stack_ranks(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[rank][site] maps (B, ...) -> per site (B*K, ...), image-major."""
    return [torch.stack([r[i] for r in per_rank], 1).flatten(0, 1) for i in range(len(per_rank[0]))]


def weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_c weights[n, c] * acts[n, c] -> (N, h, w)."""
    return torch.einsum("nc,nchw->nhw", weights.to(acts.dtype), acts)


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over all spatial positions: (N, C, ...) -> (N, C)."""
    return t.flatten(2).mean(2)


def spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all spatial positions: (N, C, ...) -> (N, C)."""
    return t.flatten(2).sum(2)


class LayerMethod(Method):
    """Layer maps (CAMs). Extra args:

        relu: clamp negative evidence before upsampling (the papers' choice).
        normalize: ``"minmax"`` (each map to [0, 1]) or ``None`` (raw scale).
        upsample: interpolation to the input size: bilinear, bicubic, nearest or area.

    A gradient CAM only says how it weighs channels (``channel_weights``) or, when it is not a weighted sum
    of channels, how it forms the map (``layer_map``). One forward and one backward per target rank.
    """

    kind: ClassVar[Kind] = "layer"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, relu: bool = True,
                 normalize: Normalize = "minmax", upsample: str = "bilinear", **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        if not isinstance(relu, bool):
            raise LumosError(f"relu must be true or false, got {relu!r}.")
        normalize_maps(torch.zeros(1, 1), normalize)  # validate early
        upsample_check(upsample)
        self.relu = relu
        self.normalize = normalize
        self.upsample = upsample

    def params(self) -> dict[str, Any]:
        return {"relu": self.relu, "normalize": self.normalize, "upsample": self.upsample}

    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return finish_maps(raws, size, self.relu, self.normalize, self.upsample)

    # -- the math of one CAM ---------------------------------------------------------------------------
    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(N, C) weight per channel; the map is the weighted channel sum."""
        raise NotImplementedError

    def layer_map(self, acts: torch.Tensor, grads: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        """(B, h, w) raw map from activations (B, C, h, w), their gradients and the target classes (B,)."""
        return weighted_sum(self.channel_weights(acts, grads), acts)

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        acts = fw.maps()
        per_rank = [[self.layer_map(a, g, fw.classes(j)) for a, g in zip(acts, grads, strict=True)]
                    for j, grads in fw.site_grads()]
        return stack_ranks(per_rank)


class ActivationMethod(LayerMethod):
    """Layer maps from the activations alone (no gradient): one no-grad forward."""

    grad_mode: ClassVar[str] = "none"

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        acts = fw.maps()
        return stack_ranks([[self.layer_map(a, None, fw.classes(j)) for a in acts] for j in range(fw.k)])


def upsample_check(mode: str) -> str:
    upsample(torch.zeros(1, 1, 1), (1, 1), mode)
    return mode


class RegionMethod(Method):
    """Perturbation maps at input resolution (occlusion, RISE): kind ``"region"``, drawn like CAMs.

    Extra args: ``relu`` (keep only evidence *for* the target, default True) and ``normalize``
    (``"minmax"`` or ``None``). ``raw`` is the signed (N, H, W) map before both.
    """

    kind: ClassVar[Kind] = "region"
    grad_mode: ClassVar[str] = "none"
    uses_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, relu: bool = True,
                 normalize: Normalize = "minmax", **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        if not isinstance(relu, bool):
            raise LumosError(f"relu must be true or false, got {relu!r}.")
        normalize_maps(torch.zeros(1, 1), normalize)
        self.relu = relu
        self.normalize = normalize

    def params(self) -> dict[str, Any]:
        return {"relu": self.relu, "normalize": self.normalize}

    def finish(self, raws: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return finish_maps(raws, size, self.relu, self.normalize, "bilinear")
