"""Issue 13, the command line: devices, progress and per-method times, one method vocabulary, feature grids
of layers without a map, and the evaluation table's stars and plain-language reading.

Where it matters (terminal or not, the current folder on the import path, exit codes) the installed ``lumos``
script runs in a subprocess; the rest runs in-process through ``lumos.cli.main``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import run_cli as _run
from lumos.cli import main
from lumos.errors import LumosError

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(sys.executable).parent / "lumos"
ESC = "\x1b"

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
'''


def _rgb(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def here(tmp_path_factory) -> Path:
    """A working folder holding a model module (``polishnets.py``, not on any import path) and an image."""
    d = tmp_path_factory.mktemp("here")
    (d / "polishnets.py").write_text(NETS)
    _rgb(1).save(d / "one.png")
    return d


def _lumos(*args, cwd: Path, timeout: float = 600) -> tuple[int, str, str]:
    """The installed script, not on a terminal, with nothing extra on PYTHONPATH."""
    if not SCRIPT.exists():
        pytest.skip("the lumos script is not installed next to this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"}
    for name in ("FORCE_COLOR", "PYTHONPATH"):
        env.pop(name, None)
    proc = subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert ESC not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr




TINY = ["--model", "polishnets:build", "--size", "32"]


# -- 4. devices ---------------------------------------------------------------------------------------------

def test_resolve_device():
    from lumos.cli_common import resolve_device as from_cli
    from lumos.explainer import resolve_device

    assert from_cli is resolve_device  # the one the app imports too
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(LumosError, match="Unknown device='gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LumosError, match="not available"):
            resolve_device("cuda:1")


def test_spec_carries_the_device_and_the_explainer_uses_it():
    import pickle

    from lumos.explainer import Explainer, ExplainSpec

    spec = ExplainSpec(device="CPU")
    assert spec.device == "cpu" and pickle.loads(pickle.dumps(spec)) == spec
    assert ExplainSpec().device is None  # the library default: the model stays where it is
    explainer = Explainer(spec)
    assert explainer.device == torch.device("cpu")
    result = explainer([_rgb(2)])
    assert result.explanations["gradcam"].maps.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(LumosError, match="device='cuda' is not available"):
            ExplainSpec(device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_one_line_and_exit_2(here):
    out_dir = ["--out", here / "cuda"]
    for command in (["explain", "one.png", *out_dir], ["evaluate", "one.png", *out_dir],
                    ["features", "one.png", *out_dir], ["layers"]):
        code, out, err = _lumos(*command, *TINY, "--device", "cuda", cwd=here)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (command, err)
        assert lines[0].startswith("error: --device 'cuda' is not available"), lines
    assert not (here / "cuda").exists()  # nothing was done


def test_device_cpu_works_in_every_command(capsys, tmp_path, here, monkeypatch):
    monkeypatch.chdir(here)
    assert _run(capsys, "explain", "one.png", *TINY, "--device", "cpu", "--out", tmp_path / "e")[0] == 0
    assert _run(capsys, "features", "one.png", *TINY, "--device", "cpu", "--n", "4", "--out", tmp_path / "f")[0] == 0
    code, out, _ = _run(capsys, "layers", *TINY, "--device", "cpu")
    assert code == 0 and "<- auto" in out
    code, _, _ = _run(capsys, "evaluate", "one.png", *TINY, "--method", "gradcam", "--steps", "2", "--device", "cpu",
                      "--out", tmp_path / "v")
    assert code == 0


def test_bad_device_text_is_one_line(capsys, here, monkeypatch):
    monkeypatch.chdir(here)
    code, _, err = _run(capsys, "explain", "one.png", *TINY, "--device", "tpu")
    assert code == 2 and err.strip() == "error: Unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps."


# -- 5. progress and per-method times --------------------------------------------------------------------------

def test_explain_prints_per_method_times(capsys, tmp_path, here, monkeypatch):
    monkeypatch.chdir(here)
    code, out, _ = _run(capsys, "explain", "one.png", *TINY, "--method", "gradcam,layercam", "--out", tmp_path)
    assert code == 0
    time_line = next(line for line in out.splitlines() if line.startswith("time: "))
    assert re.fullmatch(r"time: gradcam [\d.]+ m?s, layercam [\d.]+ m?s", time_line), time_line
    assert out.splitlines()[-1].startswith("Explained 1 image(s) with 2 method(s)")


def test_evaluate_shows_progress_lines_and_times_when_not_a_terminal(here):
    code, out, err = _lumos("evaluate", "one.png", *TINY, "--method", "gradcam,eigencam", "--steps", "2",
                            "--out", here / "ev", cwd=here)
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("evaluate: ")]
    assert progress == ["evaluate: gradcam (1/3) ...", "evaluate: eigencam (2/3) ...", "evaluate: random (3/3) ..."]
    times = [line for line in out.splitlines() if line.startswith("time: ")]
    assert len(times) == 1 and times[0].startswith("time: gradcam ") and ", eigencam " in times[0]
    assert ", random " in times[0]


def test_step_progress_heartbeat_and_times():
    import io

    from rich.console import Console

    from lumos.cli_common import StepProgress

    screen = io.StringIO()
    with StepProgress("evaluate", 2, Console(file=screen, width=200), every=0.05) as progress:
        progress.step("a")
        time.sleep(0.3)
        progress.step("b")
    lines = screen.getvalue().splitlines()
    assert lines[0] == "evaluate: a (1/2) ..."
    assert any(line.startswith("evaluate: a (1/2) still running, ") for line in lines)
    assert "evaluate: b (2/2) ..." in lines
    assert list(progress.times) == ["a", "b"] and progress.times["a"] >= 0.3
    assert progress._thread is not None and not progress._thread.is_alive()  # the heartbeat stopped


def test_evaluate_progress_bar_on_a_terminal(capsys, monkeypatch, tmp_path, here):
    import io

    from rich.console import Console

    import lumos.cli_common as common

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Tty()
    monkeypatch.setattr(common, "err_console", Console(file=screen, force_terminal=True, force_interactive=True))
    monkeypatch.chdir(here)
    code, _, _ = _run(capsys, "evaluate", "one.png", *TINY, "--method", "gradcam", "--steps", "2", "--out", tmp_path)
    assert code == 0
    assert "evaluate" in screen.getvalue() and ESC in screen.getvalue()
    assert "evaluate: gradcam (1/2) ..." not in screen.getvalue()  # the bar, not the log lines


# -- 6. one vocabulary -----------------------------------------------------------------------------------------

def test_explain_method_all_names_files_by_registered_names(here):
    from lumos.api import methods

    out = here / "all"
    code, stdout, err = _lumos("explain", "one.png", *TINY, "--method", "all", "--out", out, cwd=here)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"one_{m}.png" for m in methods(general=True))
    assert f"with {len(methods(general=True))} method(s)" in stdout


def test_method_and_methods_in_every_command(capsys, tmp_path, here, monkeypatch):
    monkeypatch.chdir(here)
    for flag in ("--method", "--methods"):
        code, _, err = _run(capsys, "explain", "one.png", *TINY, flag, "Grad-CAM", "--out", tmp_path / flag)
        assert code == 0, err
        assert (tmp_path / flag / "one_gradcam.png").is_file()
        code, out, err = _run(capsys, "evaluate", "one.png", *TINY, flag, "gradcam", "--steps", "2",
                              "--out", tmp_path / f"ev{flag}")
        assert code == 0, err
        assert "Grad-CAM" in out  # the display name in the table
    code, _, err = _run(capsys, "evaluate", "--benchmark", "synthetic", "--method", "all,gradcamm")
    assert code == 2 and "Unknown method 'gradcamm'" in err


def test_module_in_the_current_folder_imports(here):
    code, out, err = _lumos("layers", "--model", "polishnets:build", "--size", "32", cwd=here)
    assert code == 0, err
    assert "features.2" in out and "<- auto" in out


def test_model_help_offers_no_torchscript_file(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    for command in ("explain", "evaluate", "features", "layers"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "TorchScript" not in out and "package.module:callable" in out
        assert "--device" in out
        if command in ("explain", "evaluate"):
            assert "--method" in out and "--methods" in out


def test_docs_say_how_many_methods_the_demo_runs():
    from lumos.cli import DEMO_METHODS

    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert f"`{DEMO_METHODS}`" in docs and f"{len(DEMO_METHODS.split(','))} methods" in docs


# -- features ------------------------------------------------------------------------------------------------

def test_features_of_a_layer_without_a_map_is_one_line(here):
    code, out, err = _lumos("features", "one.png", *TINY, "--layer", "pool", "--out", here / "pool", cwd=here)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Layer 'pool' outputs 8x1x1: one value per channel")
    assert not (here / "pool").exists()


def test_features_file_names_have_no_double_underscores(capsys, tmp_path, here, monkeypatch):
    from lumos.cli import _file_part

    assert _file_part("_act1") == "act1"
    assert _file_part("_blocks.15._project_conv") == "blocks_15_project_conv"
    monkeypatch.chdir(here)
    code, out, _ = _run(capsys, "features", "one.png", *TINY, "--layer", "features.2", "--n", "4",
                        "--out", tmp_path)
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["one_features_features_2.png"]
    code, _, _ = _run(capsys, "features", "one.png", "--n", "2", "--out", tmp_path / "zoo")
    assert code == 0 and [p.name for p in (tmp_path / "zoo").iterdir()] == ["one_features_act1.png"]


# -- 7. the evaluation table and its reading -----------------------------------------------------------------

def _report(rows: dict[str, dict[str, float]]):
    from lumos.evaluate.benchmark import EvaluationReport

    return EvaluationReport(rows=rows, meta={"images": 3})


def test_no_star_on_ties_or_for_a_best_that_does_not_beat_random():
    from lumos.evaluate.report import format_table, table_rows

    report = _report({
        "gradcam": {"avg_increase": 0.0, "deletion_auc": 0.2, "insertion_auc": 0.50},
        "layercam": {"avg_increase": 0.0, "deletion_auc": 0.2001, "insertion_auc": 0.40},
        "random": {"avg_increase": 0.0, "deletion_auc": 0.3, "insertion_auc": 0.55},
    })
    assert report.best() == {}  # increase: all 0.000; deletion: a tie as shown; insertion: random is best
    head, rows = table_rows(report)
    assert not any("*" in cell for row in rows for cell in row)
    assert [r[0] for r in rows] == ["Grad-CAM", "Layer-CAM", "random"]
    report.rows["layercam"]["deletion_auc"] = 0.25
    assert report.best() == {"deletion_auc": "gradcam"}
    assert "0.200*" in format_table(report) and format_table(report).count("*") == 1
    report.rows["layercam"]["deletion_auc"] = 0.35  # worse than random: still gradcam, strictly
    report.rows["gradcam"]["deletion_auc"] = 0.31
    assert report.best() == {}  # the best does not beat random 0.3


def test_reading_names_faithful_localised_random_and_recommended():
    from lumos.evaluate.report import format_reading, read_report

    report = _report({
        "gradcam": {"pointing_game": 0.9, "relevance_mass": 0.3, "deletion_auc": 0.2, "insertion_auc": 0.8,
                    "avg_drop": 0.1, "avg_increase": 0.2},
        "eigencam": {"pointing_game": 1.0, "relevance_mass": 0.4, "deletion_auc": 0.25, "insertion_auc": 0.7,
                     "avg_drop": 0.2, "avg_increase": 0.1},
        "gradients": {"pointing_game": 0.1, "relevance_mass": 0.02, "deletion_auc": 0.4, "insertion_auc": 0.4,
                      "avg_drop": 0.8, "avg_increase": 0.0},
        "random": {"pointing_game": 0.1, "relevance_mass": 0.03, "deletion_auc": 0.3, "insertion_auc": 0.5,
                   "avg_drop": 0.7, "avg_increase": 0.0},
    })
    reading = read_report(report)
    assert reading.most_faithful == ["gradcam"] and reading.best_localised == ["eigencam"]
    assert reading.not_above_random == ["gradients"] and reading.fails_sanity == []
    assert reading.recommended == ["gradcam", "eigencam"]  # mean ranks: (1 + 2) / 2 each
    lines = format_reading(reading, lambda names: " or ".join(f"--method {n}" for n in names))
    assert "Most faithful here: Grad-CAM (" in lines[0]
    assert lines[1].startswith("Best localised: Eigen-CAM (")
    assert lines[2].startswith("Not better than random maps here: Gradients (saliency);")
    assert lines[3] == "Recommended for this model: Grad-CAM or Eigen-CAM (--method gradcam or --method eigencam)."
    assert lines[4].startswith("Based on 3 image(s)")
    report.rows["gradcam"]["sanity_spearman"] = 0.9  # the map survives randomising the model
    report.rows["eigencam"]["sanity_spearman"] = 0.1
    assert read_report(report).fails_sanity == ["gradcam"] and read_report(report).recommended == ["eigencam"]


def test_reading_when_nothing_beats_random():
    from lumos.evaluate.report import format_reading, read_report

    report = _report({"gradcam": {"deletion_auc": 0.4, "insertion_auc": 0.4},
                      "random": {"deletion_auc": 0.3, "insertion_auc": 0.5}})
    reading = read_report(report)
    assert reading.recommended == [] and reading.not_above_random == ["gradcam"]
    assert any(line.startswith("No method can be recommended here") for line in format_reading(reading))


def test_synthetic_benchmark_summary_recommends_a_method(capsys, tmp_path):
    import json

    code, out, _ = _run(capsys, "evaluate", "--benchmark", "synthetic", "--method", "gradcam,eigencam", "--n", "16",
                        "--steps", "4", "--out", tmp_path)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("Recommended for this model: "))
    assert "--method gradcam" in line or "--method eigencam" in line
    assert "Best localised: " in out and "(* = strictly best in its column and better than random" in out
    reading = json.loads((tmp_path / "evaluation.json").read_text())["reading"]
    assert reading["recommended"] and set(reading["recommended"]) <= {"gradcam", "eigencam"}
    assert reading["benchmark"] == "synthetic"


def test_photo_folder_summary_recommends_a_method(capsys, tmp_path):
    pytest.importorskip("skimage")
    from lumos.io import sample_images

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in list(sample_images().items())[:2]:
        image.save(photos / f"{name}.png")
    code, out, _ = _run(capsys, "evaluate", photos, "--method", "gradcam", "--steps", "8", "--out", tmp_path / "ev")
    assert code == 0
    assert "Recommended for this model: Grad-CAM (--method gradcam)." in out.splitlines()
    assert "Based on 2 image(s)" in out


def test_reading_names_no_most_faithful_method_when_random_is_more_faithful():
    from lumos.evaluate.report import format_reading, read_report

    # Grad-CAM beats random overall (on localisation) but random maps are more faithful than its maps
    report = _report({"gradcam": {"pointing_game": 0.9, "relevance_mass": 0.4, "energy_pointing_game": 0.5,
                                  "deletion_auc": 0.35, "insertion_auc": 0.45},
                      "random": {"pointing_game": 0.1, "relevance_mass": 0.1, "energy_pointing_game": 0.1,
                                 "deletion_auc": 0.3, "insertion_auc": 0.5}})
    reading = read_report(report)
    assert reading.not_above_random == [] and reading.best_localised == ["gradcam"]
    assert reading.most_faithful == []
    assert not any(line.startswith("Most faithful here") for line in format_reading(reading))
