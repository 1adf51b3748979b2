"""load_image conversions and errors, find_images, Preprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lumos.errors import ImageError, LumosError
from lumos.io import IMAGE_EXTENSIONS, find_images, load_image
from lumos.preprocess import Preprocess


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_grayscale(tmp_path):
    arr = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    out = _rgb(load_image(tmp_path / "g.png"))
    assert out.shape == (4, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_rgba_composited_over_white(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 0)  # fully transparent
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = _rgb(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 2 for v in out[1, 0])


def test_la_composited_over_white(tmp_path):
    img = Image.new("LA", (2, 1), (0, 0))
    img.save(tmp_path / "la.png")
    assert _rgb(load_image(tmp_path / "la.png")).tolist() == [[[255, 255, 255]] * 2]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = _rgb(load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert out[0, 1].tolist() == [0, 255, 0]


def test_16bit_scaled_proportionally(tmp_path):
    arr = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = _rgb(load_image(tmp_path / "deep.png"))[0, :, 0].astype(int)
    np.testing.assert_allclose(out, np.round(arr[0] / 65535 * 255), atol=1)
    assert out[0] == 0 and out[-1] == 255 and 120 < out[2] < 135


def test_16bit_tiff_not_all_white(tmp_path):
    arr = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    out = _rgb(load_image(tmp_path / "deep.tif"))[..., 0]
    assert out.min() == 0 and out.max() < 255 and len(np.unique(out)) > 32


def test_cmyk(tmp_path):
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out = _rgb(load_image(tmp_path / "c.jpg")).astype(int)
    assert out.shape == (2, 3, 3)
    r, g, b = out[0, 0]
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full -> red


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # landscape, red block at the top-left
    arr[:10, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = _rgb(load_image(tmp_path / "rot.jpg")).astype(int)
    assert out.shape == (40, 20, 3)  # width and height swapped
    # after a clockwise turn the former top-left lands at the top-right
    assert out[5, 15, 0] > 200 and out[5, 15, 1] < 60
    assert out[5, 5, 0] < 60
    assert out[35, 15, 0] < 60


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    out = _rgb(load_image(tmp_path / "anim.gif"))
    assert out[0, 0].tolist() == [255, 0, 0]


def test_webp(tmp_path):
    from PIL import features

    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    Image.new("RGBA", (5, 3), (0, 128, 0, 255)).save(tmp_path / "w.webp", lossless=True)
    out = _rgb(load_image(tmp_path / "w.webp"))
    assert out.shape == (3, 5, 3) and out[1, 1].tolist() == [0, 128, 0]


def test_bilevel_and_float(tmp_path):
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    assert _rgb(load_image(tmp_path / "b.png")).min() == 255
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert _rgb(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty"),
        ("notes.jpg", b"these are not pixels\n" * 10, "not a recognised image format"),
        ("garbage.bin", bytes(range(256)) * 4, "not a recognised image format"),
    ],
)
def test_bad_files_raise_image_error(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert name in str(info.value) and info.value.path == path
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LumosError)


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png.*corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_find_images_walks_directories(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "empty").mkdir()
    for rel in ["z.png", "a.JPG", "b/deep/c.webp", "b/x.gif", ".hidden/h.png", "notes.txt", "b/readme.md"]:
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    found, problems = find_images([tmp_path, explicit, tmp_path / "missing.png", tmp_path / "empty"])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.JPG", "z.png", "b/x.gif", "b/deep/c.webp", "notes.txt"]
    assert [(p.name, why) for p, why in problems] == [
        ("missing.png", "no such file or directory"),
        ("empty", "no image files found in this directory"),
    ]
    assert {".jpg", ".png", ".webp", ".tif"} <= IMAGE_EXTENSIONS
    # the explicit file given twice is kept once
    found2, _ = find_images([explicit, str(explicit)])
    assert found2 == [explicit]


def test_sample_images():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from lumos.io import sample_images

    imgs = sample_images()
    assert list(imgs) == ["chelsea", "coffee", "astronaut", "rocket", "china", "flower"]
    assert all(im.mode == "RGB" for im in imgs.values())
    assert imgs["china"].size == (640, 427)


def test_sample_images_without_extras(monkeypatch):
    import sys

    from lumos.io import sample_images

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(LumosError, match=r"pip install 'lumos\[samples\]'"):
        sample_images()


# ----------------------------------------------------------------------------------------- preprocess


def test_preprocess_resizes_whole_image_and_normalises():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :150] = 255  # left half white
    pre = Preprocess((32, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="nearest")
    x = pre(Image.fromarray(arr))
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    # no crop: the left half of the input is the left half of the original
    assert torch.all(x[..., :24] == 1.0) and torch.all(x[..., 24:] == -1.0)
    back = pre.denormalize(x)
    assert back.min() >= 0 and back.max() <= 1
    torch.testing.assert_close(back[0, :, 0, 0], torch.ones(3))
    assert pre.denormalize(x[0]).shape == (3, 32, 48)


def test_preprocess_inputs():
    pre = Preprocess(16)
    gray = np.full((10, 20), 128, np.uint8)
    imgs = [Image.new("RGB", (30, 10), (255, 0, 0)), np.zeros((5, 5, 3), np.uint8), gray]
    x = pre(imgs)
    assert x.shape == (3, 3, 16, 16)
    expected_red = (1 - 0.485) / 0.229
    assert abs(float(x[0, 0, 0, 0]) - expected_red) < 1e-5
    assert pre(np.zeros((8, 8, 3), np.uint8)).shape == (1, 3, 16, 16)
    with pytest.raises(LumosError):
        pre(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(LumosError):
        Preprocess(resize="fancy")
    with pytest.raises(LumosError):
        Preprocess(size=0)
