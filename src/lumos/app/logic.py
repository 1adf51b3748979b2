"""Plain-Python logic of the web app: no Streamlit here, so all of it is testable directly.

The page (``streamlit_app.py``) only wires these functions to widgets and caches their results.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import io
import json
import re
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.errors import ImageError, LumosError
from lumos.explainer import model_device, resolve_device  # the one device rule of every front end
from lumos.methods import display_name  # one display name per method, everywhere
from lumos.shortfall import gather_shortfalls

MAX_UPLOAD_MB = 20
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
MAX_PIXELS = 40_000_000  # 40 megapixels
DISPLAY_MAX_SIDE = 1024  # larger images are shrunk once after decoding (maps are computed at model size anyway)
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
EXAMPLES = ("chelsea", "coffee", "astronaut", "rocket")

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AppConfig:
    """What model the app serves (the same forms as ``lumos explain --model``)."""

    model: str = "efficientnet_lite0"
    weights: str | None = None
    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: str | None = None
    device: str = "auto"

    def key(self) -> str:
        """A stable text key for caches (every field, so two configurations never share results)."""
        return json.dumps(self.__dict__, sort_keys=True, default=list)

    @classmethod
    def from_key(cls, key: str) -> AppConfig:
        fields = json.loads(key)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def model_choices(config: AppConfig) -> list[AppConfig]:
    """The models the page offers: the one given on the command line first, then the other zoo models.

    A zoo model given on the command line with its own options (weights, size, ...) stays a separate entry
    from the plain zoo model; every entry runs on the command line's device.
    """
    from lumos.zoo import models

    choices = [config]
    for name in models():
        plain = AppConfig(model=name, device=config.device)
        if plain != config:
            choices.append(plain)
    return choices


def model_options(config: AppConfig, full_paths: bool = False) -> list[str]:
    """What the command line gave a model besides its name (``size 32``, ``labels classes.txt``): the weights and
    labels files by file name only (the sidebar is narrow; a long folder cut the name off), or by the paths given
    with ``full_paths`` (the help tooltip)."""
    def text(key: str, value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value) if full_paths or key not in ("weights", "labels") else Path(str(value)).name

    return [f"{k} {text(k, v)}" for k, v in (("weights", config.weights), ("size", config.size), ("mean", config.mean),
                                             ("std", config.std), ("labels", config.labels)) if v is not None]


def model_label(config: AppConfig, first: AppConfig | None = None) -> str:
    """How a model choice reads in the page: its name, plus what the command line gave it (files by name)."""
    extra = model_options(config)
    label = config.model + (f" ({'; '.join(extra)})" if extra else "")
    return label + (" [command line]" if first is not None and config == first and extra else "")


def model_help(choices: Sequence[AppConfig]) -> str:
    """The model choice's help tooltip: every choice with options, its files by the full path given."""
    def shown(option: str) -> str:  # a file path in code style: no Markdown read into its underscores
        key, _, value = option.partition(" ")
        return f"{key} `{value}`" if key in ("weights", "labels") else option

    lines = [f"{c.model}: " + "; ".join(map(shown, model_options(c, full_paths=True)))
             for c in choices if model_options(c)]
    return "The command line's model and the zoo models." + ("\n\n" + "\n\n".join(lines) if lines else "")


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise LumosError(f"Expected numbers separated by commas, got '{text}'.") from None


def parse_app_args(argv: Sequence[str]) -> AppConfig:
    """Script arguments (after ``--`` of ``streamlit run``); unknown arguments are ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights")
    parser.add_argument("--size", type=int)
    parser.add_argument("--mean")
    parser.add_argument("--std")
    parser.add_argument("--labels")
    parser.add_argument("--device", default="auto")
    try:
        ns, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # a malformed value: fall back to the defaults rather than kill the page
        return AppConfig()
    return AppConfig(ns.model, ns.weights, ns.size, _floats(ns.mean), _floats(ns.std), ns.labels, ns.device)


def load_bundle(config: AppConfig):
    """Load the model onto ``config.device``; raises ``LumosError`` (incl. ``ModelLoadError``) with a one-line
    reason.

    A TorchScript file is refused before it is read (no hooks on a ScriptModule, and loading runs its code).
    """
    from lumos.zoo import importable_from_here, load_model

    device = resolve_device(config.device)  # a bad --device fails before the model is read
    importable_from_here(config.model)  # a module in the folder `lumos app` was started in, as for explain
    bundle = load_model(config.model, weights=config.weights, size=config.size, mean=config.mean,
                        std=config.std, labels=config.labels, torchscript=False)
    if isinstance(bundle.model, torch.jit.ScriptModule):
        raise LumosError(
            f"{config.model} is a TorchScript model: torch allows no hooks on a loaded ScriptModule, so its layers "
            "cannot be recorded; save the state dict and use --model package.module:callable --weights FILE."
        )
    bundle.model.to(device)
    return bundle


def model_input(bundle, image: Image.Image) -> torch.Tensor:
    """One image preprocessed for the model, on the model's device."""
    return bundle.preprocess([image]).to(model_device(bundle.model))


def thread_count(env: str | None, cpus: int | None) -> int:
    """Torch intra-op threads for the app: ``env`` if it is a positive integer, else half the cores (1..4)."""
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, (cpus or 2) // 2))


def warm_up(bundle) -> None:
    """One forward and one Grad-CAM-style backward on a blank image, so the first upload pays no start-up."""
    x = model_input(bundle, Image.new("RGB", (224, 224), (128, 128, 128)))
    try:
        import lumos

        lumos.explain(bundle.model, x, method="gradcam")
    except Exception:  # warming is best effort (e.g. a model without a spatial layer)
        with torch.no_grad():
            bundle.model(x)


LAYER_CONTROL = "Layer (CAM methods)"  # the sidebar's name for the layer choice
# Library hints phrased for Python or the command line (``method='gradcam'``, ``layer=``, ``--set``), as the page's
# own controls: the user of the page picks methods and layers in the sidebar and can type no keyword argument.
_APP_WORDING: tuple[tuple[str, Callable[[re.Match], str] | str], ...] = (
    (r"use method='([\w+-]+)' instead", lambda m: f"choose {display_name(m[1])} in Methods instead"),
    (r"needs method='([\w+-]+)'", lambda m: f"needs {display_name(m[1])} (in Methods)"),
    (r"method='([\w+-]+)'", lambda m: display_name(m[1])),
    (r"\(layer='auto' ([^)]*)\)", r"(auto \1)"),
    (r"; choose a layer (of the backbone|whose output is larger than 1x1)", rf"; choose a layer \1 in {LAYER_CONTROL}"),
    (r"pass layer= explicitly", f"choose one in {LAYER_CONTROL}"),
    (r"; pass layout= \([^)]*\)", f"; choose another layer in {LAYER_CONTROL}"),
    (r"choose the output to explain with output= one of (.*?)\.?$",
     r"the app explains a single tensor of class scores (lumos explain --output picks one of \1)."),
    (r"choose the output to explain with output=<index>\.?$",
     "the app explains a single tensor of class scores (lumos explain --output INDEX picks one)."),
    (r"pass output= to select a tensor\.?$", "the app explains a single tensor of class scores."),
    (r"give grid=\(rows, columns\) \(and prefix=\)\.?$",
     "the app cannot set the patch grid (lumos explain can: --set grid=ROWS,COLS --set prefix=N)."),
    (r"max_channels=(\d+) masks", r"\1 masks (Score-CAM most masks)"),
    (r"max_steps=(\d+) points", r"\1 points (4 x IG steps)"),
    (r"\s*\(CLI: --set [^)]*\)", ""),
)


def app_wording(message: str) -> str:
    """A library message as the page shows it: hints that name a keyword argument or a command-line option
    (``use method='gradcam' instead``, ``pass layer= explicitly``) name the page's control instead (``choose
    Grad-CAM in Methods instead``). The library's own messages stay as they are, for its Python callers."""
    for pattern, repl in _APP_WORDING:
        message = re.sub(pattern, repl, message)
    return message


def describe_error(err: BaseException) -> str:
    """A short message for the page: the LumosError text (hints as the page's controls: ``app_wording``), or the
    exception type and first line."""
    if isinstance(err, LumosError):
        return app_wording(str(err))
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def method_error(method: str, message: str) -> str:
    """A failed method's line in its slot: ``<display name>: <message>``, without saying the name twice when the
    message already starts with it ("CAM: CAM needs ..." reads as a stutter)."""
    name = display_name(method)
    return message if message.startswith(f"{name} ") or message.startswith(f"{name}:") else f"{name}: {message}"


# ---------------------------------------------------------------------------------------------- images


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_name(name: str) -> str:
    base = Path(name or "upload").name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:100] or "upload"


def decode_image(data: bytes, name: str = "upload") -> Image.Image:
    """Uploaded bytes -> RGB PIL image (EXIF orientation, first frame), shrunk to ``DISPLAY_MAX_SIDE``.

    Raises :class:`ImageError` with a short message naming ``name`` for an empty, oversized, corrupt or
    non-image upload.
    """
    from lumos.io import load_image

    if not data:
        raise ImageError(f"Cannot read image {name}: the file is empty.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Exception:  # not decodable at all: let load_image word the reason
        w = h = 0
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name} is {w} x {h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.")
    with tempfile.TemporaryDirectory(prefix="lumos-app-") as tmp:
        path = Path(tmp) / _safe_name(name)
        path.write_bytes(data)
        try:  # shrunk while decoding (JPEG: by the decoder itself), so a big photo never exists at full size
            return load_image(path, max_side=DISPLAY_MAX_SIDE)
        except ImageError as err:
            raise ImageError(str(err).replace(str(path), name)) from None


def enlargement_note(image_size: tuple[int, int], model_size: tuple[int, int]) -> str:
    """For the original's caption: ``" (8 x 8 px; the model sees it enlarged to 224 x 224)"`` when either side of the
    image (``image_size``: PIL's width, height) is under a quarter of the model's input (``model_size``: height,
    width, as ``Preprocess.size``), so a blurred, blocky map is no surprise; else ``""``."""
    (w, h), (mh, mw) = image_size, model_size
    if 4 * w >= mw and 4 * h >= mh:
        return ""
    return f" ({w} x {h} px; the model sees it enlarged to {mw} x {mh})"


def example_image(name: str) -> bytes:
    """A bundled sample photo (``lumos.io.sample_images``) as PNG bytes."""
    from lumos.io import sample_images

    return png_bytes(sample_images()[name])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- predictions


def top_classes(bundle, image: Image.Image, k: int = 5) -> list[tuple[int, str, float]]:
    """The top-``k`` (class index, name, probability) of one image, best first."""
    from lumos.explainer import predict

    return predict(bundle.model, model_input(bundle, image), bundle.labels, k=k)[0].top


def class_names(bundle) -> list[str]:
    """``"<index>: <full name>"`` for every class (the options of the class search)."""
    labels = bundle.labels
    if labels is None:
        return []
    full = getattr(labels, "full_name", None)
    return [f"{i}: {full(i) if full else labels[i]}" for i in range(len(labels))]


def search_placeholder(names: Sequence[str]) -> str:
    """The class search box's hint, from the model's own classes (``class_names``): ``e.g. tiger, espresso, 285``
    for ImageNet, ``e.g. airplane, automobile, 9`` for a 10-class model (no ImageNet name it would not find)."""
    aliases = [n.partition(": ")[2].split(",")[0].strip() for n in names]
    picks = [a for a in ("tiger", "espresso") if a in aliases] or [a for a in aliases[:2] if a]
    return "e.g. " + ", ".join([*picks, str(min(285, len(names) - 1))]) if names else ""


def _match_rank(alias: str, query: str) -> int | None:
    """How well one alias matches: 0 the whole alias, 1 it starts with the query as a word, 2 a word anywhere,
    3 it starts with the query, 4 a word starts with it, 5 it contains it; None: no match."""
    if alias == query:
        return 0
    q = re.escape(query)
    for rank, pattern in ((1, rf"^{q}\b"), (2, rf"\b{q}\b"), (3, rf"^{q}"), (4, rf"\b{q}")):
        if re.search(pattern, alias):
            return rank
    return 5 if query in alias else None


def search_classes(names: Sequence[str], query: str) -> list[int]:
    """Positions in ``names`` (``class_names``: ``"<index>: alias, alias, ..."``) that match ``query``, best first.

    Whole-word and prefix matches come first (``tiger``: tiger, tiger cat, tiger shark, tiger beetle), then
    substrings; within a rank, the shorter matching alias first. No fuzzy matching: letters scattered over
    a name (``t..i..g..e..r`` in "Eschrichtius gibbosus robustus") are not a match. A number finds that index.
    """
    q = " ".join(query.lower().split())
    if not q:
        return []
    scored = []
    for pos, entry in enumerate(names):
        index, _, rest = entry.partition(": ")
        if q == index:
            scored.append((-1, 0, pos))
            continue
        ranks = [(r, len(a)) for a in (a.strip().lower() for a in rest.split(",")) if a
                 for r in [_match_rank(a, q)] if r is not None]
        if ranks:
            scored.append((*min(ranks), pos))
    return [pos for *_, pos in sorted(scored)]


def map_layers(bundle) -> tuple[list[str], str]:
    """Layers with a spatial 4-D output that run once per forward, and the ``auto`` choice."""
    from lumos.capture import model_guard
    from lumos.layers import auto_layer, trace_layers

    x = model_input(bundle, Image.new("RGB", (224, 224), (128, 128, 128)))
    with model_guard(bundle.model), torch.no_grad():
        infos = trace_layers(bundle.model, x)
        auto = auto_layer(bundle.model, x)
    names = [i.name for i in infos if i.calls == 1 and i.shape is not None and len(i.shape) == 4]
    return names, auto


# ------------------------------------------------------------------------------------------- methods


def available_methods() -> list[str]:
    """Registered methods, Grad-CAM first (the default), the rest in registry order."""
    import lumos

    names = list(lumos.methods())
    return sorted(names, key=lambda n: (n != "gradcam", n))


def is_attention_method(method: str) -> bool:
    """True for the methods that read a transformer's attention (attention rollout, gradient rollout)."""
    import lumos
    from lumos.methods.attention import AttentionMethod

    return issubclass(lumos.method_class(method), AttentionMethod)


def has_attention(bundle) -> bool:
    """True if one forward of the model makes a self-attention call that ``lumos.attention.capture_attention`` records:
    the test the attention methods themselves apply (a CNN makes none, and they fail on it)."""
    from lumos.attention import capture_attention
    from lumos.capture import model_guard

    x = model_input(bundle, Image.new("RGB", (224, 224), (128, 128, 128)))
    with model_guard(bundle.model), torch.no_grad(), capture_attention(bundle.model) as rec:
        bundle.model(x)
    return bool(rec.probs)


def offered_methods(attention: bool) -> tuple[list[str], list[str]]:
    """(offered, withheld): ``available_methods`` with the attention methods withheld from a model without
    attention (``has_attention``), where they can only fail."""
    names = available_methods()
    withheld = [] if attention else [m for m in names if is_attention_method(m)]
    return [m for m in names if m not in withheld], withheld


def withheld_note(withheld: Sequence[str]) -> str:
    """Why the Methods list leaves some out, short enough for the sidebar: ``Not offered (this model has no attention
    layers): Attention rollout, Gradient-weighted rollout.``"""
    if not withheld:
        return ""
    return f"Not offered (this model has no attention layers): {', '.join(sorted(map(display_name, withheld)))}."


def is_pixel_method(method: str) -> bool:
    """True for pixel-space attributions (drawn as saliency maps, not heat-map overlays): the method says so."""
    import lumos

    return lumos.method_class(method).kind == "pixel"


@dataclass(frozen=True)
class Setting:
    """One method setting shown in the sidebar: constructor ``param``, widget ``kind`` and its range."""

    param: str
    label: str
    kind: str  # "int", "float" or "choice"
    default: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    options: tuple[Any, ...] = ()


# Known settings by constructor parameter; a method gets those its constructor accepts.
KNOWN_SETTINGS: dict[str, dict[str, Setting]] = {
    "scorecam": {  # the library's defaults: the per-image budget (grow to the tolerance, at most 128 masks)
        "max_channels": Setting("max_channels", "Score-CAM most masks (cap)", "int", 128, 8, 512, 8),
        "tolerance": Setting("tolerance", "Score-CAM tolerance (estimated 1 - correlation; 0: exactly the cap)",
                             "float", 0.02, 0.0, 0.2, 0.01),
    },
    "integrated_gradients": {
        "steps": Setting("steps", "IG steps", "int", 16, 4, 256, 4),
        "tolerance": Setting("tolerance", "IG completeness tolerance (0: exactly the steps)", "float", 0.01, 0.0,
                             0.1, 0.005),
        "baseline": Setting("baseline", "IG baseline", "choice", "zero", options=("zero", "black", "blur", "uniform")),
    },
    "rise": {"n_masks": Setting("n_masks", "RISE masks", "int", 1000, 100, 8000, 100)},
    "occlusion": {"window": Setting("window", "Occlusion window (px)", "int", 16, 4, 64, 4),
                  "stride": Setting("stride", "Occlusion stride (px)", "int", 8, 2, 64, 2)},
    "smoothgrad": {
        "n_samples": Setting("n_samples", "SmoothGrad samples", "int", 16, 2, 100, 1),
        "samples": Setting("samples", "SmoothGrad samples", "int", 16, 2, 100, 1),
        "noise": Setting("noise", "SmoothGrad noise (fraction of range)", "float", 0.15, 0.0, 0.5, 0.01),
    },
}


def _init_params(method: str) -> dict[str, inspect.Parameter]:
    import lumos

    try:
        return dict(inspect.signature(lumos.method_class(method).__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def method_settings(method: str) -> list[Setting]:
    """The settings the app offers for ``method`` (only those its constructor accepts). A setting whose app
    default is smaller than the library's, to stay interactive, says the library's in its label, so a map that
    differs from ``lumos explain``'s is never a surprise."""
    params = _init_params(method)
    out = []
    for p, s in KNOWN_SETTINGS.get(method, {}).items():
        if p not in params:
            continue
        library = params[p].default
        if library is not inspect.Parameter.empty and library != s.default:
            s = replace(s, label=f"{s.label}; library default {library}")
        out.append(s)
    return out


@dataclass
class MethodResult:
    """One method's answer for one image and class, as plain arrays (cache- and pickle-friendly)."""

    method: str
    map: np.ndarray  # (H, W) float32 at model input resolution
    raw: np.ndarray  # layer-resolution map (CAMs) or signed attributions (pixel methods)
    target: int | None
    prob: float | None
    layer: str | None
    pixel: bool
    params: dict[str, Any] = field(default_factory=dict)
    shortfall: str | None = None  # the method stopped at its cap before meeting its tolerance (see caption)


def uses_layer(method: str) -> bool:
    """True if the method's result depends on the layer choice (the CAMs and guided Grad-CAM)."""
    import lumos

    return bool(getattr(lumos.method_class(method), "uses_layer", False))


def result_key(model_key: str, image_hash: str, method: str, target: int | None, layer: str,
               settings: dict[str, Any] | None = None) -> str:
    """What one method's result depends on: the model, the image, the class, the method's own settings, and
    the layer only if the method uses one. So changing the CAM layer leaves SmoothGrad's cached result valid."""
    return json.dumps([model_key, image_hash, method, target, layer if uses_layer(method) else None,
                       dict(sorted((settings or {}).items()))], default=str)


class ResultStore:
    """A small thread-safe LRU cache shared by all sessions of one server (Streamlit runs sessions in threads).

    Unlike ``st.cache_data`` it says whether a result is there before computing it, so the page shows
    progress only for what it actually computes, and tests can count and clear it.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


RESULTS = ResultStore(128)  # method results (a pixel method's result is ~0.8 MB at 224 x 224)
CURVES = ResultStore(32)  # deletion / insertion curves


@contextmanager
def count_forwards(model: torch.nn.Module, report: Callable[[int, float], None] | None = None,
                   every: float = 0.25) -> Iterator[list[int]]:
    """Count the model's forward passes while the block runs (``[n]``), calling ``report(n, seconds)`` at most
    every ``every`` seconds: visible progress for methods that score many masked copies (Score-CAM, RISE,
    occlusion, SmoothGrad, integrated gradients). An exception raised by ``report`` (Streamlit stopping a run
    that the user has already replaced) stops the method at its next forward."""
    count = [0]
    start = last = time.perf_counter()

    def hook(module, inputs, output) -> None:
        nonlocal last
        count[0] += 1
        now = time.perf_counter()
        if report is not None and now - last >= every:
            last = now
            report(count[0], now - start)

    handle = model.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def run_method(bundle, image: Image.Image, method: str, target: int | None, layer: str = "auto",
               settings: dict[str, Any] | None = None) -> MethodResult:
    """Explain ``target`` (None = top-1) on ``image`` with ``method`` at ``layer``, through one spec."""
    from lumos.explainer import Explainer, ExplainSpec

    spec = ExplainSpec(methods=(method,), settings={method: dict(settings or {})}, target=target, layer=layer)
    with gather_shortfalls(say=False) as short:  # said in the caption, where the user looks
        result = Explainer(spec, bundle)(model_input(bundle, image))
    ex = result.explanations[spec.method_names[0]]
    raw = ex.raw[0] if isinstance(ex.raw, tuple) else ex.raw
    layer_name = ex.layer if isinstance(ex.layer, str) or ex.layer is None else ", ".join(ex.layer)
    return MethodResult(
        method=method,
        map=ex.maps[0].detach().float().cpu().numpy(),
        raw=raw[0].detach().float().cpu().numpy(),
        target=None if ex.targets is None else int(ex.targets[0]),
        prob=None if ex.probs is None else float(ex.probs[0]),
        layer=layer_name,
        pixel=ex.kind == "pixel",
        params={k: v for k, v in ex.params.items() if isinstance(v, str | int | float | bool | None)},
        shortfall=app_wording("; ".join(s.caption() for s in short)) or None,
    )



def layer_label(name: str, model: torch.nn.Module | None = None) -> str:
    """A layer name as the page shows it. An ``nn.Sequential`` child's name is a bare index, which reads as a number
    (``Grad-CAM @ 7 for horse (7)``): it reads ``layer 7 (ReLU)``, with the module's class when ``model`` is given.
    Other names (``_act1``, ``features.7``) are shown as they are."""
    if not name.isdigit():
        return name
    module = dict(model.named_modules()).get(name) if model is not None else None
    return f"layer {name}" + (f" ({type(module).__name__})" if module is not None else "")


def result_caption(result: MethodResult, class_name: str | None = None, model: torch.nn.Module | None = None) -> str:
    """``Grad-CAM @ layer`` (``layer_label``), then ``for <class_name> (<index>)`` when given, so a map read on its
    own (the Enlarge dialog, a screenshot) says which class it explains; and a note when the map is zero everywhere
    (drawn as nothing: say why)."""
    layer = ", ".join(layer_label(n, model) for n in result.layer.split(", ")) if result.layer else ""
    caption = f"{display_name(result.method)}{f' @ {layer}' if layer else ''}"
    if class_name is not None:
        numbered = result.target is not None and class_name != f"class {result.target}"  # no "class 7 (7)"
        caption += f" for {class_name}" + (f" ({result.target})" if numbered else "")
    if not np.any(result.map):
        caption += (": zero everywhere, nothing to draw (the exact result: the class's score does not change "
                    "with what the method looks at, e.g. an untrained head)")
    elif result.shortfall:
        caption += f": {result.shortfall}"
    return caption


def render_result(image: Image.Image, result: MethodResult, colormap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """Drawn as everywhere in lumos (``lumos.render.draw_map``): CAMs and region maps as a heat overlay,
    pixel attributions as saliency at the image's size."""
    from lumos.render import draw_map

    return draw_map(image, result.map, "pixel" if result.pixel else "layer", colormap, alpha)


def _gradient_css(colormap: str, stops: int = 9) -> str:
    from lumos.render import get_colormap

    cmap = get_colormap(colormap)
    colours = [tuple(round(255 * c) for c in cmap(i / (stops - 1))[:3]) for i in range(stops)]
    return "linear-gradient(to right," + ",".join(f"rgb{c}" for c in colours) + ")"


def colour_key_html(results: Sequence[MethodResult], colormap: str = "jet") -> str:
    """The key to the maps' colours, for the kinds on screen: heat overlays (``colormap``, low to high), grey-scale
    saliency (black to white) and signed saliency (blue against the class, red for it, as ``draw_map`` draws them).
    Every map is scaled to its own range, so colours compare places within a map, not maps with each other."""
    bar = ("<span style='display:inline-block;width:6rem;height:0.7rem;margin:0 0.3rem;vertical-align:middle;"
           "border-radius:2px;background:{}'></span>")
    parts = []
    if any(not r.pixel for r in results):
        parts.append(f"heat maps: low{bar.format(_gradient_css(colormap))}high")
    if any(r.pixel and not float(np.min(r.map)) < 0 for r in results):
        parts.append(f"grey-scale maps: low{bar.format(_gradient_css('gray'))}high")
    if any(r.pixel and float(np.min(r.map)) < 0 for r in results):
        parts.append(f"signed maps: against the class{bar.format(_gradient_css('bwr'))}for it")
    if not parts:
        return ""
    return (f"<div data-testid='lumos-colour-key' style='font-size:0.8rem;opacity:0.8'>{'; '.join(parts)}. "
            "Each map is scaled to its own range.</div>")


def feature_grid_image(bundle, image: Image.Image, layer: str = "auto", n: int = 16):
    """(grid image, layer name, channel indices) of the ``n`` most active channels of ``layer``."""
    import lumos
    from lumos.render import feature_grid

    fm = lumos.feature_maps(bundle.model, model_input(bundle, image), layer=layer, n=n)
    grid, channels = feature_grid(fm.activations[0].cpu(), n=n)
    return grid, fm.layer, channels


# ---------------------------------------------------------------------------------------- evaluation


def evaluation_available() -> bool:
    try:
        from lumos.evaluate import Deletion, Insertion  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Curves:
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float
    defined: bool = True  # False for a blank (constant) map: nothing to rank, the curves and AUCs are NaN


def deletion_insertion(bundle, image: Image.Image, maps: dict[str, np.ndarray], target: int | None,
                       steps: int = 20) -> dict[str, Curves]:
    """Deletion and insertion curves (``lumos.evaluate``) of each method's map for one image."""
    from lumos.evaluate import Deletion, Insertion

    x = model_input(bundle, image)
    targets = None if target is None else torch.tensor([target], device=x.device)
    out: dict[str, Curves] = {}
    for name, m in maps.items():
        mt = torch.as_tensor(np.abs(m), dtype=torch.float32, device=x.device)[None]
        d = Deletion(steps=steps, batch_size=16)(bundle.model, x, mt, targets)
        i = Insertion(steps=steps, batch_size=16)(bundle.model, x, mt, targets)
        defined = d.defined is None or bool(d.defined[0])
        out[name] = Curves(d.fractions.cpu().numpy(), d.curves[0].cpu().numpy(), i.curves[0].cpu().numpy(),
                           float(d.auc[0]), float(i.auc[0]), defined)
    return out


def curves_figure(curves: dict[str, Curves]):
    """A two-panel matplotlib Figure (not pyplot): deletion and insertion curves per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    for name, c in curves.items():
        if not c.defined:  # no curve to draw: say so in the legend rather than leave the method out silently
            for ax in axes:
                ax.plot([], [], label=f"{display_name(name)} (undefined: blank map)")
            continue
        axes[0].plot(c.fractions, c.deletion, label=f"{display_name(name)} (AUC {c.deletion_auc:.3f})")
        axes[1].plot(c.fractions, c.insertion, label=f"{display_name(name)} (AUC {c.insertion_auc:.3f})")
    for ax, title in zip(axes, ("Deletion (lower AUC is better)", "Insertion (higher AUC is better)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("probability")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ downloads


def build_zip(image_name: str, image: Image.Image, results: dict[str, MethodResult],
              rendered: dict[str, Image.Image], predictions: Sequence[tuple[int, str, float]] = ()) -> bytes:
    """Everything in one ZIP: original.png, per method an overlay PNG, the map and raw map as .npy,
    predictions.csv and settings.json."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("original.png", png_bytes(image))
        meta: dict[str, Any] = {"image": image_name, "methods": {}}
        for name, res in results.items():
            stem = file_stem(name)
            if name in rendered:
                zf.writestr(f"{stem}.png", png_bytes(rendered[name]))
            zf.writestr(f"{stem}_map.npy", npy_bytes(res.map))
            zf.writestr(f"{stem}_raw.npy", npy_bytes(res.raw))
            meta["methods"][name] = {"target": res.target, "prob": res.prob, "layer": res.layer, **res.params}
        if predictions:
            text = io.StringIO()
            w = csv.writer(text)
            w.writerow(["class_index", "class_name", "probability"])
            w.writerows((i, n, f"{p:.6f}") for i, n, p in predictions)
            zf.writestr("predictions.csv", text.getvalue())
        zf.writestr("settings.json", json.dumps(meta, indent=2, default=str))
    return buf.getvalue()


def file_stem(method: str) -> str:
    """A method's part of a file name: its registered name (``gradcam++``), as ``lumos explain`` writes it."""
    return re.sub(r"[^A-Za-z0-9_+-]+", "_", method)


def top5_html(top: Sequence[tuple[int, str, float]]) -> str:
    """The top-k table as compact HTML (class, index, probability drawn over its bar): real DOM text, readable by
    tests and screen readers alike, narrow enough for the page's left column."""
    from html import escape

    cell = "padding:2px 6px;border:none;border-bottom:1px solid rgba(128,128,128,0.2)"
    rows = "".join(
        f"<tr><td style='{cell}'>{escape(name)}</td><td style='{cell};text-align:right;opacity:0.6'>{idx}</td>"
        f"<td style='{cell};text-align:right;background:linear-gradient(to right,rgba(255,75,75,0.35) "
        f"{max(0.0, min(1.0, p)) * 100:.1f}%,transparent 0)'>{p:.3f}</td></tr>"
        for idx, name, p in top
    )
    head = "".join(f"<th style='{cell};text-align:{a}'>{h}</th>" for h, a in
                   (("class", "left"), ("index", "right"), ("probability", "right")))
    return (f"<table data-testid='lumos-top5' style='width:100%;font-size:0.85rem;border-collapse:collapse;"
            f"border:none;margin-bottom:0.5rem'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
