"""The web app's logic: the Streamlit page driven by ``streamlit.testing.v1.AppTest``, plus its plain helpers."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import lumos  # noqa: E402
import lumos.zoo  # noqa: E402
from lumos.app import SCRIPT, logic  # noqa: E402
from lumos.errors import ImageError, LumosError  # noqa: E402

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
            rows = re.findall(r"<tr><td[^>]*>(.*?)</td><td[^>]*>(\d+)</td><td[^>]*>([\d.]+)</td>", md.value)
            return [(html.unescape(n), int(i), float(p)) for n, i, p in rows]
    return []


def _colour_key(at: AppTest) -> str:
    return next(md.value for md in at.markdown if "lumos-colour-key" in md.value)


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
    assert {b.label for b in at.get("download_button")} >= {"PNG", "npy", "Download everything (ZIP)"}

    # another top-5 class in one click
    at.radio[0].set_value(2).run()
    assert not at.exception and not at.error
    assert f"**{table[2][1]}: " in _target_caption(at)

    # any class by searching its name: the best match is explained at once
    at.text_input(key="search").input("espresso").run()
    assert "**967: espresso**" in _target_caption(at)
    assert at.radio[0].value is None  # the top-5 choice is cleared while a searched class is shown
    # clicking a top-5 class again clears the search
    at.radio[0].set_value(0).run()
    assert "**285: " in _target_caption(at) and not at.text_input(key="search").value

    # change the methods: a second method appears beside Grad-CAM
    second = "guided_backprop" if "guided_backprop" in lumos.methods() else "gradcam++"
    at.multiselect(key="methods").set_value(["gradcam", second]).run()
    assert not at.exception and not at.error
    captions = _images(at)
    assert len(captions) == 3
    assert captions[2].startswith(logic.display_name(second))
    assert captions[0] == "original: chelsea.jpg"  # 451 x 300: no note

    # a tiny upload: its caption says the model sees it enlarged to its input size
    _upload(at, "tiny.png", logic.png_bytes(Image.new("RGB", (8, 8), (200, 30, 30))), "image/png")
    assert not at.exception and not at.error
    assert _images(at)[0] == "original: tiny.png (8 x 8 px; the model sees it enlarged to 224 x 224)"


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


def test_example_button_feature_maps_and_enlarge():
    at = _app()
    at.button(key="example_chelsea").click().run()
    assert not at.exception and not at.error
    assert _images(at)[:2] == ["original: chelsea.png", "Grad-CAM @ _act1 for Egyptian cat (285)"]
    # a key to the colours under the maps, in the chosen colormap (jet's top is dark red, viridis's yellow)
    assert _colour_key(at).count("heat maps: low") == 1 and "rgb(128, 0, 0))" in _colour_key(at)
    at.selectbox(key="colormap").set_value("viridis").run()
    assert "rgb(253, 231, 37))" in _colour_key(at) and "grey-scale" not in _colour_key(at)
    at.toggle(key="feature_show").set_value(True).run()
    assert any("top 16 channels" in c for c in _images(at))
    # one map large, beside the original, in a dialog
    at.button(key="big_gradcam").click().run()
    assert not at.exception
    # the dialog's caption names the class too: the large map read on its own says what it explains
    assert _images(at).count("Grad-CAM @ _act1 for Egyptian cat (285)") == 2
    assert _images(at).count("original: chelsea.png") == 2


@pytest.mark.skipif(not logic.evaluation_available(), reason="lumos.evaluate is not installed")
def test_evaluation_runs_only_on_request(monkeypatch):
    """Deletion/insertion cost two curves of forwards per method: not on every class change, only on the button."""
    calls = []
    real = logic.deletion_insertion

    def counted(bundle, image, maps, target, steps=20):
        calls.append((sorted(maps), target, steps))
        return real(bundle, image, maps, target, steps)

    monkeypatch.setattr(logic, "deletion_insertion", counted)
    logic.CURVES.clear()
    at = _app()
    at.button(key="example_chelsea").click().run()
    at.slider(key="eval_steps").set_value(5).run()
    at.radio[0].set_value(1).run()  # class changes: nothing scored
    assert calls == [] and not at.dataframe
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    assert len(calls) == 1 and calls[0][1:] == (_top5(at)[1][1], 5)
    aucs = at.dataframe[0].value
    assert list(aucs.columns) == ["method", "deletion AUC", "insertion AUC"]
    assert list(aucs["method"]) == ["Grad-CAM"] and aucs["deletion AUC"].between(0, 1).all()
    columns = json.loads(at.dataframe[0].proto.columns)  # three decimals, as the plot's legend (not 0.0622 | 0.72)
    assert [columns[c]["type_config"]["format"] for c in ("deletion AUC", "insertion AUC")] == ["%.3f", "%.3f"]
    at.radio[0].set_value(2).run()  # another class: the old curves go, nothing is scored until asked
    assert len(calls) == 1 and not at.dataframe
    assert any("Press the button to score" in c.value for c in at.caption)
    at.radio[0].set_value(1).run()  # back to the scored class: its curves again, from the cache
    assert len(calls) == 1 and len(at.dataframe) == 1


def test_changing_the_layer_recomputes_only_methods_that_use_it(monkeypatch):
    ran = []
    real = logic.run_method

    def counted(bundle, image, method, target, layer="auto", settings=None):
        ran.append(method)
        return real(bundle, image, method, target, layer, settings)

    monkeypatch.setattr(logic, "run_method", counted)
    at = _app()
    at.button(key="example_coffee").click().run()
    pixel = [m for m in ("gradients", "smoothgrad") if m in lumos.methods()]
    at.session_state["set_smoothgrad_n_samples"] = 2  # the fewest samples: the test counts runs, not quality
    at.multiselect(key="methods").set_value(["gradcam", *pixel]).run()
    assert not at.exception and not at.error
    assert set(pixel) <= set(ran)
    ran.clear()
    layer = next(n for n in at.selectbox(key="layer").options[1:] if n != "_act1")  # [0] is "auto (...)"
    at.selectbox(key="layer").set_value(layer).run()
    assert not at.exception and not at.error
    assert ran == ["gradcam"]  # SmoothGrad and gradients ignore the layer: not recomputed
    assert f"Grad-CAM @ {layer} for espresso (967)" in _images(at)
    ran.clear()
    at.selectbox(key="colormap").set_value("viridis").run()  # display only
    at.selectbox(key="layer").set_value("auto").run()  # back: all cached
    assert ran == []


def test_class_search_ranks_whole_words_and_prefixes_first():
    from lumos.zoo import imagenet_labels

    labels = imagenet_labels()
    names = [f"{i}: {labels.full_name(i)}" for i in range(len(labels))]
    found = [int(names[p].split(":")[0]) for p in logic.search_classes(names, "tiger")]
    assert found[:4] == [292, 282, 3, 300]  # tiger, tiger cat, tiger shark, tiger beetle
    assert 147 not in found  # grey whale (Eschrichtius gibbosus: t..i..g..e..r is no match)
    assert [int(names[p].split(":")[0]) for p in logic.search_classes(names, "Tabby ")][0] == 281
    assert logic.search_classes(names, "285")[0] == 285
    assert logic.search_classes(names, "  ") == [] and logic.search_classes(names, "qqqzz") == []

    at = _app()
    at.button(key="example_chelsea").click().run()
    at.text_input(key="search").input("tiger").run()
    assert not at.exception and not at.error
    options = at.selectbox(key="search_pick_tiger").options
    assert [o.split(":")[0] for o in options] == ["292", "282", "3", "300"]
    assert "**292: tiger**" in _target_caption(at)
    at.selectbox(key="search_pick_tiger").select_index(2).run()
    assert "**3: tiger shark**" in _target_caption(at)
    assert "Grad-CAM @ _act1 for tiger shark (3)" in _images(at)  # the map itself says which class it explains


def test_model_choice_in_the_page(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", "--model", "nets:GapNet", "--size", "32"])
    at = AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception and not at.error
    box = at.selectbox(key="model")
    assert box.options[0] == "nets:GapNet (size 32) [command line]"
    assert box.options[1:] == lumos.zoo.models()
    # a CNN: the attention methods are left out of Methods, and a line under it says why
    assert "Attention rollout" not in at.multiselect(key="methods").options
    assert any(c.value.startswith("Not offered (this model has no attention layers): Attention") for c in at.caption)
    at.button(key="example_chelsea").click().run()
    assert not at.exception and not at.error
    assert _top5(at)[0][0].startswith("class ") and any(c.startswith("Grad-CAM @ features") for c in _images(at))
    assert "tiger" not in at.text_input(key="search").placeholder  # the search hint names this model's classes
    box.select_index(1).run()  # the first zoo model
    assert not at.exception and not at.error
    assert _top5(at)[0][0] in CATS and any(c.startswith("Grad-CAM @ _act1") for c in _images(at))
    assert at.text_input(key="search").placeholder == "e.g. tiger, espresso, 285"


# ------------------------------------------------------------------------------------ plain helpers


def test_search_placeholder_names_the_models_own_classes():
    cifar = [f"{i}: {n}" for i, n in enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"])]
    assert logic.search_placeholder(cifar) == "e.g. airplane, automobile, 9"
    assert logic.search_placeholder([f"{i}: class {i}" for i in range(3)]) == "e.g. class 0, class 1, 2"
    assert logic.search_placeholder([]) == ""


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


def test_result_caption_says_when_a_map_is_zero_everywhere():
    def result(values: np.ndarray) -> logic.MethodResult:
        return logic.MethodResult("gradcam", values, values, 3, 0.5, "_act1", False)

    assert logic.result_caption(result(np.ones((4, 4), np.float32))) == "Grad-CAM @ _act1"
    assert logic.result_caption(result(np.ones((4, 4), np.float32)), "tabby") == "Grad-CAM @ _act1 for tabby (3)"
    assert logic.result_caption(result(np.ones((4, 4), np.float32)), "class 3") == "Grad-CAM @ _act1 for class 3"
    blank = logic.result_caption(result(np.zeros((4, 4), np.float32)))
    assert blank.startswith("Grad-CAM @ _act1: zero everywhere, nothing to draw (the exact result")


def test_colour_key_covers_the_kinds_of_map_shown():
    def result(pixel: bool, values) -> logic.MethodResult:
        m = np.asarray(values, np.float32)
        return logic.MethodResult("gradcam", m, m, 3, 0.5, None, pixel)

    heat, grey, signed = result(False, [[0, 1]]), result(True, [[0, 1]]), result(True, [[-1, 1]])
    key = logic.colour_key_html([heat, grey], "jet")
    assert "heat maps: low" in key and "grey-scale maps: low" in key and "signed" not in key
    assert "rgb(0, 0, 128)" in key and "rgb(255, 255, 255))" in key  # jet's bottom, white at the top of grey
    only_signed = logic.colour_key_html([signed])
    assert "against the class" in only_signed and "heat maps" not in only_signed and "grey-scale" not in only_signed
    assert logic.colour_key_html([]) == ""


def test_app_scorecam_settings_default_to_the_library():
    """The app offers Score-CAM's per-image budget with the library's own defaults (not a smaller fixed cap)."""
    import inspect

    params = inspect.signature(lumos.method_class("scorecam").__init__).parameters
    for s in logic.method_settings("scorecam"):
        assert s.default == params[s.param].default, s.param


def test_app_settings_below_the_library_default_say_so():
    """Every app setting either starts at the method constructor's default or names that default in its label
    (RISE starts at 1000 masks in the app, 4000 in the library)."""
    import inspect

    seen = 0
    for method in logic.KNOWN_SETTINGS:
        if method not in lumos.methods():
            continue
        params = inspect.signature(lumos.method_class(method).__init__).parameters
        for s in logic.method_settings(method):
            library = params[s.param].default
            assert (s.default == library) != (f"library default {library}" in s.label), (method, s)
            seen += s.default != library
    assert seen >= 3
    (rise,) = logic.method_settings("rise")
    assert rise.default == 1000 and rise.label == "RISE masks; library default 4000"


def test_parse_args_settings_and_command():
    cfg = logic.parse_app_args(["-q", "--model", "pkg.mod:Net", "--size", "64", "--mean", "0.5,0.5,0.5"])
    assert cfg.model == "pkg.mod:Net" and cfg.size == 64 and cfg.mean == (0.5, 0.5, 0.5)
    assert logic.parse_app_args([]).model == "efficientnet_lite0"
    assert [s.param for s in logic.method_settings("scorecam")] == ["max_channels", "tolerance"]
    assert logic.method_settings("gradcam") == []
    if "integrated_gradients" in lumos.methods():
        assert {s.param for s in logic.method_settings("integrated_gradients")} == {"steps", "tolerance", "baseline"}
    assert logic.available_methods()[0] == "gradcam"
    from lumos.cli_app import app_command

    cmd = app_command("efficientnet_lite0", 8765, labels="classes.txt")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(SCRIPT)
    assert "8765" in cmd and cmd[cmd.index("--") + 1:] == ["--model", "efficientnet_lite0", "--labels", "classes.txt"]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"  # this machine only, unless --host says otherwise
    cmd = app_command("efficientnet_lite0", 8765, host="0.0.0.0", device="cpu")
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0" and cmd[-2:] == ["--device", "cpu"]
    assert logic.parse_app_args(cmd[cmd.index("--") + 1:]).device == "cpu"


def test_cli_passes_host_and_device_to_the_server(monkeypatch):
    from typer.testing import CliRunner

    from lumos.cli import app

    seen = {}

    class Exec(Exception):
        pass

    def fake_execv(path, argv):
        seen["argv"] = argv
        raise Exec

    monkeypatch.setattr(logic, "load_bundle", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr("os.execv", fake_execv)
    monkeypatch.setattr("subprocess.call", lambda argv: fake_execv(None, argv))
    result = CliRunner().invoke(app, ["app", "--host", "0.0.0.0", "--port", "8765", "--device", "cpu"])
    assert isinstance(result.exception, Exec), result.output
    argv = seen["argv"]
    assert argv[argv.index("--server.address") + 1] == "0.0.0.0" and argv[argv.index("--server.port") + 1] == "8765"
    assert seen["config"].device == "cpu"


@pytest.mark.parametrize("device", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device_is_one_line_and_rc_2(tmp_path, device):
    proc = subprocess.run([sys.executable, "-m", "lumos.cli", "app", "--device", device, "--port", "8765"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"--device '{device}'" in lines[0] and "Traceback" not in proc.stderr
    assert "URL" not in proc.stdout


def test_the_app_uses_the_librarys_device_rule():
    from lumos import explainer

    assert logic.resolve_device is explainer.resolve_device and logic.model_device is explainer.model_device
    assert logic.load_bundle(logic.AppConfig(model="nets:GapNet", size=32, device="cpu")).model.fc.weight.is_cpu
    with pytest.raises(LumosError, match="gpu"):
        logic.load_bundle(logic.AppConfig(model="nets:GapNet", size=32, device="gpu"))


def test_count_forwards_reports_progress():
    model = torch.nn.Linear(3, 2)
    reports = []
    with logic.count_forwards(model, lambda n, s: reports.append(n), every=0.0) as count:
        for _ in range(4):
            model(torch.zeros(1, 3))
    model(torch.zeros(1, 3))  # the hook is gone afterwards
    assert count == [4] and reports == [1, 2, 3, 4] and not model._forward_hooks


def test_result_keys_depend_on_the_layer_only_for_layer_methods():
    args = ("model", "hash")
    for m in lumos.methods():
        a = logic.result_key(*args, m, 1, "auto", {})
        b = logic.result_key(*args, m, 1, "_act1", {})
        assert (a != b) == lumos.method_class(m).uses_layer, m
        assert logic.result_key(*args, m, 2, "auto", {}) != a  # the class always matters
    assert logic.result_key(*args, "gradcam", 1, "auto", {"a": 1}) != logic.result_key(*args, "gradcam", 1, "auto", {})


def test_cli_registers_app_command():
    from typer.testing import CliRunner

    from lumos.cli import app

    result = CliRunner().invoke(app, ["app", "--help"])
    assert result.exit_code == 0 and "--port" in result.output


def test_zip_file_names_are_registered_method_names():
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    res = logic.MethodResult("gradcam++", np.ones((8, 8), np.float32), np.zeros((2, 2), np.float32), 5, 0.5,
                             "_act1", False, {"relu": True})
    pic = logic.render_result(img, res)
    assert pic.size == img.size
    results = {m: res for m in lumos.methods()}
    data = logic.build_zip("cat.jpg", img, results, {m: pic for m in results}, [(5, "five", 0.5)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert names == {"original.png", "predictions.csv", "settings.json"} | {
            f"{m}{suffix}" for m in lumos.methods() for suffix in (".png", "_map.npy", "_raw.npy")}
        assert {"gradcam++.png", "gradcam++_map.npy", "gradcam++_raw.npy"} <= names  # not gradcampp
        assert np.load(io.BytesIO(zf.read("gradcam++_raw.npy"))).shape == (2, 2)
        meta = json.loads(zf.read("settings.json"))
        assert meta["methods"]["gradcam++"]["target"] == 5


def test_thread_count():
    assert logic.thread_count(None, 2) == 1
    assert logic.thread_count(None, 16) == 4
    assert logic.thread_count("3", 2) == 3
    assert logic.thread_count("x", None) == 1


def test_the_app_finds_a_model_module_in_the_folder_it_was_started_in(tmp_path, monkeypatch):
    """`lumos app -m appnets:build` from the folder holding appnets.py, as `lumos explain` does."""
    (tmp_path / "appnets.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), "
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "appnets", raising=False)
    bundle = logic.load_bundle(logic.AppConfig(model="appnets:build", size=32, device="cpu"))
    assert isinstance(bundle.model[-1], torch.nn.Linear) and bundle.model[-1].out_features == 3


def test_a_blank_map_has_undefined_curves_said_in_the_legend():
    """Deletion of a constant map is NaN (no ranking): the figure says so instead of an 'AUC nan' line."""
    bundle = logic.load_bundle(logic.AppConfig(model="nets:GapNet", size=32, device="cpu"))
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    curves = logic.deletion_insertion(bundle, image, {"gradcam": np.zeros((32, 32), np.float32), "rise": ramp},
                                      0, steps=4)
    assert not curves["gradcam"].defined and np.isnan(curves["gradcam"].deletion_auc)
    assert curves["rise"].defined and 0 <= curves["rise"].deletion_auc <= 1
    labels = [t.get_text() for t in logic.curves_figure(curves).axes[0].get_legend().get_texts()]
    assert labels[0] == "Grad-CAM (undefined: blank map)" and labels[1].startswith("RISE (AUC 0.")


# ------------------------------------------------------------------------- the page's own wording and labels


def _bundle(model: torch.nn.Module, size: int = 32, labels=None):
    from lumos.preprocess import Preprocess
    from lumos.zoo import ModelBundle

    return ModelBundle(model.eval(), Preprocess(size=size), labels, "test model")


def _no_gap_head() -> torch.nn.Module:
    """Conv -> max pool -> flatten -> linear: no global-average-pooling head, so CAM cannot explain it."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10))


def test_errors_in_the_page_name_its_controls_not_keyword_arguments():
    """CAM on a model without a GAP + linear head: the library says "use method='gradcam' instead" (right for Python);
    the page says which of its own controls to use, and the library's message is unchanged."""
    bundle = _bundle(_no_gap_head())
    with pytest.raises(LumosError, match="use method='gradcam' instead") as err:
        logic.run_method(bundle, Image.new("RGB", (32, 32), (90, 120, 30)), "cam", None)
    shown = logic.describe_error(err.value)
    assert shown.endswith("; choose Grad-CAM in Methods instead.") and "method=" not in shown, shown

    library = [  # the library's hints that can reach the page (lumos.engine, lumos.layers, lumos.targets, ...)
        "Layer '3' outputs 8 maps for 1 image(s), not one per image (e.g. one per region proposal); choose a layer "
        "of the backbone (layer='auto' does).",
        "Layer '3' outputs 8x1x1: one value per channel, no spatial map to show; choose a layer whose output is "
        "larger than 1x1 (layer='auto' picks the last one).",
        "Found no layer with a spatial 4-D output (B x C x H x W, H and W > 1) or token grid; pass layer= explicitly.",
        "Layer '3' outputs 1x7x7x7 and is ambiguous; pass layout= ('nhwc', 'nchw' or a function to B x C x h x w).",
        "The model returns a dict; choose the output to explain with output= one of 'logits', 'aux'.",
        "The model returns a tuple of 2; choose the output to explain with output=<index>.",
        "The model output is a str; pass output= to select a tensor.",
        "The attention has 7 tokens, which form no patch grid for a 64 x 64 input after 0..16 prefix tokens; give "
        "grid=(rows, columns) (and prefix=).",
        "CAM explains classes of the linear head; a callable target needs method='gradcam'.",
    ]
    for message in library:
        shown = logic.app_wording(message)
        assert not re.search(r"(?<![\w-])(?<!--set )(method|layer|layout|output|grid|prefix)=", shown), shown
    assert logic.app_wording(library[0]).endswith("choose a layer of the backbone in Layer (CAM methods) (auto does).")
    assert logic.app_wording(library[2]).endswith("; choose one in Layer (CAM methods).")
    assert logic.app_wording(library[8]).endswith("needs Grad-CAM (in Methods).")
    assert logic.app_wording("Expected numbers, got 'x'.") == "Expected numbers, got 'x'."  # nothing else changes


def test_a_shortfall_caption_names_the_apps_setting_not_the_keyword():
    """Score-CAM stopped at its cap (8 of 16 channels): the caption says "8 masks (Score-CAM most masks)", the
    slider's name, not the constructor's ``max_channels=8``."""
    bundle = _bundle(_no_gap_head())
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    res = logic.run_method(bundle, image, "scorecam", None, "0", {"max_channels": 8, "tolerance": 1e-6})
    assert res.shortfall is not None and "stopped at 8 masks (Score-CAM most masks)" in res.shortfall, res.shortfall
    assert "max_channels" not in res.shortfall and "--set" not in res.shortfall


def test_attention_methods_are_offered_only_for_a_model_with_attention():
    """Rollouts read a transformer's attention: withheld (with the reason) for a CNN, offered for a ViT."""
    from lumos.synthetic.vit import load_tinyvit

    attention = [m for m in lumos.methods() if logic.is_attention_method(m)]
    assert set(attention) == {"rollout", "grad_rollout"}
    cnn = _bundle(_no_gap_head())
    assert not logic.has_attention(cnn)
    offered, withheld = logic.offered_methods(False)
    assert sorted(withheld) == sorted(attention) and not set(attention) & set(offered) and offered[0] == "gradcam"
    assert logic.withheld_note(withheld) == ("Not offered (this model has no attention layers): Attention rollout, "
                                             "Gradient-weighted rollout.")
    vit = _bundle(load_tinyvit(), size=64)
    assert logic.has_attention(vit)
    offered, withheld = logic.offered_methods(True)
    assert set(attention) <= set(offered) and withheld == [] and logic.withheld_note(withheld) == ""
    res = logic.run_method(vit, Image.new("RGB", (64, 64), (200, 40, 40)), "rollout", None)  # and it works there
    assert res.map.shape == (64, 64) and np.any(res.map)


def test_enlargement_note_for_an_image_much_smaller_than_the_model_input():
    """Either side under a quarter of the model's input (224: under 56 px) gets a note; PIL sizes are (width,
    height), Preprocess sizes (height, width)."""
    assert logic.enlargement_note((8, 8), (224, 224)) == " (8 x 8 px; the model sees it enlarged to 224 x 224)"
    assert logic.enlargement_note((300, 40), (224, 224)) == " (300 x 40 px; the model sees it enlarged to 224 x 224)"
    assert logic.enlargement_note((56, 56), (224, 224)) == ""  # a quarter exactly: no note
    assert logic.enlargement_note((451, 300), (224, 224)) == ""
    assert logic.enlargement_note((20, 20), (64, 200)) == " (20 x 20 px; the model sees it enlarged to 200 x 64)"
    assert logic.enlargement_note((8, 8), (32, 32)) == ""  # a small model's input: 8 px is a quarter of 32


def test_bare_integer_layer_names_read_as_layers():
    """An nn.Sequential's layers are named "0", "1", ...: the caption read "Grad-CAM @ 2 for horse (7)"; now
    "Grad-CAM @ layer 2 (MaxPool2d) for horse (7)". Dotted and named layers are unchanged."""
    model = _no_gap_head()
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    res = logic.run_method(_bundle(model), Image.new("RGB", (32, 32), (90, 120, 30)), "gradcam", 7)
    assert res.layer == "2"  # auto: the last spatial layer, the max pool
    assert logic.result_caption(res, cifar[7]) == "Grad-CAM @ layer 2 for horse (7)"  # no model: no class name
    assert logic.result_caption(res, cifar[7], model) == "Grad-CAM @ layer 2 (MaxPool2d) for horse (7)"
    assert logic.layer_label("0", model) == "layer 0 (Conv2d)"
    assert logic.layer_label("features.7", model) == "features.7" and logic.layer_label("_act1") == "_act1"
    both = logic.MethodResult("gradcam", res.map, res.raw, 7, 0.1, "0, 1", False)
    assert logic.result_caption(both, None, model) == "Grad-CAM @ layer 0 (Conv2d), layer 1 (ReLU)"


def test_model_choice_shows_file_names_and_the_full_paths_in_help():
    """A labels file in a deep folder cut the model choice off after "labels /t": the choice and the caption under it
    show the file name; the help tooltip has the path as given."""
    path = "/home/someone/projects/cifar/experiments/2024-05/labels/cifar10_class_names.txt"
    config = logic.AppConfig(model="nets:seq", size=32, labels=path, weights="runs/7/best.pth")
    assert logic.model_label(config, config) == ("nets:seq (weights best.pth; size 32; labels cifar10_class_names.txt)"
                                                 " [command line]")
    assert logic.model_options(config) == ["weights best.pth", "size 32", "labels cifar10_class_names.txt"]
    help_text = logic.model_help(logic.model_choices(config))
    assert f"nets:seq: weights `runs/7/best.pth`; size 32; labels `{path}`" in help_text
    assert logic.model_label(logic.AppConfig()) == "efficientnet_lite0"
    assert logic.model_help([logic.AppConfig()]) == "The command line's model and the zoo models."


def test_a_method_error_names_the_method_once():
    """The slot of a failed method showed 'CAM: CAM needs ...': the library's message already starts with it."""
    bundle = _bundle(_no_gap_head())
    with pytest.raises(LumosError) as err:
        logic.run_method(bundle, Image.new("RGB", (32, 32), (90, 120, 30)), "cam", None)
    line = logic.method_error("cam", logic.describe_error(err.value))
    assert line.startswith("CAM ") and not line.startswith("CAM: CAM")
    assert logic.method_error("gradcam", "Gradients are blocked.") == "Grad-CAM: Gradients are blocked."
