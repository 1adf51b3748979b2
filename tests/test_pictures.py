"""Pictures people can read: colour scales shared by the maps being compared, captions, colour bars,
galleries that show every class and never clip their text (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

import lumos
from lumos.explanation import Explanation
from lumos.render import (
    ColorScale,
    color_scale,
    draw_map,
    fit_text,
    gallery,
    map_scales,
    overlay,
    picture,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LONG_NAME = "holiday_photos_2023/a_very_long_file_name_from_a_camera_01.jpg"  # 60+ characters, few spaces
LONG_CLASS = "an extraordinarily long class name that would never fit a cell"
assert len(LONG_NAME) >= 60 and len(LONG_CLASS) >= 60


def _photo(w: int = 451, h: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), rng.integers(0, 256, (h, w))], axis=-1)
    return Image.fromarray(img.astype(np.uint8))


def _texts(fig: Figure) -> list[tuple[Text, object]]:
    """Every visible, non-empty text of a drawn figure with its bounding box in pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _outside(fig: Figure) -> list[str]:
    width, height = fig.canvas.get_width_height()
    return [repr(t.get_text()) for t, bb in _texts(fig)
            if bb.x0 < -0.5 or bb.y0 < -0.5 or bb.x1 > width + 0.5 or bb.y1 > height + 0.5]


def _image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colorbars(fig: Figure) -> list:
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def _flat(text: str) -> str:
    return "".join(text.split())


# -- text that fits --------------------------------------------------------------------------------------


def test_fit_text_wraps_breaks_and_shortens():
    wrapped = fit_text(LONG_NAME, 1.5, 10, max_lines=6)
    assert "\n" in wrapped and _flat(wrapped) == _flat(LONG_NAME)  # broken, nothing lost
    short = fit_text(LONG_CLASS * 3, 1.5, 10, max_lines=2)
    assert short.count("\n") == 1 and short.endswith("\u2026")
    assert fit_text("cat 0.87", 3.0, 10) == "cat 0.87"


# -- galleries that never clip ---------------------------------------------------------------------------


def test_gallery_long_image_and_class_names_render_inside_the_figure():
    photo = _photo()
    cells = [[overlay(photo, torch.rand(7, 7)), overlay(photo, torch.rand(7, 7))]]
    fig = gallery([photo], cells, row_titles=[f"{LONG_NAME}: {LONG_CLASS} 0.87"],
                  col_titles=["Grad-CAM", f"Method with a name as long as {LONG_CLASS}"],
                  cell_titles=[[f"{LONG_CLASS} 0.87\npeak 0.44", f"top-1: {LONG_CLASS} 0.87"]],
                  colorbars=[color_scale("shared")], note=f"{LONG_CLASS} {LONG_NAME}", cell_size=2.0)
    assert _outside(fig) == []
    texts = _texts(fig)
    shown = " ".join(_flat(t.get_text()) for t, _ in texts)
    assert _flat(LONG_NAME) in shown and _flat(LONG_CLASS) in shown  # wrapped, not cut
    # no caption or header covers a picture, no header covers a caption
    boxes = [ax.get_window_extent() for ax in _image_axes(fig)]
    for t, bb in texts:
        if t.axes is not None and t.axes.get_label() == "<colorbar>":
            continue
        assert not any(bb.overlaps(box) for box in boxes), t.get_text()
    titles = [bb for t, bb in texts if t in [ax.title for ax in fig.axes]]
    heads = [bb for t, bb in texts if any(t in ax.texts for ax in fig.axes)]
    assert titles and heads
    assert not any(h.overlaps(c) for h in heads for c in titles)


def test_one_image_gallery_keeps_its_headers():
    photo = _photo(300, 451)  # portrait
    fig = gallery([photo], {"Grad-CAM": [overlay(photo, torch.rand(7, 7))]}, row_titles=["one.png: cat 0.9"],
                  cell_titles=[["cat 0.90\npeak 1.2 = top of scale"]], colorbars=color_scale("shared"))
    assert _outside(fig) == []
    shown = [t.get_text() for t, _ in _texts(fig)]
    assert "Grad-CAM" in shown and "image" in shown


def test_row_labels_without_images_are_horizontal_and_inside():
    photo = _photo()
    fig = gallery(None, [[photo], [photo]], row_titles=[LONG_NAME, "b"], col_titles=["Grad-CAM"])
    assert _outside(fig) == []
    boxes = [ax.get_window_extent() for ax in _image_axes(fig)]
    labels = [(t, bb) for t, bb in _texts(fig) if t.axes is None]
    assert len(labels) == 2
    for t, bb in labels:
        assert t.get_rotation() == 0
        assert not any(bb.overlaps(box) for box in boxes)


def test_rows_follow_their_own_aspect_no_blank_bands():
    wide, tall = _photo(451, 300), _photo(200, 400, seed=1)
    fig = gallery([tall, wide], [[tall], [wide]], cell_titles=[["a"], ["b"]])
    axes = _image_axes(fig)
    assert len(axes) == 4
    for ax, pic in zip(axes, [tall, tall, wide, wide], strict=True):
        box = ax.get_position()
        fw, fh = fig.get_size_inches()
        assert box.height * fh / (box.width * fw) == pytest.approx(pic.height / pic.width, rel=0.02)
    gap_in = (axes[0].get_position().y0 - axes[2].get_position().y1) * fig.get_size_inches()[1]
    assert 0 < gap_in < 0.6  # only the next row's caption and a small gap, no band sized for another image


def test_rows_per_image_span_and_validation():
    photo = _photo()
    cells = [[photo], [photo], [photo]]
    fig = gallery([photo], cells, rows_per_image=3, row_titles=["x"])
    assert len(_image_axes(fig)) == 4  # one original + three map rows
    with pytest.raises(ValueError, match="rows"):
        gallery([photo, photo], cells, rows_per_image=2)
    with pytest.raises(ValueError, match="one per image"):
        gallery([photo], cells, rows_per_image=3, row_titles=["a", "b", "c"])


def test_picture_has_caption_and_colorbar_inside(tmp_path):
    photo = _photo(64, 48)
    fig = picture(overlay(photo, torch.rand(7, 7)), f"{LONG_CLASS} 0.00\npeak 0.03 = 3% of espresso's",
                  color_scale("shared"), out=tmp_path / "p.png")
    assert _outside(fig) == []
    assert len(_colorbars(fig)) == 1
    with Image.open(tmp_path / "p.png") as im:
        assert im.width >= 480 and im.height > im.width * 48 / 64  # scaled up to be readable, strip below


# -- scales ------------------------------------------------------------------------------------------------


def _layer_ex(raw: torch.Tensor, classes: list[int], images: list[int], kind: str = "layer") -> Explanation:
    from lumos.explanation import finish_maps

    maps = finish_maps([raw], (16, 16), True, "minmax", "bilinear")
    return Explanation(maps=maps, raw=raw, targets=torch.tensor(classes), scores=torch.zeros(len(classes)),
                       probs=torch.zeros(len(classes)), layer="l", method="m", kind=kind,
                       params={"relu": True, "normalize": "minmax", "upsample": "bilinear"},
                       image_index=torch.tensor(images))


def test_shared_scale_keeps_a_weak_class_weak_and_per_map_does_not():
    strong = torch.rand(4, 4) + 0.5
    ex = _layer_ex(torch.stack([strong, 0.1 * strong, strong]), [5, 7, 5], [0, 0, 1])
    shared = map_scales(ex)
    assert shared[0].top == pytest.approx(shared[0].peak) and shared[0].values.max() == pytest.approx(1.0)
    assert shared[1].values.max() == pytest.approx(0.1, rel=1e-3) and shared[1].relative == pytest.approx(0.1)
    assert shared[1].top_class == 5 and shared[2].values.max() == pytest.approx(1.0)  # image 1 has its own scale
    per_map = map_scales(ex, "per-map")
    assert per_map[1].values.max() == pytest.approx(1.0)
    np.testing.assert_allclose(map_scales(ex, "none")[1].values, ex.maps[1].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="per-map"):
        map_scales(ex, "loud")


def test_reference_top_class_sets_the_scale_and_same_maps_are_marked():
    raw = torch.rand(1, 4, 4)
    ex = _layer_ex(0.05 * raw, [281], [0])
    ref = _layer_ex(raw, [967], [0])
    (s,) = map_scales(ex, reference=ref)
    assert s.top_class == 967 and s.values.max() == pytest.approx(0.05, rel=1e-3) and s.same_as is None
    (same,) = map_scales(_layer_ex(raw.clone(), [281], [0]), reference=ref)
    assert same.same_as == 967  # the method ignored the class: say so
    topk = map_scales(_layer_ex(torch.cat([raw, raw]), [1, 2], [0, 0]))
    assert [t.same_as for t in topk] == [None, 1]


def test_pixel_and_fused_maps():
    raw = torch.randn(2, 3, 8, 8)
    raw[1] = 0.2 * raw[0]
    ex = Explanation(maps=torch.rand(2, 8, 8), raw=raw, targets=torch.tensor([1, 2]), scores=torch.zeros(2),
                     probs=None, layer=None, method="gradients", kind="pixel",
                     params={"reduce": "sum", "normalize": "percentile", "clip": 99.5},
                     image_index=torch.tensor([0, 0]))
    a, b = map_scales(ex)
    assert a.signed and a.values.min() < 0 and b.relative == pytest.approx(0.2, rel=1e-3)
    assert color_scale("shared", "pixel", True).vmin == -1.0
    fused = _layer_ex(torch.rand(1, 4, 4), [1], [0])
    fused.raw = (fused.raw, fused.raw)
    (f,) = map_scales(fused)
    assert f.mode == "per-map" and f.note


def test_draw_map_fixed_range():
    photo = _photo(32, 24)
    half = np.full((24, 32), 0.5, dtype=np.float32)
    fixed = np.asarray(draw_map(photo, half, "layer", alpha=1.0, vmin=0.0, vmax=1.0))
    own = np.asarray(draw_map(photo, half, "layer", alpha=1.0))  # a constant map scaled on its own: lowest colour
    assert not np.array_equal(fixed, own)
    gray = np.asarray(draw_map(photo, half, "pixel", vmin=0.0, vmax=1.0))
    assert abs(int(gray[0, 0, 0]) - 128) <= 1


# -- with the bundled model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    return lumos.load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def samples():
    pytest.importorskip("skimage")
    from lumos.io import sample_images

    return sample_images()


def test_topk3_gallery_has_three_map_rows_per_image(tmp_path, bundle, samples):
    from lumos.explainer import Explainer, ExplainSpec
    from lumos.runner import explain_images, gallery_figure, write_gallery

    explainer = Explainer(ExplainSpec(methods=("gradcam", "eigencam"), target="topk:3"), bundle)
    photos = [(name, samples[name].resize((160, 107))) for name in ("chelsea", "coffee")]
    report = explain_images(explainer, photos, out=tmp_path)
    write_gallery(report, tmp_path / "gallery.png", ["gradcam", "eigencam"])
    fig = gallery_figure(report, ["gradcam", "eigencam"])  # what write_gallery saved
    axes = _image_axes(fig)
    assert len(axes) == 2 * (1 + 3 * 2)  # per image: the original and 3 rows x 2 methods
    rows = sorted({round(ax.get_position().y1, 4) for ax in axes}, reverse=True)
    assert len(rows) == 6  # 3 map rows per image
    assert _colorbars(fig) and _outside(fig) == []
    captions = report.results[0].captions
    assert [c.split(":")[0] for c in captions["gradcam"]] == ["top-1", "top-2", "top-3"]
    assert all("ignores the class" in c for c in captions["eigencam"][1:])
    assert any("Eigen-CAM ignores the class" in t.get_text() for t, _ in _texts(fig))
    top = report.results[0].classes["gradcam"]
    slug = "-".join(bundle.labels[top[1]].split())
    assert (tmp_path / f"chelsea_gradcam_top2_{slug}.png").is_file()
    with Image.open(tmp_path / "gallery.png") as im:
        assert im.height > im.width  # 6 rows of maps, 3 columns


def test_tabby_on_espresso_is_drawn_on_the_espresso_scale(tmp_path, bundle, samples):
    from lumos.explainer import Explainer, ExplainSpec
    from lumos.runner import explain_images, gallery_figure

    coffee = samples["coffee"]
    tabby = explain_images(Explainer(ExplainSpec(methods=("gradcam",), target="tabby cat"), bundle),
                           [("coffee", coffee)], out=tmp_path, captions=True)
    top = explain_images(Explainer(ExplainSpec(methods=("gradcam",)), bundle), [("coffee", coffee)])
    res, best = tabby.results[0], top.results[0]
    assert best.prediction.top[0][1] == "espresso"
    caption = res.captions["gradcam"][0]
    name, prob = caption.splitlines()[0].rsplit(" ", 1)
    assert name == bundle.labels[281] and float(prob) == pytest.approx(0.0, abs=0.005)
    assert "of espresso's" in caption
    s, ref = res.scales["gradcam"][0], best.scales["gradcam"][0]
    assert s.mode == "shared" and s.top_class == 967
    assert s.top == pytest.approx(ref.peak, rel=1e-4)  # the colour range is the top class's
    assert s.values.max() == pytest.approx(s.peak / ref.peak, rel=1e-3) and s.values.max() < 0.2
    assert ref.values.max() == pytest.approx(1.0)
    # the same map on its own scale would be drawn at full strength
    with_own = explain_images(Explainer(ExplainSpec(methods=("gradcam",), target="tabby cat"), bundle),
                              [("coffee", coffee)], scale="per-map")
    assert with_own.results[0].scales["gradcam"][0].values.max() == pytest.approx(1.0)
    red = lambda im: float(np.asarray(im, dtype=np.float32)[..., 0].mean())  # noqa: E731
    assert red(res.overlays["gradcam"][0]) < red(with_own.results[0].overlays["gradcam"][0]) - 5
    # the written picture carries its caption and colour bar
    with Image.open(tmp_path / "coffee_gradcam.png") as im:
        assert im.height > coffee.height * im.width / coffee.width
    fig = gallery_figure(tabby, ["gradcam"])
    (bar,) = _colorbars(fig)
    assert bar._colorbar.mappable.get_clim() == (0.0, 1.0)
    shown = [t.get_text() for t, _ in _texts(fig)]
    assert any(t.startswith(f"{bundle.labels[281]} 0.00") for t in shown)
    assert any(t.startswith("top class: espresso 0.90") for t in shown)  # the top class beside it, same scale
    assert len(_image_axes(fig)) == 3


def test_colorscale_is_a_plain_record():
    bar = ColorScale("jet", 0.0, 1.0, "x")
    assert bar.ticks is None and color_scale("per-map").label.startswith("colour")


def test_gallery_row_titles_keep_the_shortest_distinct_path_ending():
    """Long paths would wrap over several lines above a small cell; each row keeps only the ending that tells
    it apart from the other rows (the full path stays in the CLI's output lines)."""
    from lumos.runner import short_names

    assert short_names(["/data/photos/val/cat.png", "/data/photos/val/dog.png"]) == ["cat.png", "dog.png"]
    assert short_names(["/a/x/cat.png", "/b/x/cat.png", "bird.png"]) == ["a/x/cat.png", "b/x/cat.png", "bird.png"]
    assert short_names(["cat.png"]) == ["cat.png"]
