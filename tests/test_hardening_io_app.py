"""Issue 11 (hardening): huge photos, TorchScript files refused before they run, `lumos evaluate` with bad
input, and the app's limits. CLI checks run the real command in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lumos.errors import ImageError, LumosError, ModelLoadError
from lumos.io import DEFAULT_MAX_SIDE, MAX_SIDE_ENV, fit_size, load_image
from lumos.render import overlay
from lumos.zoo import is_torchscript_file, load_model, refuse_torchscript

pytestmark = pytest.mark.usefixtures("one_thread")

# The real command, measured from inside: its own peak RSS is printed after it finishes (VmHWM: ru_maxrss would
# include the forking pytest process), and Pillow's decompression-bomb limit can be lowered so a small test
# image stands in for a 100-megapixel photo.
RUN_CLI = textwrap.dedent("""
    import os, re, sys
    import PIL.Image
    if os.environ.get("TEST_MAX_IMAGE_PIXELS"):
        PIL.Image.MAX_IMAGE_PIXELS = int(os.environ["TEST_MAX_IMAGE_PIXELS"])
    from lumos.cli import main
    code = main(sys.argv[1:])
    with open("/proc/self/status") as status:
        print("maxrss_kb=" + re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1))
    sys.exit(code)
""")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    env.pop(MAX_SIDE_ENV, None)
    env.update(COLUMNS="200", OMP_NUM_THREADS="1", **extra)
    return env


def _lumos(tmp_path: Path, *args, timeout: float = 180, wrapper: bool = False, **env) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", RUN_CLI] if wrapper else [sys.executable, "-m", "lumos.cli"]
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=_env(tmp_path, **env))


def _err_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- 12: huge photos


def _photo(width: int, height: int) -> np.ndarray:
    """Smooth gradients plus a little noise, like a photo (compresses like one too)."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = 255 * (0.5 + 0.5 * np.sin(6 * x + 3 * y))
    img[..., 1] = 255 * y
    img[..., 2] = 255 * x
    noise = np.random.default_rng(0).integers(-12, 13, size=(height, 1, 1), dtype=np.int16)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def test_huge_jpeg_explain_is_capped_lean_and_quiet(tmp_path):
    """A 27-megapixel JPEG (above a lowered bomb-warning limit) is explained with a capped overlay and .npy,
    no raw DecompressionBombWarning and modest memory; a file above the bomb limit is one error line."""
    Image.fromarray(_photo(6000, 4500)).save(tmp_path / "big.jpg", quality=90)
    Image.new("L", (7000, 7000)).save(tmp_path / "bomb.png")  # 49 MP: above 2 x the lowered limit
    proc = _lumos(tmp_path, "explain", "big.jpg", "bomb.png", "--save", "png,npy", "--out", "o", wrapper=True,
                  TEST_MAX_IMAGE_PIXELS="20000000")
    assert proc.returncode == 1, proc.stderr  # one bad file: the rest is done, exit 1
    assert "Traceback" not in proc.stderr and "DecompressionBomb" not in proc.stderr
    err = _err_lines(proc)
    assert len(err) == 1 and err[0].startswith("error: Cannot read image bomb.png: it is too large"), err
    assert "big.jpg:" in proc.stdout
    with Image.open(tmp_path / "o" / "big_gradcam.png") as im:
        assert im.size == (DEFAULT_MAX_SIDE, 3072)
    assert np.load(tmp_path / "o" / "big_gradcam.npy", mmap_mode="r").shape == (1, 3072, DEFAULT_MAX_SIDE)
    rss_mb = int(proc.stdout.split("maxrss_kb=")[1].split()[0]) / 1024
    assert rss_mb < 1000, f"peak RSS {rss_mb:.0f} MB"  # was ~2 GB: a float64 RGBA overlay at full size


def test_load_image_caps_the_long_side(tmp_path, monkeypatch):
    path = tmp_path / "wide.jpg"
    Image.fromarray(_photo(2400, 1000)).save(path, quality=90)
    monkeypatch.delenv(MAX_SIDE_ENV, raising=False)
    assert load_image(path).size == (2400, 1000)  # under the default cap: untouched
    assert load_image(path, max_side=600).size == (600, 250)  # decoded at 1/2 scale (draft), then resized
    monkeypatch.setenv(MAX_SIDE_ENV, "1200")
    assert load_image(path).size == (1200, 500)
    assert load_image(path, max_side=0).size == (2400, 1000)
    monkeypatch.setenv(MAX_SIDE_ENV, "0")
    assert load_image(path).size == (2400, 1000)
    monkeypatch.setenv(MAX_SIDE_ENV, "big")
    with pytest.raises(LumosError, match=MAX_SIDE_ENV):
        load_image(path)
    assert fit_size((300, 5000), 4096) == (246, 4096) and fit_size((30, 50), None) == (30, 50)


def test_maps_for_npy_and_overlays_are_capped(monkeypatch):
    from lumos.runner import _at_image_size

    monkeypatch.setenv(MAX_SIDE_ENV, "1000")
    big = Image.new("RGB", (3000, 1500))
    assert _at_image_size(torch.rand(2, 7, 7), big).shape == (2, 500, 1000)
    assert _at_image_size(torch.rand(1, 7, 7), Image.new("RGB", (300, 200))).shape == (1, 200, 300)


def test_overlay_works_in_uint8():
    """An overlay needs a few bytes per pixel of numpy memory, not ~64 (float64 RGBA at full size)."""
    img = np.zeros((1500, 2000, 3), np.uint8)
    m = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    tracemalloc.start()
    try:
        out = overlay(img, m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.size == (2000, 1500)
    assert peak / img[..., 0].size < 24


def test_bomb_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageError, match=r"bomb\.png: it is too large \(Image size \(10000 pixels\)") as info:
            load_image(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # between the warning and the error limit
        assert load_image(path).size == (100, 100)
    assert "\n" not in str(info.value) and ".)" not in str(info.value)


# ------------------------------------------------------------------------------- 13: TorchScript files


class _Marker(torch.nn.Module):
    """A TorchScript model whose forward creates the file ``marker``: a stand-in for code in a model file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)  # creates the file
        return self.fc(x.mean((2, 3))) + touched.sum().float() * 0


@pytest.fixture
def scripted(tmp_path) -> tuple[Path, Path]:
    marker, path = tmp_path / "forward_ran", tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        torch.jit.save(torch.jit.script(_Marker(str(marker))), str(path))
    return path, marker


def test_torchscript_archive_is_recognised_without_loading(scripted, tmp_path):
    path, marker = scripted
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert is_torchscript_file(path)
    assert not any(is_torchscript_file(tmp_path / n) for n in ("weights.pt", "junk.pt", "missing.pt"))
    for refuse in (lambda: refuse_torchscript(path), lambda: load_model(path, size=8, torchscript=False)):
        with pytest.raises(ModelLoadError, match="TorchScript model, which was not loaded"):
            refuse()
    refuse_torchscript(tmp_path / "weights.pt")  # not TorchScript: nothing to refuse
    assert not marker.exists()
    load_model(path, size=8)  # the library still loads it when asked (and that runs its forward)
    assert marker.exists()


def test_evaluate_and_app_refuse_torchscript_before_running_it(scripted, tmp_path):
    from lumos.app import logic

    path, marker = scripted
    Image.fromarray(_photo(40, 30)).save(tmp_path / "a.png")
    with pytest.raises(ModelLoadError, match="TorchScript"):
        logic.load_bundle(logic.AppConfig(model=str(path)))
    for args in (["evaluate", "a.png", "--model", path, "--methods", "gradcam", "--steps", "2", "--out", "ev"],
                 ["explain", "a.png", "--model", path, "--out", "ev"], ["layers", "--model", path],
                 ["features", "a.png", "--model", path, "--out", "ev"],
                 ["app", "--model", path, "--port", _free_port()]):
        proc = _lumos(tmp_path, *args, timeout=120)
        err = _err_lines(proc)
        assert proc.returncode == 2 and len(err) == 1 and "TorchScript" in err[0] and "--weights" in err[0], err
        assert not marker.exists(), args
    assert not (tmp_path / "ev").exists()


# ------------------------------------------------------------------- 14: `lumos evaluate` with bad input

NETS = '''
import torch
from torch import nn


class NoFc(nn.Module):
    """conv -> ReLU -> global average pool; the channels are the class scores (no linear layer: no CAM)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.features(x).mean((2, 3))


def build():
    torch.manual_seed(0)
    return NoFc()
'''


def test_evaluate_skips_bad_images_and_reports_a_failing_method_once(tmp_path):
    (tmp_path / "hardening_nets.py").write_text(NETS)
    Image.fromarray(_photo(50, 40)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    proc = _lumos(tmp_path, "evaluate", "a.png", "broken.png", "missing.png", "--model", "hardening_nets:build",
                  "--size", "32", "--methods", "cam,gradcam", "--steps", "4", "--out", "ev")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    err = [line for line in _err_lines(proc) if not line.startswith("evaluate: ")]  # progress lines (issue 13)
    assert sorted(line.split(":")[0] for line in err) == ["error", "error", "warning"], err
    assert sum("broken.png" in line for line in err) == 1 and sum("missing.png" in line for line in err) == 1
    assert sum("CAM needs a linear layer" in line for line in err) == 1  # the failing method, once
    assert "gradcam" in proc.stdout and "2 input(s) failed" in proc.stdout
    data = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert data["meta"]["images"] == ["a.png"] and "gradcam" in data["metrics"] and "cam" not in data["metrics"]


# ------------------------------------------------------------------------------------------ 16: the app


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def test_app_server_limit_is_the_apps_limit():
    from lumos.app import logic
    from lumos.cli_app import app_command

    cmd = app_command("efficientnet_lite0", 8765)
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == str(logic.MAX_UPLOAD_MB)
    assert cmd.index("--server.maxUploadSize") < cmd.index("--")  # a streamlit option, not the script's


def test_app_page_states_one_upload_limit(monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from lumos.app import SCRIPT, logic

    monkeypatch.setattr(sys, "argv", ["streamlit_app.py"])
    at = AppTest.from_file(str(SCRIPT), default_timeout=180)
    at.run()
    assert not at.exception
    uploader = at.get("file_uploader")[0].proto
    assert uploader.max_upload_size_mb == logic.MAX_UPLOAD_MB  # Streamlit shows "Limit 20MB per file"
    assert "MB" not in uploader.label  # ... and the label does not state a second number


def test_app_with_a_bad_model_fails_in_the_terminal(tmp_path):
    try:
        proc = _lumos(tmp_path, "app", "--model", "nope", "--port", _free_port(), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("lumos app --model nope started a server instead of failing")
    err = _err_lines(proc)
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: Unknown model 'nope'"), err
    assert "Traceback" not in proc.stderr and "URL" not in proc.stdout
