"""A file that cannot be written, or a benchmark too big for memory: one line each, the rest of the run kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import run_cli as _run

MODEL = ["--model", "nets:GapNet", "--size", "32", "--method", "gradcam"]


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths




@pytest.mark.parametrize("extra", [[], ["--captions"]])
def test_an_overlay_that_cannot_be_written_fails_alone(capsys, tmp_path, photos, extra):
    out = tmp_path / "out"
    (out / "a_gradcam.png").mkdir(parents=True)  # a folder where the first overlay should go
    code, stdout, err = _run(capsys, "explain", *photos, *MODEL, "--out", out, *extra)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: Cannot write {out / 'a_gradcam.png'}: Is a directory."]
    assert (out / "b_gradcam.png").is_file()
    assert "Explained 2 image(s) with 1 method(s): 1 file(s) in" in stdout and "; 1 failed" in stdout


def test_a_gallery_that_cannot_be_written_is_counted_as_failed(capsys, tmp_path, photos):
    out = tmp_path / "out"
    (out / "gallery.png").mkdir(parents=True)
    code, stdout, err = _run(capsys, "explain", *photos, *MODEL, "--out", out, "--gallery")
    assert code == 1 and f"error: Cannot write {out / 'gallery.png'}: Is a directory." in err
    assert "2 file(s) in" in stdout and (out / "a_gradcam.png").is_file()


def test_a_synthetic_benchmark_bigger_than_memory_is_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "evaluate", "--benchmark", "synthetic", "--n", "100000000000",
                        "--method", "gradcam", "--out", tmp_path / "ev")
    assert code == 2 and err.startswith("error: --n 100000000000 synthetic images need")
    assert "GiB free. Use --n" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()


def test_lumos_methods_gives_each_method_a_whole_sentence(capsys):
    from lumos.api import methods

    code, out, _ = _run(capsys, "methods")
    assert code == 0
    entries: dict[str, str] = {}
    name = None
    for line in out.splitlines():  # a wrapped description continues under its own column
        first, _, rest = line.partition("  ")
        if first.strip():
            name = first.strip()
            entries[name] = rest.strip()
        else:
            entries[name] += " " + line.strip()
    assert list(entries) == methods()
    for name, text in entries.items():
        assert text.endswith(".") and not text.endswith("et al."), (name, text)
    assert "R += A_bar @ R." in entries["grad_rollout"]


def test_features_says_when_n_is_more_than_the_layer_has(capsys, tmp_path, photos):
    code, out, err = _run(capsys, "features", photos[0], "--model", "nets:GapNet", "--size", "32",
                          "--layer", "features", "--n", "500", "--out", tmp_path / "f")
    assert code == 0 and "note: layer features has 16 channels; --n 500 shows all 16." in err
    listed = out.split("channels [")[1].split("]")[0].split(", ")
    assert len(listed) == 16 and listed[-1] != "..."
    code, out, err = _run(capsys, "features", photos[0], "--model", "nets:GapNet", "--size", "32",
                          "--layer", "features.0", "--n", "8", "--out", tmp_path / "g")
    assert code == 0 and "note:" not in err and len(out.split("channels [")[1].split("]")[0].split(", ")) == 8


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--batch-size", "-1"), ("--n", "0")])
def test_evaluate_names_the_option_that_is_not_positive(capsys, tmp_path, flag, value):
    code, _, err = _run(capsys, "evaluate", "--benchmark", "synthetic", "--method", "gradcam", flag, value,
                        "--out", tmp_path / "ev")
    assert code == 2 and err.strip() == f"error: {flag} must be a positive integer, got {value}."


def test_a_weights_file_that_is_not_a_checkpoint_says_so(capsys, tmp_path, photos):
    (tmp_path / "w.txt").write_text("hello")
    code, _, err = _run(capsys, "explain", photos[0], "--model", "nets:GapNet", "--weights", tmp_path / "w.txt",
                        "--out", tmp_path / "o")
    assert code == 2 and "is not a torch checkpoint (torch.save writes a zip archive)" in err


def test_a_store_that_is_a_file_says_so(capsys, tmp_path, photos):
    pytest.importorskip("pyarrow")
    (tmp_path / "afile").write_text("")
    code, _, err = _run(capsys, "explain-dataset", photos[0], *MODEL, "--store", tmp_path / "afile")
    assert code == 2 and err.strip() == f"error: The store {tmp_path / 'afile'} (--store) is a file, not a folder; " \
        "give a folder for the store."


@pytest.mark.parametrize("command", ["explain", "evaluate", "explain-dataset"])
def test_help_is_whole_at_80_columns_and_boxed_when_wide(command):
    import os
    import subprocess
    import sys

    def helptext(columns: int) -> str:
        env = {**os.environ, "COLUMNS": str(columns)}
        done = subprocess.run([sys.executable, "-m", "lumos.cli", command, "--help"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    narrow = helptext(80)
    assert "…" not in narrow and "╭" not in narrow and "efficientnet_lite0" in narrow
    assert max(map(len, narrow.splitlines())) <= 80
    assert "╭─ Options" in helptext(140)


def test_ctrl_c_in_explain_dataset_says_how_to_resume(capsys, tmp_path, photos, monkeypatch):
    pytest.importorskip("pyarrow")
    import lumos.dataset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lumos.dataset, "explain_dataset", interrupted)
    code, _, err = _run(capsys, "explain-dataset", *photos, *MODEL, "--store", tmp_path / "s")
    assert code == 130
    assert err.strip() == (f"interrupted: the finished chunks are kept in {tmp_path / 's'}; run the same command "
                           "again to finish the rest (finished chunks are skipped).")
