"""A method stopped by its cap before meeting its tolerance says so: once per call, or once per run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lumos
from lumos.shortfall import Shortfall, gather_shortfalls, report_shortfall
from nets import GapNet, images

pytestmark = pytest.mark.usefixtures("one_thread")
LOGGER = "lumos.shortfall"


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def net() -> GapNet:
    torch.manual_seed(0)
    return GapNet().eval()


def test_integrated_gradients_says_when_max_steps_leave_the_completeness_error_above_tolerance(net, caplog):
    x = images(2)
    with caplog.at_level("WARNING", logger=LOGGER):
        ex = lumos.IntegratedGradients(net, steps=4, max_steps=4, tolerance=1e-9)(x, 0)
    error = (ex.params["delta"].double().abs() / ex.params["gap"].double().abs())
    assert torch.all(error > 1e-9) and torch.all(ex.params["points"] == 4)
    said = lines(caplog)
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"Integrated gradients: 2 of 2 maps reached max_steps=4 points with completeness error "
                              f"(share of |F(x) - F(baseline)|) up to {float(error.max()):.3f}, above tolerance 1e-09")
    assert "--set max_steps=N" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger=LOGGER):  # met, or no tolerance asked for: nothing to say
        met = lumos.IntegratedGradients(net, steps=4, max_steps=4, tolerance=10.0)(x, 0)
        lumos.IntegratedGradients(net, steps=4, tolerance=None)(x, 0)
        lumos.IntegratedGradients(net, steps=4, method="gausslegendre")(x, 0)
    assert (met.params["delta"].abs() <= 10.0 * met.params["gap"].abs()).all() and lines(caplog) == []


def test_calls_inside_gather_are_said_once_with_the_counts_of_all_calls(net, caplog):
    cam = lumos.ScoreCAM(net, "features", max_channels=2, tolerance=1e-9)
    with caplog.at_level("WARNING", logger=LOGGER):
        with gather_shortfalls() as found:
            errors = [cam(images(2), 0).params["error"], cam(images(3), 1).params["error"]]
            assert lines(caplog) == [] and found == []  # nothing said until the run ends
    error = torch.cat(errors)
    over = int((error > 1e-9).sum())  # class 1's maps are blank here: error 0, nothing to improve
    assert 0 < over < 5 and not error.isnan().any()
    said = lines(caplog)
    assert len(said) == 1 and said[0].startswith(
        f"Score-CAM: {over} of 5 maps reached max_channels=2 masks with estimated error up to {float(error.max()):.3f}")
    assert len(found) == 1 and (found[0].over, found[0].total) == (over, 5)


def test_gathered_counts_are_said_when_the_run_stops_with_an_error_and_nested_gathers_report_once(caplog):
    short = Shortfall("M", "cap=1", "error", 0.1, "error", "raise cap.")
    with caplog.at_level("WARNING", logger=LOGGER), pytest.raises(RuntimeError):
        with gather_shortfalls():
            with gather_shortfalls() as inner:
                report_shortfall(short, torch.tensor([0.5, 0.05]))
            report_shortfall(short, torch.tensor([float("nan")]))
            raise RuntimeError("stopped")
    assert inner == []
    assert lines(caplog) == ["M: 2 of 3 maps reached cap=1 with error up to 0.500, above tolerance 0.1 "
                             "(see params['error']); raise cap."]
    caplog.clear()
    with caplog.at_level("WARNING", logger=LOGGER), gather_shortfalls(say=False) as found:
        report_shortfall(short, torch.tensor([float("nan")]))
    assert lines(caplog) == [] and "up to unknown" in found[0].line()


def test_smoothgrad_over_a_capped_method_says_it_once_for_all_its_noisy_copies(net, caplog):
    x = images(2)
    with caplog.at_level("WARNING", logger=LOGGER):
        lumos.SmoothGrad(net, base="integrated_gradients", n_samples=3, steps=4, max_steps=4, tolerance=1e-9)(x, 0)
    said = lines(caplog)
    assert len(said) == 1 and said[0].startswith("Integrated gradients: 6 of 6 maps reached max_steps=4 points")


def test_the_app_caption_names_the_shortfall(net):
    from lumos.app import logic

    bundle = logic.load_bundle(logic.AppConfig(model="nets:GapNet", size=32, device="cpu"))
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    short = logic.run_method(bundle, image, "scorecam", 0, "features", {"max_channels": 2, "tolerance": 1e-9})
    caption = logic.result_caption(short)
    assert short.shortfall and ": less exact than asked: it stopped at 2 masks (Score-CAM most masks)" in caption
    exact = logic.run_method(bundle, image, "scorecam", 0, "features", {"max_channels": 512, "tolerance": 0.02})
    assert exact.shortfall is None and "less exact" not in logic.result_caption(exact)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    tests = str(Path(__file__).parent)
    return subprocess.run([sys.executable, "-m", "lumos.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": tests, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("command", ["explain", "explain-dataset"])
def test_a_folder_run_says_the_cap_once_with_the_count_of_every_batch(tmp_path, command):
    photos = _photos(tmp_path / "photos", 3)
    where = ["--out", str(tmp_path / "out")] if command == "explain" else ["--store", str(tmp_path / "store")]
    done = _cli(command, str(photos), "--model", "nets:GapNet", "--size", "32", "--method", "scorecam",
                "--layer", "features", "--batch-size", "1", "--set", "max_channels=1", *where, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("warning: Score-CAM:")]
    assert len(said) == 1 and "3 of 3 maps reached max_channels=1 masks with estimated error up to unknown" in said[0]
    assert "Traceback" not in done.stderr


def test_the_task_page_result_names_the_shortfall():
    from lumos.app import task_logic

    tm = task_logic.load_task_model("detection")
    image = task_logic.scene_image("scene 1")
    det = task_logic.find_boxes(tm, image)
    assert len(det) > 0
    short = task_logic.explain_box(tm, image, det, 0, "scorecam", {"max_channels": 2, "tolerance": 1e-9})
    assert short.shortfall and short.shortfall.startswith("less exact than asked: it stopped at max_channels=2 masks")
    assert task_logic.explain_box(tm, image, det, 0, "gradcam").shortfall is None


def test_lumos_explain_task_says_the_cap_once_for_the_run(tmp_path, capsys, caplog):
    import logging

    from cli_run import run_cli
    from lumos.synthetic.scenes import make_scenes

    for i, im in enumerate(make_scenes(2, seed=5).images):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / f"scene{i}.png")
    with caplog.at_level(logging.WARNING, logger="lumos"):  # in-process: pytest's handler, not the CLI's, gets it
        code, _, _ = run_cli(capsys, "explain", tmp_path / "scene0.png", tmp_path / "scene1.png", "--task",
                             "detection", "--method", "scorecam", "--set", "max_channels=1", "--set",
                             "tolerance=1e-9", "--out", tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if "reached max_channels=1" in r.getMessage()]
    assert code == 0 and len(said) == 1, said
    boxes = int(said[0].split(" of ")[1].split()[0])
    assert boxes == len(list((tmp_path / "out").glob("scene*_box[0-9]*.png"))) > 1  # one map per box, both images
