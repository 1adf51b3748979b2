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
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.errors import ImageError, LumosError
from lumos.methods import display_name  # one display name per method, everywhere

MAX_UPLOAD_MB = 20
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
MAX_PIXELS = 40_000_000  # 40 megapixels
DISPLAY_MAX_SIDE = 1024  # larger images are shrunk once after decoding (maps are computed at model size anyway)
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
EXAMPLES = ("chelsea", "coffee", "astronaut", "rocket")

# Display names of the known methods; any other registered method shows under its own name.

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
    try:
        ns, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # a malformed value: fall back to the defaults rather than kill the page
        return AppConfig()
    return AppConfig(ns.model, ns.weights, ns.size, _floats(ns.mean), _floats(ns.std), ns.labels)


def load_bundle(config: AppConfig):
    """Load the model; raises ``LumosError`` (incl. ``ModelLoadError``) with a one-line reason.

    A TorchScript file is refused before it is read (no hooks on a ScriptModule, and loading runs its code).
    """
    from lumos.zoo import load_model

    bundle = load_model(config.model, weights=config.weights, size=config.size, mean=config.mean,
                        std=config.std, labels=config.labels, torchscript=False)
    if isinstance(bundle.model, torch.jit.ScriptModule):
        raise LumosError(
            f"{config.model} is a TorchScript model: torch allows no hooks on a loaded ScriptModule, so its layers "
            "cannot be recorded; save the state dict and use --model package.module:callable --weights FILE."
        )
    return bundle


def thread_count(env: str | None, cpus: int | None) -> int:
    """Torch intra-op threads for the app: ``env`` if it is a positive integer, else half the cores (1..4)."""
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, (cpus or 2) // 2))


def warm_up(bundle) -> None:
    """One forward and one Grad-CAM-style backward on a blank image, so the first upload pays no start-up."""
    x = bundle.preprocess([Image.new("RGB", (224, 224), (128, 128, 128))])
    try:
        import lumos

        lumos.explain(bundle.model, x, method="gradcam")
    except Exception:  # warming is best effort (e.g. a model without a spatial layer)
        with torch.no_grad():
            bundle.model(x)


def describe_error(err: BaseException) -> str:
    """A short message for the page: the LumosError text, or the exception type and first line."""
    if isinstance(err, LumosError):
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


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

    x = bundle.preprocess([image])
    return predict(bundle.model, x, bundle.labels, k=k)[0].top


def class_names(bundle) -> list[str]:
    """``"<index>: <full name>"`` for every class (for the class search box)."""
    labels = bundle.labels
    if labels is None:
        return []
    full = getattr(labels, "full_name", None)
    return [f"{i}: {full(i) if full else labels[i]}" for i in range(len(labels))]


def map_layers(bundle) -> tuple[list[str], str]:
    """Layers with a spatial 4-D output that run once per forward, and the ``auto`` choice."""
    from lumos.capture import model_guard
    from lumos.layers import auto_layer, trace_layers

    x = bundle.preprocess([Image.new("RGB", (224, 224), (128, 128, 128))])
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
    "scorecam": {"max_channels": Setting("max_channels", "Score-CAM channels", "int", 32, 4, 256, 4)},
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


def _init_params(method: str) -> set[str]:
    import lumos

    try:
        return set(inspect.signature(lumos.method_class(method).__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def method_settings(method: str) -> list[Setting]:
    """The settings the app offers for ``method`` (only those its constructor accepts)."""
    params = _init_params(method)
    return [s for p, s in KNOWN_SETTINGS.get(method, {}).items() if p in params]


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


def run_method(bundle, image: Image.Image, method: str, target: int | None, layer: str = "auto",
               settings: dict[str, Any] | None = None) -> MethodResult:
    """Explain ``target`` (None = top-1) on ``image`` with ``method`` at ``layer``, through one spec."""
    from lumos.explainer import Explainer, ExplainSpec

    spec = ExplainSpec(methods=(method,), settings={method: dict(settings or {})}, target=target, layer=layer)
    result = Explainer(spec, bundle)([image])
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
    )


def render_result(image: Image.Image, result: MethodResult, colormap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """Drawn as everywhere in lumos (``lumos.render.draw_map``): CAMs and region maps as a heat overlay,
    pixel attributions as saliency at the image's size."""
    from lumos.render import draw_map

    return draw_map(image, result.map, "pixel" if result.pixel else "layer", colormap, alpha)


def feature_grid_image(bundle, image: Image.Image, layer: str = "auto", n: int = 16):
    """(grid image, layer name, channel indices) of the ``n`` most active channels of ``layer``."""
    import lumos
    from lumos.render import feature_grid

    fm = lumos.feature_maps(bundle.model, bundle.preprocess([image]), layer=layer, n=n)
    grid, channels = feature_grid(fm.activations[0], n=n)
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


def deletion_insertion(bundle, image: Image.Image, maps: dict[str, np.ndarray], target: int | None,
                       steps: int = 20) -> dict[str, Curves]:
    """Deletion and insertion curves (``lumos.evaluate``) of each method's map for one image."""
    from lumos.evaluate import Deletion, Insertion

    x = bundle.preprocess([image])
    targets = None if target is None else torch.tensor([target])
    out: dict[str, Curves] = {}
    for name, m in maps.items():
        mt = torch.as_tensor(np.abs(m), dtype=torch.float32)[None]
        d = Deletion(steps=steps, batch_size=16)(bundle.model, x, mt, targets)
        i = Insertion(steps=steps, batch_size=16)(bundle.model, x, mt, targets)
        out[name] = Curves(d.fractions.numpy(), d.curves[0].numpy(), i.curves[0].numpy(),
                           float(d.auc[0]), float(i.auc[0]))
    return out


def curves_figure(curves: dict[str, Curves]):
    """A two-panel matplotlib Figure (not pyplot): deletion and insertion curves per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    for name, c in curves.items():
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
    return re.sub(r"[^A-Za-z0-9_-]+", "_", method.replace("++", "pp"))


def top5_html(top: Sequence[tuple[int, str, float]]) -> str:
    """The top-k table as HTML (class, index, probability and a bar): real DOM text, readable by tests
    and screen readers alike."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(name)}</td><td style='text-align:right'>{idx}</td>"
        f"<td style='text-align:right'>{p:.3f}</td>"
        f"<td style='width:40%'><div style='background:#ff4b4b;height:0.8em;border-radius:3px;"
        f"width:{max(0.0, min(1.0, p)) * 100:.1f}%'></div></td></tr>"
        for idx, name, p in top
    )
    return ("<table data-testid='lumos-top5' style='width:100%'><thead><tr><th>class</th><th>index</th>"
            f"<th>probability</th><th></th></tr></thead><tbody>{rows}</tbody></table>")
