"""Reading images robustly, finding image files, and the bundled sample photos.

:func:`load_image` always returns an 8-bit RGB PIL image or raises :class:`~lumos.errors.ImageError`
with one sentence that names the file and the reason.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lumos.errors import ImageError, LumosError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "to_rgb", "find_images", "sample_images", "SAMPLE_NAMES"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
        ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga",
    }
)

SAMPLE_NAMES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower")

_WHITE = (255, 255, 255)


def _scale_to_uint8(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Scale a numeric array to uint8: by ``full_scale`` if given and it fits, else min-max."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if full_scale is not None and lo >= 0 and hi <= full_scale:
        scaled = arr / full_scale * 255.0
    elif hi > lo:
        scaled = (arr - lo) / (hi - lo) * 255.0
    else:
        scaled = np.zeros_like(arr)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB.

    Grayscale is replicated to three channels; 16-bit images (``I;16*``, and ``I`` with values in
    0..65535) are scaled by 255/65535 so proportions are kept; other integer and float images are
    scaled from [0, 1] (floats) or stretched min-max; transparency (RGBA, LA, palette with a
    transparent colour) is composited over white; CMYK and YCbCr are converted by Pillow.
    Raises ``ValueError`` for a mode that cannot be converted.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L", "CMYK", "YCbCr", "HSV"):
        return img.convert("RGB")
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            img = img.convert("RGBA")
        return _composite_on_white(img)
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), "L").convert("RGB")
    if mode == "I":
        arr = np.asarray(img)
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img)
        return Image.fromarray(_scale_to_uint8(arr, 1.0), "L").convert("RGB")
    return img.convert("RGB")  # e.g. LAB; Pillow raises ValueError if it cannot


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image (EXIF orientation applied, first frame only).

    Raises :class:`ImageError` naming the file if it is missing, empty, not an image, corrupt,
    unreadable, or in a mode that cannot be converted to RGB.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"Image file not found: {p}.", p)
    if p.is_dir():
        raise ImageError(f"Expected an image file but {p} is a directory.", p)
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"Cannot read image {p}: the file is empty.", p)
        with Image.open(p) as img:
            img.seek(0)
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as exc:  # malformed EXIF must not make a good image unusable
                warnings.warn(f"Ignoring unreadable EXIF orientation in {p}: {exc}", stacklevel=2)
                oriented = img
            if oriented is None:  # in_place semantics in some Pillow versions
                oriented = img
            rgb = to_rgb(oriented)
            if rgb is img:
                rgb = img.copy()
            rgb.load()
            return rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"Cannot read image {p}: not a recognised image format.", p) from None
    except PermissionError:
        raise ImageError(f"Cannot read image {p}: permission denied.", p) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"Cannot read image {p}: it is too large ({exc}).", p) from None
    except ValueError as exc:
        raise ImageError(f"Cannot read image {p}: unsupported image mode or data ({exc}).", p) from None
    except (OSError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise ImageError(f"Cannot read image {p}: the file is corrupt or truncated ({reason}).", p) from None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and directories into a list of image files, plus a list of (path, problem).

    Directories are walked recursively in sorted order, keeping files whose extension is in
    :data:`IMAGE_EXTENSIONS` (case-insensitive) and skipping hidden files and folders. Files given
    explicitly are kept whatever their extension, so a bad file is reported when it is loaded. Paths
    that do not exist, and directories without any image file, are returned as problems. Duplicates
    are dropped, the first occurrence is kept.
    """
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(f: Path) -> None:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            found.append(f)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            before = len(found)
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
                for name in sorted(files):
                    if not _is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        add(Path(root) / name)
            if len(found) == before:
                problems.append((p, "no image files found in this directory"))
        elif p.exists():
            add(p)
        else:
            problems.append((p, "no such file or directory"))
    return found, problems


def sample_images() -> dict[str, Image.Image]:
    """Natural test photos shipped with scikit-image and scikit-learn, as RGB PIL images.

    Keys: ``chelsea`` (a cat), ``coffee`` (espresso), ``astronaut``, ``rocket`` (scikit-image) and
    ``china`` (a temple), ``flower`` (scikit-learn). Nothing is downloaded.
    """
    try:
        import skimage.data as skdata
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise LumosError(
            f"The sample images need scikit-image and scikit-learn ({exc.name} is missing); "
            "install them with: pip install 'lumos[samples]'"
        ) from None
    out: dict[str, Image.Image] = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        out[name] = Image.fromarray(np.ascontiguousarray(getattr(skdata, name)())).convert("RGB")
    bunch = load_sample_images()
    for filename, arr in zip(bunch.filenames, bunch.images, strict=True):
        out[Path(filename).stem] = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    missing = [n for n in SAMPLE_NAMES if n not in out]
    if missing:
        logger.warning("Sample images missing from the installed packages: %s", ", ".join(missing))
    return {n: out[n] for n in SAMPLE_NAMES if n in out}
