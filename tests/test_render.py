"""Tests for lumos.render."""

from __future__ import annotations

import sys

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from lumos.render import (
    colorize,
    feature_grid,
    gallery,
    grayscale_map_image,
    overlay,
    save_png,
    signed_map_image,
    to_numpy_map,
    to_pil_image,
    top_channels,
)


@pytest.fixture
def photo() -> np.ndarray:
    """A non-square 451x300 (WxH) RGB uint8 image with structure."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:451]
    img = np.stack([xx * 255 // 450, yy * 255 // 299, rng.integers(0, 256, (300, 451))], axis=-1)
    return img.astype(np.uint8)


def cmap_bytes(name: str, x) -> np.ndarray:
    return np.asarray(matplotlib.colormaps[name](x, bytes=True))[..., :3]


# --- maps -----------------------------------------------------------------------------------------


def test_to_numpy_map_accepts_grad_tensor_and_squeezes():
    t = torch.rand(1, 1, 5, 6, requires_grad=True) * 2  # non-leaf with grad history
    m = to_numpy_map(t)
    assert m.shape == (5, 6) and m.dtype == np.float32
    np.testing.assert_allclose(m, t.detach().numpy()[0, 0])


def test_to_numpy_map_rejects_batch_of_maps():
    with pytest.raises(ValueError, match=r"maps\[0\]"):
        to_numpy_map(np.zeros((4, 7, 7)))


def test_to_numpy_map_half_precision_and_nan():
    m = to_numpy_map(torch.ones(3, 3, dtype=torch.bfloat16))
    assert m.dtype == np.float32
    with pytest.warns(UserWarning, match="NaN"):
        m = to_numpy_map(np.array([[np.nan, 1.0], [np.inf, -np.inf]]))
    np.testing.assert_array_equal(m, [[0.0, 1.0], [1.0, 1.0]])


def test_colorize_ramp_matches_matplotlib():
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :].repeat(3, axis=0)
    for name in ("jet", "viridis", "magma"):
        got = colorize(ramp, name)
        assert got.shape == (3, 256, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[0], cmap_bytes(name, ramp[0]))
    # ends of the ramp are the ends of the colormap
    got = colorize(ramp, "jet")
    np.testing.assert_array_equal(got[0, 0], cmap_bytes("jet", 0.0))
    np.testing.assert_array_equal(got[0, -1], cmap_bytes("jet", 1.0))


def test_colorize_scales_by_min_max_unless_vmin_vmax_given():
    m = np.array([[2.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(colorize(m, "viridis"), colorize(np.array([[0.0, 1.0]]), "viridis"))
    fixed = colorize(m, "viridis", vmin=0.0, vmax=8.0)
    np.testing.assert_array_equal(fixed[0], cmap_bytes("viridis", np.array([0.25, 0.5])))


def test_colorize_constant_map_is_finite_zero_colour():
    for value in (0.0, 0.3, 7.0):
        out = colorize(torch.full((4, 5), value), "jet")
        assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
        np.testing.assert_array_equal(out, np.broadcast_to(cmap_bytes("jet", 0.0), (4, 5, 3)))
    assert np.isfinite(np.asarray(grayscale_map_image(np.full((3, 3), 2.0)), dtype=float)).all()


def test_unknown_colormap_message():
    with pytest.raises(ValueError) as err:
        colorize(np.zeros((2, 2)), "viridiss")
    msg = str(err.value)
    assert "\n" not in msg and "'viridiss'" in msg and "viridis" in msg and "jet" in msg
    with pytest.raises(ValueError, match="unknown colormap"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 2)), colormap="nope")


# --- overlay --------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_shape", [(7, 7), (224, 224), (300, 451)])
def test_overlay_keeps_original_size(photo, map_shape):
    out = overlay(photo, torch.rand(*map_shape), alpha=0.4)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.size == (451, 300)


def test_overlay_alpha_extremes_exact(photo):
    m = torch.rand(7, 7, requires_grad=True)
    assert np.array_equal(np.asarray(overlay(photo, m, alpha=0.0)), photo)
    # alpha=1: exactly the colormap colours of the (normalised, resized) map
    big = np.linspace(0, 1, 300 * 451, dtype=np.float32).reshape(300, 451)
    heat = np.asarray(overlay(Image.fromarray(photo), big, colormap="viridis", alpha=1.0))
    np.testing.assert_array_equal(heat, cmap_bytes("viridis", big))
    # and every alpha=1 pixel of a small map is a colour of the colormap
    lut = {tuple(c) for c in cmap_bytes("jet", np.linspace(0, 1, 256))}
    pixels = np.asarray(overlay(photo, m, alpha=1.0)).reshape(-1, 3)
    assert {tuple(p) for p in pixels} <= lut


def test_overlay_blends_linearly(photo):
    m = np.ones((7, 7))  # constant -> colour at 0 everywhere
    out = np.asarray(overlay(photo, m, colormap="jet", alpha=0.5)).astype(float)
    expected = 0.5 * photo + 0.5 * cmap_bytes("jet", 0.0)
    assert np.abs(out - expected).max() <= 0.5 + 1e-6


def test_overlay_accepts_float_and_chw_images(photo):
    as_float = photo.astype(np.float32) / 255.0
    a = np.asarray(overlay(as_float, np.zeros((7, 7)), alpha=0.0))
    np.testing.assert_array_equal(a, photo)
    chw = torch.from_numpy(as_float).permute(2, 0, 1)
    assert overlay(chw, np.zeros((7, 7))).size == (451, 300)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_overlay_rejects_bad_alpha(photo, alpha):
    with pytest.raises(ValueError, match="alpha"):
        overlay(photo, np.zeros((7, 7)), alpha=alpha)


def test_image_normalised_float_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pil_image(np.full((4, 4, 3), -1.5, dtype=np.float32))


# --- signed / grayscale ---------------------------------------------------------------------------


def test_signed_map_zero_is_centre_and_signs_opposite_ends():
    m = torch.tensor([[0.0, 2.0, -2.0, 1.0]], requires_grad=True)
    px = np.asarray(signed_map_image(m, "bwr"))[0]
    np.testing.assert_array_equal(px[0], cmap_bytes("bwr", 0.5))
    np.testing.assert_array_equal(px[1], cmap_bytes("bwr", 1.0))
    np.testing.assert_array_equal(px[2], cmap_bytes("bwr", 0.0))
    assert px[1][0] > 200 and px[1][2] < 50  # positive -> red
    assert px[2][2] > 200 and px[2][0] < 50  # negative -> blue


def test_signed_map_symmetric_when_only_positive():
    # a purely positive map must not stretch its minimum to the blue end
    px = np.asarray(signed_map_image(np.array([[0.0, 1.0]]), "bwr"))[0]
    np.testing.assert_array_equal(px[0], cmap_bytes("bwr", 0.5))
    outlier = np.asarray(signed_map_image(np.array([[-1.0] + [0.0] * 98 + [50.0]]), clip_percentile=98))
    np.testing.assert_array_equal(outlier[0, 0], cmap_bytes("bwr", 0.0))
    zeros = np.asarray(signed_map_image(np.zeros((2, 2)), "bwr"))
    assert (zeros == cmap_bytes("bwr", 0.5)).all()


def test_grayscale_map_image():
    img = grayscale_map_image(np.array([[-4.0, 0.0, 4.0]]))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img)[0], [0, 128, 255])
    absolute = grayscale_map_image(np.array([[-4.0, 0.0, 4.0]]), absolute=True)
    np.testing.assert_array_equal(np.asarray(absolute)[0], [255, 0, 255])
    clipped = grayscale_map_image(np.array([[0.0] * 98 + [1.0, 100.0]]), clip_percentile=98)
    assert np.asarray(clipped)[0, -2] == 255  # an outlier no longer washes the rest out
    assert grayscale_map_image(torch.rand(7, 7), size=(451, 300)).size == (451, 300)


# --- feature grid ---------------------------------------------------------------------------------


def test_top_channels_and_feature_grid_pick_highest_mean():
    rng = np.random.default_rng(1)
    acts = rng.random((32, 7, 7)).astype(np.float32)  # means ~0.5
    expected = [9, 3, 27, 14]
    for rank, ch in enumerate(expected):
        acts[ch] += 10.0 - rank  # distinct, known ordering
    acts[5] -= 5.0
    assert top_channels(acts, 4) == expected
    image, chosen = feature_grid(torch.from_numpy(acts).unsqueeze(0), n=4, cols=2)
    assert chosen == expected
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert top_channels(acts, 100)[-1] == 5 and len(top_channels(acts, 100)) == 32


def test_feature_grid_layout_and_constant_channel(tmp_path):
    acts = torch.zeros(6, 4, 4)
    acts[2] = 1.0  # constant channel: normalised individually, must not produce NaN
    img, chosen = feature_grid(acts, n=6, cols=3, titles=False, out=tmp_path / "sub" / "grid.png")
    assert chosen[0] == 2
    assert img.width > img.height
    assert Image.open(tmp_path / "sub" / "grid.png").size == img.size


# --- gallery --------------------------------------------------------------------------------------


def test_gallery_writes_png_with_expected_aspect(tmp_path, photo):
    rows = [Image.fromarray(photo), Image.fromarray(photo[::-1].copy())]
    cols = {
        "Grad-CAM": [overlay(r, torch.rand(7, 7)) for r in rows],
        "Saliency": [grayscale_map_image(torch.rand(300, 451)) for r in rows],
    }
    out = tmp_path / "deep" / "dir" / "gallery.png"
    fig = gallery(rows, cols, row_titles=["a", "b"],
                  cell_titles=[["tabby cat 0.87", "tabby cat 0.87"], ["x", "y"]], out=out)
    assert isinstance(fig, Figure)
    with Image.open(out) as png:
        png.load()
        w, h = png.size
    assert w > h  # 2 rows x 3 columns of landscape cells
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]
    assert {"Grad-CAM", "Saliency", "image", "tabby cat 0.87"} <= set(texts)
    assert len(fig.axes) == 6


def test_gallery_list_of_lists_and_title_lengths(photo):
    cells = [[photo, photo], [photo, photo]]
    fig = gallery([photo, photo], cells, col_titles=["input", "A", "B"])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "A", "B"]
    with pytest.raises(ValueError, match="col_titles"):
        gallery([photo, photo], cells, col_titles=["only one"])
    with pytest.raises(ValueError, match="rows"):
        gallery([photo], cells)


def test_render_does_not_touch_pyplot(tmp_path, photo):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    gallery([photo], [[photo]], out=tmp_path / "g.png")
    feature_grid(torch.rand(4, 3, 3), n=2)
    assert plt.get_fignums() == before
    assert "lumos.render" in sys.modules


def test_save_png_makes_dirs(tmp_path, photo):
    p = save_png(photo, tmp_path / "a" / "b" / "x.png")
    assert Image.open(p).size == (451, 300)
