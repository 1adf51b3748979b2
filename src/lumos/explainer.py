"""What to run, once: a frozen, picklable :class:`ExplainSpec`, and the :class:`Explainer` that runs it.

The CLI, the app and the tracker build a spec once; the dataset runner pickles it to its workers. A spec
is checked when it is built (method names, setting names and values, target text, probability choice), so
mistakes are one-line errors before any model work. ``Explainer(spec)`` loads the model once, checks the
layer and target against it, builds every method once, finds the automatic layer once, and turns a batch
of images into predictions (from the explanation's own forward) and one Explanation per method.

>>> spec = ExplainSpec(methods=("gradcam", "integrated_gradients"), target="topk:2")
>>> result = Explainer(spec)(images)          # PIL images or a preprocessed tensor
>>> result.predictions[0].top[0], result.explanations["gradcam"].maps.shape
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from lumos.errors import LumosError, positive_int
from lumos.explanation import Explanation
from lumos.layers import resolve_layers
from lumos.methods import Method, method_class
from lumos.methods.base import constructor_settings
from lumos.targets import TOPK, TargetError, check_probs, to_probabilities

_RESERVED = {"self", "model", "layer", "labels"}
_OBJECTS = {"preprocess"}  # accepted, but objects the Explainer supplies
#: Constructor arguments an ExplainSpec sets once for every method (one shared forward): not method settings
RUN_LEVEL = {"output": "--output", "probs": "--probs"}


def accepted_settings(name: str, base: str | None = None) -> set[str]:
    """Keyword arguments method ``name``'s constructor accepts (its own and its base classes'; for
    ``smoothgrad`` also those of its ``base`` method, which it passes on)."""
    cls = method_class(name)
    params = constructor_settings(cls)
    if cls.name == "smoothgrad":
        params |= accepted_settings(base or "gradients")
    return params - _RESERVED - set(RUN_LEVEL)


def build_method(name: str, model: nn.Module, layer: Any, labels: Sequence[str] | None,
                 settings: Mapping[str, Any]) -> Method:
    """A method object; a setting of the wrong type or value becomes a one-line error naming the method."""
    cls = method_class(name)
    try:
        return cls(model, layer, labels=labels, **settings)
    except (TypeError, ValueError) as err:
        if not settings:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items() if isinstance(v, str | int | float | list | None))
        raise LumosError(f"{cls.name} does not accept the settings {given}: {err}") from None


def supply_objects(settings: Mapping[str, Mapping[str, Any]], preprocess: Any) -> dict[str, dict[str, Any]]:
    """New settings dicts with ``preprocess`` added for the methods that take it (and were not given one);
    the caller's dicts are left as they are."""
    out = {}
    for name, kwargs in settings.items():
        kw = dict(kwargs)
        if preprocess is not None and "preprocess" in accepted_settings(name, kw.get("base")):
            kw.setdefault("preprocess", preprocess)
        out[name] = kw
    return out


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """Device text -> a ``torch.device`` that is present here, or a one-line :class:`LumosError`.

    ``auto`` (or None) is the first CUDA device when torch sees one, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``;
    ``mps`` (Apple GPUs). A device this machine does not have is an error, never a silent fall-back to the CPU.
    Front ends call it once, before any model work (``lumos explain --device``, ``lumos app --device``).
    """
    if isinstance(text, torch.device):
        text = str(text)
    key = "auto" if text is None else str(text).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    kind, _, index = key.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise LumosError(f"device='{text}' is not available: {why}; use device='cpu' or 'auto'.")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise LumosError(f"device='{text}' is not available: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}.")
        return torch.device(key if index else "cuda:0")
    if key == "mps" and not index:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LumosError(f"device='{text}' is not available: torch sees no Apple GPU (MPS); use device='cpu' "
                             "or 'auto'.")
        return torch.device("mps")
    raise LumosError(f"Unknown device='{text}'; use {DEVICE_CHOICES}.")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@dataclass(frozen=True)
class ModelSpec:
    """Which model: a zoo name, a ``package.module:callable`` (with ``weights``) or a file, plus the
    preprocessing and class names for user models (see ``lumos.load_model``)."""

    name: str = "efficientnet_lite0"
    weights: str | None = None
    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: str | None = None

    def load(self) -> Any:
        """The loaded :class:`lumos.zoo.ModelBundle` (model, preprocess, labels)."""
        from lumos.zoo import load_model

        return load_model(self.name, weights=self.weights, size=self.size, mean=self.mean, std=self.std,
                          labels=self.labels)


@dataclass(frozen=True)
class MethodSpec:
    """One method by its registered name, with constructor settings as (name, value) pairs."""

    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.settings)


@dataclass(frozen=True)
class ExplainSpec:
    """A frozen, picklable description of an explanation job.

    Args:
        model: a :class:`ModelSpec` (or a zoo name / ``module:callable`` string).
        methods: method names (aliases resolved, duplicates dropped in order) or :class:`MethodSpec`\\ s.
        settings: method settings, ``{method: {key: value}}`` (merged into ``methods``).
        target: ``None``/``"top1"``, ``"topk:N"``, a class index or a class name.
        layer: ``"auto"`` or a layer name.
        output: selects the tensor to explain from a tuple/dict output (index or key).
        probs: ``auto``, ``softmax``, ``sigmoid`` or ``none`` (see ``lumos.targets.probability_kind``).
        top_k: how many top classes the predictions list.
        device: where the model and the images go (see :func:`resolve_device`): ``auto`` (CUDA when present,
            else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; None leaves the model where it is and
            sends the images to the model's device. A device that is not present is an error when the spec
            is built.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    methods: tuple[MethodSpec, ...] = (MethodSpec("gradcam"),)
    target: int | str | None = None
    layer: str = "auto"
    output: int | str | None = None
    probs: str = "auto"
    top_k: int = 3
    settings: Mapping[str, Mapping[str, Any]] | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        model = ModelSpec(self.model) if isinstance(self.model, str) else self.model
        extra = {method_class(k).name: dict(v) for k, v in (self.settings or {}).items()}
        items = [self.methods] if isinstance(self.methods, str | MethodSpec) else list(self.methods)
        if not items:
            raise LumosError("No method given; see `lumos methods`.")
        seen: dict[str, dict[str, Any]] = {}
        for item in items:
            spec = item if isinstance(item, MethodSpec) else MethodSpec(str(item))
            name = method_class(spec.name).name
            seen.setdefault(name, {}).update(spec.kwargs)
        for name, kw in extra.items():
            if name not in seen:
                raise LumosError(f"Settings given for {name}, which is not among the methods ({', '.join(seen)}).")
            seen[name].update(kw)
        methods = tuple(MethodSpec(n, tuple(sorted(kw.items()))) for n, kw in seen.items())
        for m in methods:
            check_method_settings(m)
        check_probs(self.probs)
        target = parse_target(self.target)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "settings", None)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "top_k", positive_int("top_k", self.top_k))
        if self.device is not None:  # checked here (present on this machine); resolved where the model loads
            resolve_device(self.device)
            object.__setattr__(self, "device", str(self.device).strip().lower())
        if not isinstance(self.layer, str) or not self.layer.strip():
            raise LumosError(f"layer must be 'auto' or a layer name, got {self.layer!r}.")

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]


def parse_target(text: int | str | None) -> int | str | None:
    """Target text -> target spec: ``top1``/``pred`` -> None, ``topk:3`` kept, ``285`` -> 285, else a name."""
    if text is None or isinstance(text, int):
        return text
    if not isinstance(text, str):
        raise LumosError(f"target must be top1, topk:N, a class index or a class name, got {text!r}.")
    if text.strip().lower() in ("", "top1", "top-1", "pred", "predicted"):
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if (m := TOPK.fullmatch(text.lower())) and int(m.group(1)) < 1:
        raise LumosError(f"'{text}' asks for no class; use topk:1 or more.")
    return text


def _setting_kind(name: str, key: str, base: str | None) -> tuple[type | None, bool]:
    """What method ``name``'s constructor wants for ``key``, from its type hint or else its default:
    (``bool``, ``int`` or None for anything else, whether None is allowed)."""
    classes = [method_class(name)]
    if classes[0].name == "smoothgrad":  # passes settings it does not take on to its base method
        classes.append(method_class(base or "gradients"))
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters
            if key in params:
                p = params[key]
                hint = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
                members = {m.strip() for m in hint.split("|")} if p.annotation is not p.empty else set()
                optional = "None" in members or p.default is None
                for kind in (bool, int):
                    if members - {"None"} == {kind.__name__} or (not members and type(p.default) is kind):
                        return kind, optional
                return None, optional
            if not any(q.kind == q.VAR_KEYWORD for q in params.values()):
                break
    return None, True


def check_setting_types(method_kwargs: Mapping[str, Mapping[str, Any]]) -> None:
    """``--set`` values of the wrong kind for a true/false or integer setting, as a one-line error before
    any model work (``relu=maybe``, ``batch_size=2.5``)."""
    for name, kwargs in method_kwargs.items():
        for key, value in kwargs.items():
            kind, optional = _setting_kind(name, key, kwargs.get("base"))
            if kind is None or (value is None and optional) or (type(value) is kind):
                continue
            need = "takes true or false" if kind is bool else "needs an integer"
            raise LumosError(f"{name} does not accept the settings {key}={value!r}: {key} {need}"
                             f"{' (or none)' if optional else ''}.")


def run_level_message(key: str) -> str:
    """Why ``key`` is not a per-method setting, and where it goes."""
    return (f"'{key}' is set once for every method, not per method: ExplainSpec({key}=...) in Python, "
            f"{RUN_LEVEL[key]} on the command line.")


def check_method_settings(spec: MethodSpec) -> None:
    """Setting names and values of one method, checked without a model (constructors do no model work)."""
    kwargs = spec.kwargs
    for key in kwargs:
        if key in RUN_LEVEL:
            raise LumosError(run_level_message(key))
    known = accepted_settings(spec.name, kwargs.get("base"))
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        from lumos.errors import close_matches

        raise LumosError(f"{spec.name} has no setting '{unknown[0]}'.{close_matches(unknown[0], sorted(known))} "
                         f"Settings: {', '.join(sorted(known - _OBJECTS))}.")
    check_setting_types({spec.name: kwargs})
    build_method(spec.name, nn.Identity(), "auto", None, kwargs)


@dataclass
class Prediction:
    """Top classes of one image: (class index, name, probability), best first."""

    top: list[tuple[int, str, float]]


@dataclass
class BatchResult:
    """What one batch gave: predictions per image and one Explanation per method (tensors on the CPU)."""

    predictions: list[Prediction]
    explanations: dict[str, Explanation]


class Explainer:
    """Run an :class:`ExplainSpec` on batches of images; picklable (the model is reloaded from the spec).

    ``bundle`` reuses an already loaded ``ModelBundle`` (the spec's model is then not loaded again).
    """

    def __init__(self, spec: ExplainSpec, bundle: Any = None) -> None:
        if not isinstance(spec, ExplainSpec):
            raise LumosError(f"Explainer needs an ExplainSpec, not {type(spec).__name__}.")
        self.spec = spec
        self.bundle = bundle if bundle is not None else spec.model.load()
        self.model: nn.Module = self.bundle.model
        if spec.device is not None:
            self.model.to(resolve_device(spec.device))
        self.labels = self.bundle.labels
        self._check_choices()
        self._layer: str | None = None if spec.layer == "auto" else spec.layer
        self._methods: dict[str, Method] | None = None

    # -- pickling: the spec travels, the model is loaded where it lands ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]

    def _check_choices(self) -> None:
        """Layer name and class name/index against the model, before any image is read."""
        if self.spec.layer != "auto":
            resolve_layers(self.model, self.spec.layer)
        target = self.spec.target
        if self.labels is None or target is None:
            return
        if isinstance(target, int):
            if not 0 <= target < len(self.labels):
                raise TargetError(f"Class {target} is out of range: the model has {len(self.labels)} outputs.")
        elif not TOPK.fullmatch(target.lower()) and hasattr(self.labels, "index_of"):
            self.labels.index_of(target)

    def methods(self, x: torch.Tensor) -> dict[str, Method]:
        """The method objects, built once (the automatic layer is found once, on the first batch)."""
        if self._methods is None:
            if self._layer is None:
                from lumos.engine import guard

                with guard(self.model):
                    self._layer = next(iter(resolve_layers(self.model, "auto", x[:1])))
            layer = self._layer
            settings = supply_objects({m.name: m.kwargs for m in self.spec.methods},
                                      getattr(self.bundle, "preprocess", None))
            built = {}
            for m in self.spec.methods:
                kwargs = {**settings[m.name], "output": self.spec.output, "probs": self.spec.probs}
                built[m.name] = build_method(m.name, self.model, layer, self.labels, kwargs)
            self._methods = built
        return self._methods

    @property
    def layer(self) -> str | None:
        """The layer the CAMs explain (known after the first batch for ``"auto"``)."""
        return self._layer

    @property
    def device(self) -> torch.device:
        """Where the model is (the images are moved there): the spec's device, else the model's own."""
        return model_device(self.model)

    def preprocess(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images (or an already preprocessed tensor) -> a batch on the model's device."""
        x = images if isinstance(images, torch.Tensor) else self.bundle.preprocess(list(images))
        return x.to(self.device)

    def __call__(self, images: Sequence[Image.Image] | torch.Tensor, on_method: Any = None) -> BatchResult:
        """Explain a batch: ``images`` as PIL images or an already preprocessed (B, C, H, W) tensor.
        ``on_method(name, seconds)`` is called after each method (progress)."""
        import time

        from lumos.engine import quiet_blank_maps

        x = self.preprocess(images)
        explanations: dict[str, Explanation] = {}
        for name, method in self.methods(x).items():
            start = time.perf_counter()
            with quiet_blank_maps():  # the surfaces say it per file (runner captions, CLI, store summary)
                explanations[name] = method(x, self.spec.target).cpu()
            if on_method is not None:
                on_method(name, time.perf_counter() - start)
        first = next(iter(explanations.values()))
        return BatchResult(self._predictions(first), explanations)

    def _predictions(self, ex: Explanation) -> list[Prediction]:
        """Top-k classes per image from the explanation's own forward (no extra forward)."""
        return top_predictions(ex.output, ex.probs_kind, self.labels, self.spec.top_k)


def top_predictions(output: torch.Tensor | None, probs_kind: str, labels: Sequence[str] | None,
                    k: int) -> list[Prediction]:
    """Top-``k`` (class, name, probability) per image of a (B, C) output; empty for other outputs."""
    if output is None or output.ndim != 2:
        return [Prediction([]) for _ in range(1 if output is None else output.shape[0])]
    probs = to_probabilities(output, probs_kind)
    values = output.float() if probs is None else probs
    top = values.topk(min(k, values.shape[1]), dim=1)
    name = (lambda i: labels[i]) if labels is not None else (lambda i: f"class {i}")  # noqa: E731
    return [Prediction([(int(i), name(int(i)), float(p)) for p, i in zip(ps, idx, strict=True)])
            for ps, idx in zip(top.values, top.indices, strict=True)]


def predict(model: nn.Module, x: torch.Tensor, labels: Sequence[str] | None = None, k: int = 3,
            output: Any = None, probs: str = "auto") -> list[Prediction]:
    """Top-``k`` classes per image from one guarded no-grad forward (for showing classes before explaining)."""
    from lumos.engine import check_input, forward, guard

    x = check_input(x)
    with guard(model):
        fw = forward(model, x, [], None, output=output, labels=labels, probs=probs, grad_mode="none")
    return top_predictions(fw.output.detach(), fw.probs_kind, labels, k)


__all__ = ["BatchResult", "ExplainSpec", "Explainer", "MethodSpec", "ModelSpec", "Prediction", "accepted_settings",
           "build_method", "check_method_settings", "check_setting_types", "model_device", "parse_target", "predict",
           "resolve_device", "supply_objects", "top_predictions"]
