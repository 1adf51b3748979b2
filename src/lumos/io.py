"""Reading images robustly, finding image files, and the bundled sample photos.

:func:`load_image` always returns an 8-bit RGB PIL image or raises :class:`~lumos.errors.ImageError`
with one sentence that names the file and the reason.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lumos.errors import ImageError, LumosError

__all__ = [
    "IMAGE_EXTENSIONS", "load_image", "to_rgb", "find_images", "sample_images", "SAMPLE_NAMES",
    "DEFAULT_MAX_SIDE", "MAX_SIDE_ENV", "default_max_side", "fit_size",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
        ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga",
    }
)

SAMPLE_NAMES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower")

_WHITE = (255, 255, 255)

#: Long-side cap (pixels) for images as lumos loads and draws them; ``LUMOS_MAX_SIDE`` overrides it (0: no cap).
DEFAULT_MAX_SIDE = 4096
MAX_SIDE_ENV = "LUMOS_MAX_SIDE"


def default_max_side() -> int | None:
    """The long-side cap in pixels: ``$LUMOS_MAX_SIDE`` if set (``0`` means no cap), else :data:`DEFAULT_MAX_SIDE`.

    Raises :class:`LumosError` if the variable is not a whole number.
    """
    raw = os.environ.get(MAX_SIDE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_SIDE
    if not raw.isdigit():
        raise LumosError(f"{MAX_SIDE_ENV} must be a whole number of pixels (0 for no cap), got {raw!r}.")
    return int(raw) or None


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` (width, height) scaled down, aspect kept, so its long side is at most ``max_side`` (None: no cap)."""
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` resized (Lanczos) to fit ``max_side``; modes Pillow cannot filter well go to RGB first."""
    size = fit_size(img.size, max_side)
    if size == img.size:
        return img
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = to_rgb(img)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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


def load_image(path: str | os.PathLike[str], *, max_side: int | None = None) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image (EXIF orientation applied, first frame only).

    An image whose long side exceeds ``max_side`` pixels is scaled down to it (aspect kept); JPEGs are
    then decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (``Image.draft``), so a 100-megapixel
    photo never exists at full size in memory. ``max_side=None`` uses :func:`default_max_side`
    (``$LUMOS_MAX_SIDE``, else 4096); ``0`` keeps the full size. Files above Pillow's decompression-bomb
    limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels) are refused; below it Pillow's
    ``DecompressionBombWarning`` is not raised, since the size is capped here.

    Raises :class:`ImageError` naming the file if it is missing, empty, not an image, corrupt, too large,
    unreadable, or in a mode that cannot be converted to RGB.
    """
    p = Path(path)
    if max_side is not None and max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0: no cap), got {max_side}")
    cap = default_max_side() if max_side is None else (max_side or None)
    if not p.exists():
        raise ImageError(f"Image file not found: {p}.", p)
    if p.is_dir():
        raise ImageError(f"Expected an image file but {p} is a directory.", p)
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"Cannot read image {p}: the file is empty.", p)
        with warnings.catch_warnings():  # the size is capped below; DecompressionBombError still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(p)
        with opened as img:
            img.seek(0)
            full_size = img.size
            if cap and img.format == "JPEG" and max(full_size) > cap:
                img.draft(img.mode, fit_size(full_size, cap))  # the decoder scales by 1/2..1/8, staying >= cap
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as exc:  # malformed EXIF must not make a good image unusable
                warnings.warn(f"Ignoring unreadable EXIF orientation in {p}: {exc}", stacklevel=2)
                oriented = img
            if oriented is None:  # in_place semantics in some Pillow versions
                oriented = img
            rgb = to_rgb(_shrink(oriented, cap))
            if rgb is img:
                rgb = img.copy()
            rgb.load()
            if rgb.size != full_size and sorted(rgb.size) != sorted(full_size):
                logger.info("%s is %dx%d pixels; loaded at %dx%d (long side capped at %d px, %s=0 keeps it)",
                            p, *full_size, *rgb.size, cap, MAX_SIDE_ENV)
            return rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"Cannot read image {p}: not a recognised image format.", p) from None
    except PermissionError:
        raise ImageError(f"Cannot read image {p}: permission denied.", p) from None
    except Image.DecompressionBombError as exc:
        reason = str(exc).strip().rstrip(".")
        raise ImageError(f"Cannot read image {p}: it is too large ({reason}).", p) from None
    except ValueError as exc:
        raise ImageError(f"Cannot read image {p}: unsupported image mode or data ({exc}).", p) from None
    except (OSError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise ImageError(f"Cannot read image {p}: the file is corrupt or truncated ({reason}).", p) from None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _dir_key(path: Path) -> tuple[int, int] | str:
    """Identity of the real directory behind ``path`` (links followed): device and inode where the
    platform gives one, else the resolved path."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


_LOOP = "a symbolic link loop (following it never reaches a real file or folder); skipped"
_BROKEN = "a broken symbolic link (its target does not exist); skipped"


def _why(err: OSError) -> str:
    return _LOOP if err.errno == errno.ELOOP else (err.strerror or type(err).__name__).lower()


def _walk(top: Path, add: Callable[[Path], None], problems: list[tuple[Path, str]]) -> int:
    """Walk ``top`` depth-first like ``os.walk`` (each folder's files in sorted order, then its sub-folders),
    following links to folders: each real folder is walked once, a link back to a folder being walked is a
    loop. Unreadable folders, loops and broken links become problems. Returns the number of images met."""
    count = 0
    walked: set[tuple[int, int] | str] = set()
    stack: list[tuple[Path, tuple[tuple[int, int] | str, ...]]] = [(top, ())]
    while stack:
        folder, ancestors = stack.pop()
        try:
            key = _dir_key(folder)
            if key in ancestors:
                problems.append((folder, f"a symbolic link loop (it leads back to {os.path.realpath(folder)}, "
                                         "which is being walked); skipped"))
                continue
            if key in walked:  # a second link to a folder already walked: its images are already in
                continue
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            why = _why(err)
            problems.append((folder, why if why == _LOOP else f"cannot read this folder ({why}); its images were "
                             "skipped"))
            continue
        walked.add(key)
        subfolders = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            path = folder / entry.name
            try:
                is_dir = entry.is_dir()  # follows links; a broken link is not a folder
            except OSError as err:  # e.g. a link loop
                problems.append((path, _why(err)))
                continue
            if is_dir:
                subfolders.append(path)
            elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                count += 1
                if entry.is_symlink() and not entry.is_file():
                    problems.append((path, _BROKEN))
                else:
                    add(path)
        stack.extend((sub, (*ancestors, key)) for sub in reversed(subfolders))
    return count


def find_images(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and directories into a list of image files, plus a list of (path, problem).

    Directories are walked recursively in sorted order, keeping files whose extension is in
    :data:`IMAGE_EXTENSIONS` (case-insensitive) and skipping hidden files and folders. Links to folders
    are followed, each real folder walked once. Files given explicitly are kept whatever their extension,
    so a bad file is reported when it is loaded. Paths that do not exist, directories without any image
    file, folders that cannot be read, symbolic link loops and broken links are returned as problems, so
    nothing is left out silently. Duplicates are dropped, the first occurrence is kept.
    """
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(f: Path) -> None:
        try:
            key = f.resolve()
        except (OSError, RuntimeError) as err:  # RuntimeError: a link loop on Python < 3.13
            problems.append((f, _why(err) if isinstance(err, OSError) else _LOOP))
            return
        if key not in seen:
            seen.add(key)
            found.append(f)

    for raw in paths:
        p = Path(raw)
        is_link = False
        try:
            is_link = p.is_symlink()
            is_dir, exists = p.is_dir(), p.exists()
            if is_link and not exists:
                os.stat(p)  # raises: says whether the link is broken or loops
        except OSError as err:
            why = _why(err)
            problems.append((p, why if why == _LOOP or not is_link else _BROKEN))
            continue
        if is_dir:
            before = len(problems)
            if _walk(p, add, problems) == 0 and len(problems) == before:
                problems.append((p, "no image files found in this directory"))
        elif exists or is_link:
            add(p)
        else:
            problems.append((p, "no such file or directory"))
    return found, list(dict.fromkeys(problems))  # a path given twice is reported once


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
