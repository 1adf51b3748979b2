"""The ``lumos`` command line, run in-process through ``lumos.cli.main`` (and once as the installed script).

Small generated images (64 x 48) and the bundled model keep this fast; Score-CAM runs once on one image.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lumos
from cli_run import run_cli as _run
from lumos import cli

W, H = 64, 48
ESC = "\x1b"


pytestmark = pytest.mark.usefixtures("one_thread")


def _rgb(seed: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")




def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of good images in many modes (one in a subfolder) plus a non-image file that is skipped."""
    d = tmp_path_factory.mktemp("photos")
    _rgb(1).save(d / "rgb.png")
    _rgb(2).convert("L").save(d / "gray.png")
    rgba = _rgb(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    _rgb(4).convert("P").save(d / "palette.png")
    Image.fromarray((np.random.default_rng(5).random((H, W)) * 65535).astype(np.uint16)).save(d / "deep16.png")
    _rgb(6).convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 60 x 40, shown 40 x 60
    _rgb(7, (60, 40)).save(d / "rotated.jpg", exif=exif.tobytes())
    (d / "sub").mkdir()
    _rgb(8).save(d / "sub" / "nested.jpg")
    (d / "readme.txt").write_text("not an image")
    return d


EXPECTED_SIZES = {
    "rgb": (W, H), "gray": (W, H), "rgba": (W, H), "palette": (W, H), "deep16": (W, H), "cmyk": (W, H),
    "rotated": (40, 60), "nested": (W, H),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    buf = io.BytesIO()
    _rgb(9).save(buf, "PNG")
    files = {
        "corrupt": d / "corrupt.png",
        "empty": d / "empty.jpg",
        "unsupported": d / "notes.txt",
        "unreadable": d / "locked.png",
    }
    files["corrupt"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["empty"].write_bytes(b"")
    files["unsupported"].write_text("hello")
    _rgb(10).save(files["unreadable"])
    os.chmod(files["unreadable"], 0)
    return files


@pytest.fixture
def one_image(tmp_path) -> Path:
    path = tmp_path / "one.png"
    _rgb(11).save(path)
    return path


# ------------------------------------------------------------------------------------------- listings


def test_methods_lists_every_method_on_one_line_each(capsys):
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    for name in ("cam", "gradcam", "gradcam++", "scorecam", "layercam", "eigencam", "xgradcam", "hirescam"):
        assert any(line.split()[0] == name for line in lines), name
    assert len(lines) == len(lumos.methods())  # one line each: no wrapped descriptions


def test_models_lists_the_bundled_model(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    assert out.split() == ["efficientnet_lite0"]


def test_layers_shows_shapes_and_marks_auto(capsys):
    code, out, _ = _run(capsys, "layers", "--model", "efficientnet_lite0")
    assert code == 0
    act1 = [line for line in out.splitlines() if line.split()[0] == "_act1"]
    assert len(act1) == 1
    assert "1280x7x7" in act1[0] and "auto" in act1[0]
    assert sum("auto" in line for line in out.splitlines()) == 1
    assert any(line.startswith("_conv_stem") for line in out.splitlines())


# ------------------------------------------------------------------------------------------- explain


def test_explain_walks_folders_converts_modes_and_reports_bad_files(capsys, monkeypatch, tmp_path, photos, bad):
    if os.access(bad["unreadable"], os.R_OK):  # root reads anything: make the permission error happen anyway
        real_open = Image.open

        def guarded_open(fp, *args, **kwargs):
            if Path(str(fp)).name == bad["unreadable"].name:
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", guarded_open)
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "explain", photos, *bad.values(), "--out", out_dir)
    assert code != 0

    errors = _error_lines(err)
    assert len(errors) == len(bad), err
    for path in bad.values():
        assert sum(path.name in line for line in errors) == 1, (path.name, errors)
    assert "permission denied" in next(line for line in errors if bad["unreadable"].name in line)
    assert "empty" in next(line for line in errors if bad["empty"].name in line)

    # every good image: one prediction line with the top-3, and an overlay of the ORIGINAL size
    for stem, size in EXPECTED_SIZES.items():
        pred = [line for line in out.splitlines() if Path(line.split(":")[0]).stem == stem]
        assert len(pred) == 1, (stem, out)
        assert len(pred[0].split(":", 1)[1].split(",")) == 3
        with Image.open(out_dir / f"{stem}_gradcam.png") as im:
            assert im.size == size, stem
            assert im.mode == "RGB"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{s}_gradcam.png" for s in EXPECTED_SIZES)
    summary = out.splitlines()[-1]
    assert summary.startswith("Explained 8 image(s) with 1 method(s)")
    assert f"{len(bad)} failed" in summary


def test_topk_npy_gallery_and_two_methods(capsys, tmp_path, photos):
    out_dir = tmp_path / "o"
    images = [photos / "rgb.png", photos / "rotated.jpg"]
    code, out, _ = _run(
        capsys, "explain", *images, "--method", "gradcam,layercam", "--target", "topk:2", "--save", "png,npy",
        "--gallery", "--out", out_dir,
    )
    assert code == 0
    for stem, (w, h) in (("rgb", (W, H)), ("rotated", (40, 60))):
        for method in ("gradcam", "layercam"):
            for k in (1, 2):
                (picture,) = out_dir.glob(f"{stem}_{method}_top{k}_*.png")  # the class name follows (issue 13)
                with Image.open(picture) as im:
                    assert im.size == (w, h)
            maps = np.load(out_dir / f"{stem}_{method}.npy")
            assert maps.shape == (2, h, w)
            assert maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    with Image.open(out_dir / "gallery.png") as im:
        assert im.size[0] > 0
    assert "Explained 2 image(s) with 2 method(s): 13 file(s)" in out  # 8 png + 4 npy + gallery


def test_target_index_and_class_name(capsys, tmp_path, one_image):
    maps = {}
    for target in ("285", "tabby cat", "281"):
        out_dir = tmp_path / target.replace(" ", "_")
        code, out, _ = _run(capsys, "explain", one_image, "--target", target, "--save", "npy", "--out", out_dir)
        assert code == 0, out
        maps[target] = np.load(out_dir / "one_gradcam.npy")
        assert maps[target].shape == (1, H, W)
        assert not list(out_dir.glob("*.png"))
    np.testing.assert_array_equal(maps["tabby cat"], maps["281"])  # "tabby cat" is class 281
    assert not np.array_equal(maps["285"], maps["281"])


def test_scorecam_once_on_one_image(capsys, tmp_path, one_image):
    code, out, _ = _run(capsys, "explain", one_image, "--method", "scorecam", "--out", tmp_path)
    assert code == 0
    with Image.open(tmp_path / "one_scorecam.png") as im:
        assert im.size == (W, H)


def test_same_file_names_in_two_folders_do_not_overwrite(capsys, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _rgb(12).save(tmp_path / sub / "x.png")
    code, _, _ = _run(capsys, "explain", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "o")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x_2_gradcam.png", "x_gradcam.png"]


# ----------------------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("option", "value", "hints"),
    [
        ("--method", "gradcan", ["gradcam"]),
        ("--layer", "_act", ["_act1"]),
        ("--target", "tabby kat", ["tabby"]),
        ("--target", "5000", ["out of range"]),
        ("--model", "efficientnet_lite", ["efficientnet_lite0"]),
        ("--save", "jpg", ["png", "npy"]),
    ],
)
def test_unknown_names_give_one_line_with_close_matches(capsys, tmp_path, one_image, option, value, hints):
    out_dir = tmp_path / "o"
    code, out, err = _run(capsys, "explain", one_image, option, value, "--out", out_dir)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and value in err
    for hint in hints:
        assert hint in err
    assert not out_dir.exists()  # failed before any work


def test_missing_file_is_one_line_and_exit_1(capsys, tmp_path):
    out_dir = tmp_path / "o"
    code, out, err = _run(capsys, "explain", tmp_path / "nonexistent.jpg", "--out", out_dir)
    assert code == 1
    assert _error_lines(err) == [f"error: {tmp_path / 'nonexistent.jpg'}: no such file or directory"]
    assert "0 image(s)" in out and "1 failed" in out
    assert not out_dir.exists()


def test_usage_error_is_not_a_traceback(capsys):
    code, _, err = _run(capsys, "explain", "--no-such-option")
    assert code != 0
    assert "no-such-option" in err


# ---------------------------------------------------------------------------------------- own models

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build():
    return Tiny()
'''


@pytest.fixture
def tiny_module(tmp_path, monkeypatch) -> str:
    name = f"lumos_tiny_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_blank_maps_are_said_once_per_method_naming_the_files(capsys, tmp_path, tiny_module, photos):
    """A head of zeros: every map is zero everywhere. `lumos explain` says so in one warning line per method
    naming the files (not one engine line per batch), and the gallery caption says it under each cell."""
    import importlib

    model = importlib.import_module(tiny_module).build()
    torch.nn.init.zeros_(model.fc.weight)
    weights = tmp_path / "zero_head.pt"
    torch.save(model.state_dict(), weights)
    code, out, err = _run(capsys, "explain", photos / "rgb.png", photos / "gray.png", "--model",
                          f"{tiny_module}:build", "--weights", weights, "--size", "32", "--method", "gradcam,gradients",
                          "--batch-size", "1", "--gallery", "--out", tmp_path / "out")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "zero everywhere" in line]
    assert [line.split(":")[1] for line in lines] == [" gradcam", " gradients"], err
    assert all(line.startswith("warning:") and "2 map(s)" in line and "rgb.png" in line and "gray.png" in line
               for line in lines), lines
    from lumos.explainer import Explainer, ExplainSpec, ModelSpec
    from lumos.runner import explain_images

    spec = ExplainSpec(model=ModelSpec(f"{tiny_module}:build", str(weights), size=32), methods=("gradcam",))
    report = explain_images(Explainer(spec), [("rgb.png", Image.open(photos / "rgb.png"))])
    assert report.blank == {"gradcam": [f"rgb.png (class {report.results[0].classes['gradcam'][0]})"]}
    assert report.results[0].captions["gradcam"][0].endswith("zero everywhere: nothing to draw")


NAN_ON_BRIGHT = """
import torch
from torch import nn


class NanOnBright(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = self.fc(self.features(x).mean((2, 3)))
        return torch.where((x.mean((1, 2, 3)) > 0.6)[:, None], torch.tensor(float("nan")), out)


def build():
    return NanOnBright()
"""


def test_a_nan_score_fails_that_image_only(capsys, tmp_path, monkeypatch):
    """One image of a batch gives a NaN score: it is one `error:` line naming it (exit 1), the other images of
    the same batch are explained and written."""
    (tmp_path / "nan_on_bright.py").write_text(NAN_ON_BRIGHT)
    monkeypatch.syspath_prepend(str(tmp_path))
    Image.new("RGB", (W, H), (240, 240, 240)).save(tmp_path / "bright.png")
    _rgb(1).save(tmp_path / "a.png")
    _rgb(2).save(tmp_path / "b.png")
    code, out, err = _run(capsys, "explain", tmp_path / "a.png", tmp_path / "bright.png", tmp_path / "b.png",
                          "--model", "nan_on_bright:build", "--size", "32", "--mean", "0", "--std", "1",
                          "--batch-size", "3", "--out", tmp_path / "o")
    assert code == 1
    assert _error_lines(err) == [f"error: {tmp_path / 'bright.png'}: The model's score for the explained target is "
                                 "not finite (NaN or inf) for class 0: no map can be computed; check the "
                                 "model and its input."], err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_gradcam.png", "b_gradcam.png"]
    sys.modules.pop("nan_on_bright", None)


def test_module_callable_model_with_weights_and_size(capsys, tmp_path, tiny_module, one_image):
    import importlib

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(importlib.import_module(tiny_module).build().state_dict(), weights)
    spec = f"{tiny_module}:build"
    common = ["--model", spec, "--weights", weights, "--size", "32"]

    code, out, _ = _run(capsys, "layers", *common)
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("features.3 ") and "8x32x32" in line for line in lines)
    assert [line.split()[0] for line in lines if "auto" in line] == ["features"]  # same tensor as features.3

    code, out, _ = _run(capsys, "explain", one_image, *common, "--target", "topk:2", "--save", "png,npy",
                        "--out", tmp_path / "o")
    assert code == 0, out
    assert "class " in out  # numbered labels for a 5-class model
    assert np.load(tmp_path / "o" / "one_gradcam.npy").shape == (2, H, W)
    with Image.open(tmp_path / "o" / "one_gradcam_top2_class-1.png") as im:
        assert im.size == (W, H)

    code, _, err = _run(capsys, "explain", one_image, *common, "--layer", "features.9", "--out", tmp_path / "p")
    assert code != 0 and "Did you mean: features." in err


def test_torchscript_file_model(capsys, tmp_path, tiny_module, one_image):
    """A TorchScript file loads, but torch allows no hooks on a loaded ScriptModule, so layer maps cannot be
    recorded: explain, layers and features say so in one line and point to module:callable + --weights."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(importlib.import_module(tiny_module).build().eval())
        path = tmp_path / "tiny_scripted.pt"
        torch.jit.save(scripted, str(path))
    out_dir = ["--out", tmp_path / "o"]
    for command in (["explain", one_image, *out_dir], ["layers"], ["features", one_image, *out_dir]):
        code, out, err = _run(capsys, *command, "--model", path, "--size", "32")
        assert code != 0
        assert len(err.strip().splitlines()) == 1, err
        assert "TorchScript" in err and "--weights" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- demo, features


def test_demo_writes_overlays_and_gallery(capsys, tmp_path):
    pytest.importorskip("skimage")
    code, out, _ = _run(capsys, "demo", "--method", "gradcam", "--out", tmp_path)
    assert code == 0
    assert (tmp_path / "gallery.png").is_file()
    assert (tmp_path / "chelsea_gradcam.png").is_file()
    chelsea = next(line for line in out.splitlines() if line.startswith("chelsea:"))
    assert "cat" in chelsea


def test_features_writes_a_grid(capsys, tmp_path, one_image):
    code, out, _ = _run(capsys, "features", one_image, "--n", "4", "--out", tmp_path / "f")
    assert code == 0
    assert "layer _act1" in out
    assert (tmp_path / "f" / "one_features_act1.png").is_file()


def test_features_of_same_named_images_do_not_overwrite(capsys, tmp_path):
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        _rgb(seed).save(tmp_path / folder / "x.png")
    code, _, _ = _run(capsys, "features", tmp_path / "a", tmp_path / "b", "--n", "4", "--out", tmp_path / "f")
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert written == ["x_2_features_act1.png", "x_features_act1.png"]


# ------------------------------------------------------------------------------------- terminal, script


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, tmp_path, one_image):
    from rich.console import Console

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Tty()
    monkeypatch.setattr(cli, "err_console", Console(file=screen, force_terminal=True, force_interactive=True))
    code, _, _ = _run(capsys, "explain", one_image, "--out", tmp_path)
    assert code == 0
    assert "explaining" in screen.getvalue() and ESC in screen.getvalue()


def test_installed_script_end_to_end(tmp_path, one_image):
    script = Path(sys.executable).parent / "lumos"
    if not script.exists():
        pytest.skip("the lumos script is not installed next to this Python")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "40"}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run(
        [str(script), "explain", str(one_image), str(bad), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert ESC not in proc.stdout + proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert proc.stdout.splitlines()[0].startswith(f"{one_image}: ")
    assert proc.stdout.splitlines()[-1].startswith("Explained 1 image(s) with 1 method(s): 1 file(s)")
    assert (tmp_path / "o" / "one_gradcam.png").is_file()


# ---------------------------------------------------------------------------------------- method settings


def test_set_passes_settings_to_the_methods_that_take_them(capsys, tmp_path, one_image):
    from lumos.runner import _at_image_size

    code, _, _ = _run(capsys, "explain", one_image, "--method", "integrated_gradients,gradcam", "--save", "npy",
                      "--set", "steps=4", "--set", "integrated_gradients.tolerance=0", "--set", "baseline=black",
                      "--set", "relu=false", "--out", tmp_path)
    assert code == 0
    model, preprocess, labels = lumos.load_model("efficientnet_lite0")
    with Image.open(one_image) as im:
        image = im.convert("RGB")
    x = preprocess([image])
    ig = lumos.IntegratedGradients(model, steps=4, tolerance=0, baseline="black", preprocess=preprocess)(x)
    np.testing.assert_allclose(np.load(tmp_path / "one_integrated_gradients.npy"), _at_image_size(ig.maps, image),
                               atol=1e-5)
    cam = lumos.GradCAM(model, relu=False)(x)
    np.testing.assert_allclose(np.load(tmp_path / "one_gradcam.npy"), _at_image_size(cam.maps, image), atol=1e-5)


@pytest.mark.parametrize(("setting", "message"), [
    ("stpes=4", "--set stpes: no setting of that name for integrated_gradients. Did you mean: steps?"),
    ("steps=abc", "integrated_gradients does not accept the settings steps='abc'"),
    ("gradcam.relu=0", "gradcam is not among the methods (integrated_gradients)"),
    ("steps", "--set expects KEY=VALUE or METHOD.KEY=VALUE, got 'steps'"),
])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, one_image, setting, message):
    code, _, err = _run(capsys, "explain", one_image, "--method", "integrated_gradients", "--set", setting,
                        "--out", tmp_path / "o")
    assert code == 2
    assert len(_error_lines(err)) == 1 and message in err, err
    assert not (tmp_path / "o").exists()  # refused before any work
