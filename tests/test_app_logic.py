"""The web app's logic: the Streamlit page driven by ``streamlit.testing.v1.AppTest``, plus its plain helpers."""

from __future__ import annotations

import html
import io
import json
import re
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import lumos  # noqa: E402
from lumos.app import SCRIPT, logic  # noqa: E402
from lumos.errors import ImageError  # noqa: E402

CATS = ("Egyptian cat", "tabby", "tiger cat")
TIMEOUT = 180  # generous: the machine is shared; nothing here asserts timings


@pytest.fixture(scope="module")
def cat_jpeg() -> bytes:
    skdata = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py"])  # pytest's own arguments are not the app's


def _app() -> AppTest:
    at = AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def _images(at: AppTest) -> list[str]:
    """Captions of the images on the page."""
    return [img.caption for el in at.get("image") for img in el.proto.imgs]


def _upload(at: AppTest, name: str, data: bytes, mime: str = "image/jpeg") -> AppTest:
    at.file_uploader[0].set_value((name, data, mime))
    at.run()
    return at


def _top5(at: AppTest) -> list[tuple[str, int, float]]:
    """(class, index, probability) rows of the top-5 table; [] when there is none."""
    for md in at.markdown:
        if "lumos-top5" in md.value:
            rows = re.findall(r"<tr><td>(.*?)</td><td[^>]*>(\d+)</td><td[^>]*>([\d.]+)</td>", md.value)
            return [(html.unescape(n), int(i), float(p)) for n, i, p in rows]
    return []


def _target_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Explaining class"))


def test_upload_predicts_and_explains_then_class_and_method_change(cat_jpeg):
    at = _app()
    assert any("Upload an image" in i.value for i in at.info)
    _upload(at, "chelsea.jpg", cat_jpeg)
    assert not at.exception and not at.error
    table = _top5(at)
    assert len(table) == 5 and table[0][0] in CATS
    assert [p for _, _, p in table] == sorted((p for _, _, p in table), reverse=True)
    assert "Explaining class **285: Egyptian cat**" in _target_caption(at)  # top-1 by default
    captions = _images(at)
    assert captions[0] == "original: chelsea.jpg"
    assert any(c.startswith("Grad-CAM @ _act1") for c in captions)
    assert {b.label for b in at.get("download_button")} >= {"PNG", "raw .npy", "Download everything (ZIP)"}

    # another top-5 class in one click
    at.radio[0].set_value(2).run()
    assert not at.exception and not at.error
    assert f"**{table[2][1]}: " in _target_caption(at)

    # any class by searching its name
    espresso = next(n for n in at.selectbox(key="search").options if n.startswith("967:"))
    at.selectbox(key="search").set_value(espresso).run()
    assert "**967: espresso**" in _target_caption(at)
    assert at.radio[0].value is None  # the top-5 choice is cleared while a searched class is shown
    # clicking a top-5 class again clears the search
    at.radio[0].set_value(0).run()
    assert "**285: " in _target_caption(at) and at.selectbox(key="search").value is None

    # change the methods: a second method appears beside Grad-CAM
    second = "guided_backprop" if "guided_backprop" in lumos.methods() else "gradcam++"
    at.multiselect(key="methods").set_value(["gradcam", second]).run()
    assert not at.exception and not at.error
    captions = _images(at)
    assert len(captions) == 3
    assert captions[2].startswith(logic.display_name(second))


def test_corrupt_upload_shows_message_not_exception(cat_jpeg):
    at = _app()
    _upload(at, "broken.jpg", b"this is not an image at all")
    assert not at.exception
    assert len(at.error) == 1
    assert "broken.jpg" in at.error[0].value and "not a recognised image format" in at.error[0].value
    assert not _top5(at)  # nothing else ran

    # a truncated JPEG beside a good one: one message, the good image still works
    at.file_uploader[0].set_value([("cut.jpg", cat_jpeg[: len(cat_jpeg) // 3], "image/jpeg"),
                                   ("ok.jpg", cat_jpeg, "image/jpeg")])
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "cut.jpg" in at.error[0].value
    assert _top5(at)[0][0] in CATS


def test_model_that_fails_to_load_shows_message(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", "--model", "no_such_model"])
    at = AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Could not load the model no_such_model:")
    assert "Traceback" not in at.error[0].value


def test_example_button_feature_maps_and_evaluation():
    at = _app()
    at.button(key="example_chelsea").click().run()
    assert not at.exception and not at.error
    assert _images(at)[0] == "original: chelsea.png"
    at.toggle(key="feature_show").set_value(True).run()
    assert any("top 16 channels" in c for c in _images(at))
    if logic.evaluation_available():
        at.slider(key="eval_steps").set_value(5)
        at.toggle(key="eval_show").set_value(True).run()
        assert not at.exception and not at.error
        aucs = at.dataframe[0].value
        assert list(aucs.columns) == ["method", "deletion AUC", "insertion AUC"]
        assert list(aucs["method"]) == ["Grad-CAM"] and aucs["deletion AUC"].between(0, 1).all()


# ------------------------------------------------------------------------------------ plain helpers


def test_decode_limits_and_formats(monkeypatch):
    with pytest.raises(ImageError, match="empty"):
        logic.decode_image(b"", "e.png")
    monkeypatch.setattr(logic, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(ImageError, match=r"big\.png is .* MB; the limit is"):
        logic.decode_image(b"x" * 101, "big.png")
    monkeypatch.undo()
    monkeypatch.setattr(logic, "MAX_PIXELS", 1000)
    data = logic.png_bytes(Image.new("RGB", (50, 50)))
    with pytest.raises(ImageError, match="50 x 50 pixels"):
        logic.decode_image(data, "wide.png")
    monkeypatch.undo()
    # gif: first frame; large images are shrunk for display
    frames = [Image.new("P", (20, 10), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert logic.decode_image(buf.getvalue(), "a.gif").size == (20, 10)
    big = logic.decode_image(logic.png_bytes(Image.new("RGB", (3000, 1500))), "big.png")
    assert max(big.size) == logic.DISPLAY_MAX_SIDE and big.mode == "RGB"


def test_parse_args_settings_and_command():
    cfg = logic.parse_app_args(["-q", "--model", "pkg.mod:Net", "--size", "64", "--mean", "0.5,0.5,0.5"])
    assert cfg.model == "pkg.mod:Net" and cfg.size == 64 and cfg.mean == (0.5, 0.5, 0.5)
    assert logic.parse_app_args([]).model == "efficientnet_lite0"
    assert [s.param for s in logic.method_settings("scorecam")] == ["max_channels"]
    assert logic.method_settings("gradcam") == []
    if "integrated_gradients" in lumos.methods():
        assert {s.param for s in logic.method_settings("integrated_gradients")} == {"steps", "tolerance", "baseline"}
    assert logic.available_methods()[0] == "gradcam"
    from lumos.cli_app import app_command

    cmd = app_command("efficientnet_lite0", 8765, labels="classes.txt")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(SCRIPT)
    assert "8765" in cmd and cmd[cmd.index("--") + 1:] == ["--model", "efficientnet_lite0", "--labels", "classes.txt"]


def test_cli_registers_app_command():
    from typer.testing import CliRunner

    from lumos.cli import app

    result = CliRunner().invoke(app, ["app", "--help"])
    assert result.exit_code == 0 and "--port" in result.output


def test_zip_holds_everything():
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    res = logic.MethodResult("gradcam++", np.ones((8, 8), np.float32), np.zeros((2, 2), np.float32), 5, 0.5,
                             "_act1", False, {"relu": True})
    pic = logic.render_result(img, res)
    assert pic.size == img.size
    data = logic.build_zip("cat.jpg", img, {"gradcam++": res}, {"gradcam++": pic}, [(5, "five", 0.5)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert names == {"original.png", "gradcampp.png", "gradcampp_map.npy", "gradcampp_raw.npy",
                         "predictions.csv", "settings.json"}
        assert np.load(io.BytesIO(zf.read("gradcampp_raw.npy"))).shape == (2, 2)
        meta = json.loads(zf.read("settings.json"))
        assert meta["methods"]["gradcam++"]["target"] == 5


def test_thread_count():
    assert logic.thread_count(None, 2) == 1
    assert logic.thread_count(None, 16) == 4
    assert logic.thread_count("3", 2) == 3
    assert logic.thread_count("x", None) == 1
