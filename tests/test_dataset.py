"""Data set runs (local engine): the store against a bare Explainer loop, exact resume after SIGKILL, bad files as
rows, refusals, the command line, and the planted-shortcut report.

Small synthetic images (64 x 64) and the TinyCNNs keep this fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cli_run import run_cli as _cli
from lumos.dataset import Item, RunOptions, explain_dataset, list_items, read_store
from lumos.dataset.batch import decode_map
from lumos.dataset.report import dataset_report, write_report
from lumos.errors import LumosError
from lumos.explainer import Explainer, ExplainSpec, ModelSpec
from lumos.io import load_image
from lumos.synthetic import make_dataset
from lumos.synthetic.shortcut import MARKED_CLASS, make_shortcut_dataset, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = "lumos.synthetic:load_tinycnn"
SHORTCUT = "lumos.synthetic.shortcut:load_shortcut_cnn"


def tiny_spec(folder: Path, model: str = CLEAN, methods=("gradcam",)) -> ExplainSpec:
    return ExplainSpec(model=ModelSpec(model, size=64, mean=(0.0,), std=(1.0,), labels=str(folder / "labels.txt")),
                       methods=methods)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 synthetic images in class folders, a boxes.parquet table, and one corrupt file."""
    root = tmp_path_factory.mktemp("shapes")
    write_image_folder(make_dataset(24, seed=5), root)
    (root / "disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


@pytest.fixture(scope="module")
def full_store(data, tmp_path_factory) -> Path:
    """An uninterrupted run: two methods, both target kinds, chunks of 5 images."""
    store = tmp_path_factory.mktemp("full") / "store"
    explain_dataset([data], tiny_spec(data, methods=("gradcam", "gradients")), store,
                    options=RunOptions(target="both", chunk_size=5), batch_size=4, workers=1)
    return store


def test_store_matches_a_bare_explainer_loop(data, full_store) -> None:
    table = read_store(full_store).to_pandas()
    items, _ = list_items([data])
    assert len(items) == 25
    errors = table[table.error.notna()]
    assert list(errors.path) == [str(data / "disc" / "broken.png")]  # a row with its error, not a crash
    assert "corrupt" in errors.error.iloc[0] or "not a recognised" in errors.error.iloc[0]
    good = table[table.error.isna()]
    keys = list(zip(good["index"], good.target_kind, good.method, strict=True))
    assert len(keys) == len(set(keys)) == 24 * 2 * 2  # every image exactly once per target kind and method
    assert sorted(set(good["index"]) | set(errors["index"])) == list(range(25))

    explainer = Explainer(tiny_spec(data, methods=("gradcam", "gradients")))
    paths = [it.path for it in items if it.path in set(good.path)]
    x = explainer.bundle.preprocess([load_image(p) for p in paths])
    labels = torch.tensor([explainer.labels.index_of(Path(p).parent.name) for p in paths])
    for kind, target in (("predicted", None), ("label", labels)):
        for name, method in explainer.methods(x).items():
            ex = method(x, target)
            rows = good[(good.target_kind == kind) & (good.method == name)].set_index("path").loc[paths]
            assert list(rows.target) == ex.targets.tolist()
            np.testing.assert_allclose(rows.prob, ex.probs.numpy(), rtol=1e-5)
            side = 16 if ex.kind == "layer" else 32  # the layer's resolution; pixel maps at most 32 a side
            ref = F.avg_pool2d(ex.maps[:, None], 64 // side)[:, 0].numpy()
            for j, (_, row) in enumerate(rows.iterrows()):
                stored = decode_map(row)
                step = (row.map_hi - row.map_lo) / 255
                assert np.abs(stored - ref[j]).max() <= step / 2 + 1e-5
                m = ex.maps[j].abs().numpy()
                assert row.mass_border == pytest.approx(1 - m[8:56, 8:56].sum() / m.sum(), abs=1e-5)
                assert (row.peak_y, row.peak_x) == pytest.approx(
                    ((np.argmax(m) // 64 + 0.5) / 64, (np.argmax(m) % 64 + 0.5) / 64))
    preds = good[good.target_kind == "predicted"]
    assert (preds.pred == preds.target).all()


def test_box_mass_outside_by_hand(data, tmp_path) -> None:
    store = tmp_path / "store"
    explain_dataset([data / "boxes.parquet"], tiny_spec(data), store, workers=0)
    rows = read_store(store).to_pandas()
    assert rows.label.notna().all() and rows.box.notna().all()
    explainer = Explainer(tiny_spec(data))
    row = rows.iloc[3]
    m = explainer([load_image(row.path)]).explanations["gradcam"].maps[0].abs().numpy()
    x0, y0, x1, y1 = (int(v) for v in row.box)  # the image is 64 x 64, like the model's input
    inside = m[y0:y1, x0:x1].sum()
    assert row.mass_outside_box == pytest.approx(1 - inside / m.sum(), abs=1e-5)


def test_sigkill_half_way_then_resume_gives_the_same_store(data, full_store, tmp_path) -> None:
    store = tmp_path / "store"
    script = textwrap.dedent(f"""
        import time, torch
        torch.set_num_threads(1)
        from lumos.dataset import RunOptions, explain_dataset, store as st
        from lumos.explainer import ExplainSpec, ModelSpec
        write = st.Store.write_chunk
        def slow(self, *a, **k):  # give the test time to kill the run between chunks
            write(self, *a, **k)
            time.sleep(0.4)
        st.Store.write_chunk = slow
        spec = ExplainSpec(model=ModelSpec({CLEAN!r}, size=64, mean=(0.0,), std=(1.0,),
                           labels={str(data / "labels.txt")!r}), methods=("gradcam", "gradients"))
        explain_dataset([{str(data)!r}], spec, {str(store)!r}, options=RunOptions(target="both", chunk_size=5),
                        batch_size=4, workers=0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    chunks = store / "chunks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(chunks.glob("part-*.parquet"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in chunks.glob("part-*.parquet"))
    assert 2 <= len(written) < 5  # killed half-way
    (chunks / ".part-00004.parquet.tmp-1").write_bytes(b"half a file")  # as if killed while writing
    run = explain_dataset([data], tiny_spec(data, methods=("gradcam", "gradients")), store,
                          options=RunOptions(target="both", chunk_size=5), batch_size=4, workers=0)
    assert run.skipped == 5 * len(written) and run.explained == 25 - run.skipped
    assert not list(chunks.glob(".part-*"))
    resumed, whole = read_store(store), read_store(full_store)
    assert resumed.num_rows == whole.num_rows
    a, b = resumed.to_pandas(), whole.to_pandas()
    assert list(a["index"]) == list(b["index"]) and list(a.method) == list(b.method)
    assert list(a.target_kind) == list(b.target_kind)
    for col in ("pred", "target", "error", "path"):
        assert a[col].equals(b[col])
    for ra, rb in zip(a[a.error.isna()].itertuples(), b[b.error.isna()].itertuples(), strict=True):
        step = (rb.map_hi - rb.map_lo) / 255
        assert np.abs(decode_map(ra._asdict()) - decode_map(rb._asdict())).max() <= step + 1e-3


def test_a_changed_spec_is_refused_unless_restarted(data, tmp_path) -> None:
    store = tmp_path / "store"
    items = [Item(i, str(p)) for i, p in enumerate(sorted((data / "disc").glob("0*.png"))[:3])]
    explain_dataset(items, tiny_spec(data), store, workers=0)
    with pytest.raises(LumosError, match=r"made with methods gradcam \(now gradcam\+\+\); use --restart"):
        explain_dataset(items, tiny_spec(data, methods=("gradcam++",)), store, workers=0)
    with pytest.raises(LumosError, match="other images"):
        explain_dataset(items[:2], tiny_spec(data), store, workers=0)
    run = explain_dataset(items, tiny_spec(data, methods=("gradcam++",)), store, workers=0, restart=True)
    assert run.explained == 3 and set(read_store(store).column("method").to_pylist()) == {"gradcam++"}
    again = explain_dataset(items, tiny_spec(data, methods=("gradcam++",)), store, workers=0)
    assert again.explained == 0 and again.skipped == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LumosError, match="not a lumos data set store"):
        explain_dataset(items, tiny_spec(data), tmp_path / "other", workers=0)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]  # not even a lock file


def test_a_store_being_written_is_refused_to_a_second_run(data, tmp_path) -> None:
    """While one run holds a store (its lock), a second run on it is a one-line error naming the holder and
    writes nothing; once the first ends, the same call runs. (A killed run's lock goes with its process: the
    SIGKILL test above resumes after one.)"""
    import os

    from lumos.dataset.store import store_lock

    store = tmp_path / "store"
    items = [Item(i, str(p)) for i, p in enumerate(sorted((data / "disc").glob("0*.png"))[:2])]
    with store_lock(store):
        with pytest.raises(LumosError, match=rf"being written by another run \(process {os.getpid()}\)"):
            explain_dataset(items, tiny_spec(data), store, workers=0)
        assert not (store / "manifest.json").exists() and not (store / "chunks").exists()
    assert explain_dataset(items, tiny_spec(data), store, workers=0).explained == 2


def test_unknown_label_and_topk_are_one_line_errors(data, tmp_path) -> None:
    """An unknown label is an error when the target explains labels; otherwise it is kept as text, unused."""
    image = str(next((data / "disc").glob("0*.png")))
    with pytest.raises(LumosError, match=f"'zebra' \\(from the image {image}\\).*Unknown class name 'zebra'"):
        explain_dataset([Item(0, image, "zebra")], tiny_spec(data), tmp_path / "s", workers=0,
                        options=RunOptions(target="label"))
    run = explain_dataset([Item(0, image, "zebra")], tiny_spec(data), tmp_path / "s1", workers=0)
    assert run.unknown_labels == [("zebra", f"the image {image}")]
    row = read_store(tmp_path / "s1").to_pandas().iloc[0]
    assert row.label == "zebra" and pd.isna(row.label_index) and pd.isna(row.error) and row.map is not None
    spec = ExplainSpec(model=tiny_spec(data).model, target="topk:2")
    with pytest.raises(LumosError, match="one map per image"):
        explain_dataset([data], spec, tmp_path / "s2", options=RunOptions(target="class"), workers=0)




@pytest.fixture(scope="module")
def shortcut_data(tmp_path_factory) -> Path:
    """The planted-shortcut images (squares carry the corner mark) with their object boxes."""
    root = tmp_path_factory.mktemp("marked")
    write_image_folder(make_shortcut_dataset(48, seed=7), root)
    return root


def test_cli_runs_and_reports_the_planted_shortcut(shortcut_data, tmp_path, capsys) -> None:
    model = ["--size", "64", "--mean", "0", "--std", "1", "--labels", shortcut_data / "labels.txt"]
    table = shortcut_data / "boxes.parquet"
    code, out, err = _cli(capsys, "explain-dataset", table, "--store", tmp_path / "s", "-m", SHORTCUT, *model,
                          "--workers", "0", "--report")
    assert code == 0, err
    assert "48 image(s)" in out and "Most mass outside the object's box: square" in out
    rep = dataset_report(tmp_path / "s")
    marked = rep.classes[0]
    assert marked.name == "square" and marked.images == 12
    assert marked.mean_map_peak[0] < 0.2 and marked.mean_map_peak[1] < 0.2  # the top-left corner
    assert marked.outside > rep.classes[1].outside + 0.1
    assert (tmp_path / "s" / "report" / "report.png").stat().st_size > 10_000

    code, out, err = _cli(capsys, "explain-dataset", table, "--store", tmp_path / "c", "-m", CLEAN, *model,
                          "--workers", "0")
    assert code == 0, err
    clean = dataset_report(tmp_path / "c")
    by_name = {c.name: c for c in clean.classes}
    assert clean.classes[0].name != "square"
    assert not (by_name["square"].mean_map_peak[0] < 0.25 and by_name["square"].mean_map_peak[1] < 0.25)
    paths = write_report(clean, tmp_path / "clean_report")
    assert [p.name for p in paths] == ["report.png", "report.html", "report.json"]

    code, out, err = _cli(capsys, "explain-dataset", table, "--store", tmp_path / "s", "-m", CLEAN, *model)
    assert code == 2 and err.startswith("error: The store") and "--restart" in err and len(err.splitlines()) == 1
    code, _, err = _cli(capsys, "explain-dataset", table, "--store", tmp_path / "x", "--engine", "spark")
    assert code == 2 and "Unknown --engine 'spark'" in err
    code, _, err = _cli(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "not a lumos data set store" in err


def test_shortcut_class_is_marked_in_the_data() -> None:
    d = make_shortcut_dataset(8, seed=1)
    marked = d.labels == MARKED_CLASS
    corner = d.images[:, :, 1:7, 1:7]
    assert torch.equal(corner[marked].amax(dim=(1, 2, 3)), torch.ones(int(marked.sum())))


def test_list_files_and_globs(data, tmp_path) -> None:
    files = sorted((data / "plus").glob("0*.png"))[:3]
    listing = tmp_path / "list.csv"
    listing.write_text(f"# a comment\n{files[0]},plus\n{files[1]}\n\n{files[2]}\tdisc\n")
    items, problems = list_items([listing, str(data / "plus" / "0*.png"), tmp_path / "missing", f"{tmp_path}/*.jpg"])
    assert [(it.path, it.label) for it in items[:3]] == [(str(files[0]), "plus"), (str(files[1]), None),
                                                          (str(files[2]), "disc")]
    assert len(items) == len(list((data / "plus").glob("0*.png")))  # the glob adds no duplicate
    assert [it.index for it in items] == list(range(len(items)))
    assert [why for _, why in problems] == ["no such file or directory", "the pattern matches no file"]


NAN_MODEL = """
import torch
from lumos.synthetic import load_tinycnn


class NanOnBright(torch.nn.Module):
    \"\"\"The shipped TinyCNN, but NaN logits for images brighter than a threshold.\"\"\"

    def __init__(self, threshold):
        super().__init__()
        self.net, self.threshold = load_tinycnn(), threshold

    def forward(self, x):
        out = self.net(x)
        return torch.where((x.mean((1, 2, 3)) > self.threshold)[:, None], torch.tensor(float("nan")), out)


def build():
    return NanOnBright(THRESHOLD)
"""


def test_a_nan_score_on_some_images_becomes_their_error_rows(data, tmp_path, monkeypatch) -> None:
    """A model that gives NaN on the brightest of 6 images: the run goes on, that image is one error row naming
    it (its target kind kept), and the other 5 equal a run of the plain model."""
    from PIL import Image

    files = sorted((data / "disc").glob("0*.png"))[:6]
    means = [float(torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).mean())
             for f in files]
    bright = int(np.argmax(means))
    threshold = (sorted(means)[-1] + sorted(means)[-2]) / 2
    (tmp_path / "nan_on_bright.py").write_text(NAN_MODEL.replace("THRESHOLD", repr(threshold)))
    monkeypatch.syspath_prepend(str(tmp_path))
    items = [Item(i, str(f)) for i, f in enumerate(files)]
    run = explain_dataset(items, tiny_spec(data, model="nan_on_bright:build"), tmp_path / "s", workers=0,
                          batch_size=4)
    plain = explain_dataset(items, tiny_spec(data), tmp_path / "plain", workers=0, batch_size=4)
    assert run.explained == plain.explained == 6
    got = read_store(tmp_path / "s").to_pandas().sort_values("index")
    ref = read_store(tmp_path / "plain").to_pandas().sort_values("index")
    failed = got[got.error.notna()]
    assert failed["index"].tolist() == [bright] and failed.target_kind.tolist() == ["predicted"]
    assert failed.error.iloc[0].startswith(f"{files[bright]}: The model's score for the explained target is not finite")
    ok = got[got.error.isna()].reset_index(drop=True)
    same = ref[ref["index"] != bright].reset_index(drop=True)
    assert ok["index"].tolist() == same["index"].tolist()
    assert ok.pred.tolist() == same.pred.tolist() and np.allclose(ok.mass_centre, same.mass_centre, atol=1e-5)


def test_the_report_counts_failed_images_not_error_rows(data, tmp_path, monkeypatch) -> None:
    """Two methods and both target kinds: a NaN image is an error row per kind, but the report counts it once."""
    from PIL import Image

    files = sorted((data / "disc").glob("0*.png"))[:4]
    means = sorted(float(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).mean() / 255) for f in files)
    (tmp_path / "nan_on_bright.py").write_text(NAN_MODEL.replace("THRESHOLD", repr((means[-1] + means[-2]) / 2)))
    monkeypatch.syspath_prepend(str(tmp_path))
    items = [Item(i, str(f), "disc") for i, f in enumerate(files)]
    explain_dataset(items, tiny_spec(data, model="nan_on_bright:build", methods=("gradcam", "gradients")),
                    tmp_path / "s", options=RunOptions(target="both"), workers=0)
    rows = read_store(tmp_path / "s").to_pandas()
    assert rows.error.notna().sum() == 2 and rows[rows.error.notna()]["index"].nunique() == 1
    for method, kind in (("gradcam", "predicted"), ("gradients", "label")):
        rep = dataset_report(tmp_path / "s", method=method, target_kind=kind)
        assert rep.images == 3 and rep.errors == 1

def test_cli_summary_counts_a_failed_image_once(data, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    from PIL import Image

    files = sorted((data / "disc").glob("0*.png"))[:3]
    means = sorted(float(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).mean() / 255) for f in files)
    (tmp_path / "nan_on_bright.py").write_text(NAN_MODEL.replace("THRESHOLD", repr((means[-1] + means[-2]) / 2)))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "photos" / "disc").mkdir(parents=True)
    for f in files:
        shutil.copy(f, tmp_path / "photos" / "disc" / f.name)
    code, out, err = _cli(capsys, "explain-dataset", tmp_path / "photos", "--store", tmp_path / "s", "-m",
                          "nan_on_bright:build", "--labels", data / "labels.txt", "--size", "64", "--mean", "0",
                          "--std", "1", "--workers", "0", "--target", "both", "--method", "gradcam,gradients")
    assert code == 1 and "3 processed now, 0 already done; 1 failed (rows with their error" in out, (out, err)
    assert len([line for line in err.splitlines() if line.startswith("failed:")]) == 1


def test_cli_counts_blank_maps_once_at_the_end(data, tmp_path, capsys) -> None:
    """A zeroed head makes every Grad-CAM map zero everywhere: one warning line with the count read from the
    store (not one engine line per batch)."""
    import shutil

    from lumos.synthetic import load_tinycnn

    state = load_tinycnn().state_dict()
    state["fc.weight"].zero_()
    torch.save(state, tmp_path / "zero_head.pt")
    folder = tmp_path / "six"
    folder.mkdir()
    for k, src in enumerate(sorted((data / "disc").glob("0*.png"))[:6]):
        shutil.copy(src, folder / f"{k}.png")
    code, out, err = _cli(capsys, "explain-dataset", folder, "--store", tmp_path / "s", "-m", CLEAN, "--weights",
                          tmp_path / "zero_head.pt", "--size", "64", "--mean", "0", "--std", "1", "--workers", "0",
                          "--batch-size", "2")
    lines = [line for line in err.splitlines() if "zero everywhere" in line]
    assert code == 0 and lines == [lines[0]] and lines[0].startswith("warning: 6 map(s) are zero everywhere"), err


def test_cli_summary_counts_an_unreadable_image_apart(shortcut_data, tmp_path, capsys) -> None:
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(next(shortcut_data.rglob("*.png")), folder / "good.png")
    (folder / "bad.png").write_text("not an image")
    code, out, err = _cli(capsys, "explain-dataset", folder, "--store", tmp_path / "s", "-m", SHORTCUT,
                          "--size", "64", "--mean", "0", "--std", "1", "--workers", "0")
    assert code == 1, err  # the run finished, but an input failed: as `lumos explain`
    assert "2 image(s)" in out and "2 processed now, 0 already done; 1 failed (rows with their error" in out, out
    (folder / "bad.png").unlink()
    code, out, err = _cli(capsys, "explain-dataset", folder, "--store", tmp_path / "s2", "-m", SHORTCUT,
                          "--size", "64", "--mean", "0", "--std", "1", "--workers", "0")
    assert code == 0 and "failed" not in out, (code, out, err)
    code, out, err = _cli(capsys, "explain-dataset", folder, tmp_path / "missing", "--store", tmp_path / "s3", "-m",
                          SHORTCUT, "--size", "64", "--mean", "0", "--std", "1", "--workers", "0")
    assert code == 1 and "missing: no such file or directory" in err and "1 processed now" in out, (code, out, err)


def test_the_report_title_fits_a_figure_of_one_class(data, tmp_path) -> None:
    from lumos.dataset.report import report_figure

    items = [Item(i, str(f)) for i, f in enumerate(sorted((data / "disc").glob("0*.png"))[:2])]
    explain_dataset(items, tiny_spec(data), tmp_path / "s", workers=0)
    rep = dataset_report(tmp_path / "s")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report_figure(rep)
    title = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert len(rep.classes) <= 2 and fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1
