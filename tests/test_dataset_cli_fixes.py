"""`lumos explain-dataset` and `lumos report` on the inputs a CLI audit found mishandled: flat folders with
`--target both`, stores with no map to report, folders whose sub-folders are not classes, the failed images in
the summary, and a resume with another chunk size.

The shipped TinyCNN on small synthetic images keeps this fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_run import run_cli as _cli
from lumos.dataset import read_store
from lumos.synthetic import make_dataset
from lumos.synthetic.shortcut import write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["-m", "lumos.synthetic:load_tinycnn", "--size", "64", "--mean", "0", "--std", "1", "--workers", "0"]




@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """8 synthetic images in class folders (disc/, plus/, ...) with labels.txt."""
    root = tmp_path_factory.mktemp("classes")
    write_image_folder(make_dataset(8, seed=3), root)
    return root


def _flat(src: Path, folder: Path, n: int = 3) -> Path:
    """``n`` of the class-folder images copied flat into ``folder`` (no labels)."""
    folder.mkdir(parents=True)
    for k, p in enumerate(sorted(src.rglob("*.png"))[:n]):
        (folder / f"{k}.png").write_bytes(p.read_bytes())
    return folder


def test_target_both_on_a_flat_folder_makes_the_predicted_maps(classes, tmp_path, capsys) -> None:
    """No labels: every image gets its predicted-class map, no error rows, one note in the summary, exit 0
    (was: every row the error "has no label", exit 1, and no map at all)."""
    flat = _flat(classes, tmp_path / "flat")
    code, out, err = _cli(capsys, "explain-dataset", flat, "--store", tmp_path / "s", "--target", "both", *TINY)
    assert code == 0, err
    rows = read_store(tmp_path / "s").to_pandas()
    assert rows.error.isna().all() and sorted(rows["index"]) == [0, 1, 2]
    assert set(rows.target_kind) == {"predicted"} and rows["map"].notna().all()
    assert "3 without a label (their predicted-class map only)" in out and "failed" not in out, out
    assert "no label" not in err


def test_target_both_on_labelled_and_unlabelled_images_gives_each_its_maps(classes, tmp_path, capsys) -> None:
    """Class folders plus one image directly in the root: the labelled images get both maps, the other its
    predicted one only."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(classes, root)
    (root / "loose.png").write_bytes(next(classes.rglob("*.png")).read_bytes())
    code, out, err = _cli(capsys, "explain-dataset", root, "--store", tmp_path / "s", "--target", "both", *TINY,
                          "--labels", root / "labels.txt")
    assert code == 0, err
    rows = read_store(tmp_path / "s").to_pandas()
    assert rows.error.isna().all()
    kinds = rows.groupby("path").target_kind.apply(sorted).to_dict()
    assert kinds.pop(str(root / "loose.png")) == ["predicted"]
    assert len(kinds) == 8 and all(k == ["label", "predicted"] for k in kinds.values())
    assert "1 without a label" in out


def test_target_label_with_no_label_at_all_is_refused_before_any_work(classes, tmp_path, capsys) -> None:
    flat = _flat(classes, tmp_path / "flat")
    code, _, err = _cli(capsys, "explain-dataset", flat, "--store", tmp_path / "s", "--target", "label", *TINY)
    assert code == 2 and err.startswith("error: Target 'label'") and "none of the 3 images" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "s").exists()


def test_report_on_a_store_whose_rows_all_failed_is_an_error(tmp_path, capsys) -> None:
    """Was: a blank report.png and exit 0."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.png").write_text("nor this")
    code, _, _ = _cli(capsys, "explain-dataset", bad, "--store", tmp_path / "s", *TINY)
    assert code == 1
    code, out, err = _cli(capsys, "report", tmp_path / "s")
    assert code == 1 and len(err.splitlines()) == 1, (code, out, err)
    assert err.startswith(f"error: Nothing to report from {tmp_path / 's'}: 2 of 2 rows failed (the first: ")
    assert "a.png" in err and not (tmp_path / "s" / "report").exists()
    code, out, err = _cli(capsys, "explain-dataset", bad, "--store", tmp_path / "s", *TINY, "--report")
    assert code == 1 and "Nothing to report" in err and not (tmp_path / "s" / "report").exists()


def test_report_on_a_store_without_chunks_or_without_the_asked_maps_is_an_error(classes, tmp_path,
                                                                                  capsys) -> None:
    from lumos.dataset import Item, RunOptions, Store
    from lumos.dataset.batch import spec_hash
    from lumos.explainer import ExplainSpec

    empty = tmp_path / "empty"
    Store.open(empty, [Item(0, "x.png")], spec_hash(ExplainSpec(), RunOptions()),
               {"methods": ["gradcam"], "target_kinds": ["predicted"]}, 1024)
    code, _, err = _cli(capsys, "report", empty)
    assert code == 1 and err.startswith(f"error: Nothing to report from {empty}: it holds no finished chunk")

    flat = _flat(classes, tmp_path / "flat")
    code, _, err = _cli(capsys, "explain-dataset", flat, "--store", tmp_path / "s", "--target", "both", *TINY)
    assert code == 0, err
    code, _, err = _cli(capsys, "report", tmp_path / "s", "--target", "label")
    assert code == 1 and "no label-class map of gradcam (3 rows, 0 failed; an image without a label" in err
    code, out, err = _cli(capsys, "report", tmp_path / "s")
    assert code == 0 and (tmp_path / "s" / "report" / "report.png").exists(), err


def _dated(src: Path, root: Path) -> Path:
    """Images in a sub-folder that is not a class: ``root/2023/*.png``."""
    _flat(src, root / "2023")
    return root


def test_a_non_class_sub_folder_is_no_error_when_the_target_needs_no_label(classes, tmp_path, capsys) -> None:
    """photos/2023/*.png with the predicted target: explained, the folder name kept as text, one note naming
    the folder (was: "Class index 2023 is out of range" and nothing explained)."""
    photos = _dated(classes, tmp_path / "photos")
    code, out, err = _cli(capsys, "explain-dataset", photos, "--store", tmp_path / "s", *TINY)
    assert code == 0, err
    rows = read_store(tmp_path / "s").to_pandas()
    assert len(rows) == 3 and rows.error.isna().all() and rows["map"].notna().all()
    assert set(rows.label) == {"2023"} and rows.label_index.isna().all()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"'2023' (from the folder {photos / '2023'})" in notes[0], err
    code, out, err = _cli(capsys, "report", tmp_path / "s")
    assert code == 0, err


def test_an_unknown_label_names_its_folder_or_list_line_when_the_target_needs_labels(classes, tmp_path,
                                                                                    capsys) -> None:
    photos = _dated(classes, tmp_path / "photos")
    code, _, err = _cli(capsys, "explain-dataset", photos, "--store", tmp_path / "s", "--target", "both", *TINY)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: The label '2023' (from the folder {photos / '2023'}) is not a class of the model")
    assert not (tmp_path / "s").exists()

    files = sorted(classes.rglob("*.png"))[:3]
    listing = tmp_path / "list.csv"
    listing.write_text(f"# path,label\n{files[0]},disc\n{files[1]},zebra\n{files[2]},okapi\n")
    code, _, err = _cli(capsys, "explain-dataset", listing, "--store", tmp_path / "s2", "--target", "label", *TINY,
                        "--labels", classes / "labels.txt")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"The label 'zebra' (from {listing} line 3) is not a class" in err
    assert f"1 other label(s) are not classes either: 'okapi' (from {listing} line 4)" in err


def test_the_summary_names_the_first_failed_images_and_where_the_rest_are(classes, tmp_path, capsys) -> None:
    folder = _flat(classes, tmp_path / "many", n=2)
    for k in range(7):
        (folder / f"bad{k}.png").write_text("not an image")
    store = tmp_path / "s"
    code, out, err = _cli(capsys, "explain-dataset", folder, "--store", store, *TINY)
    assert code == 1 and "7 failed" in out, (out, err)
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 5, err
    for k, line in enumerate(failed):  # in store order, each with its reason
        assert str(folder / f"bad{k}.png") in line and "not a recognised image format" in line, line
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: 2 more failed image(s); every failed image is a row of "
                                                   f"{store} with its 'error'"), err
    rows = read_store(store).to_pandas()
    assert sorted(rows[rows.error.notna()].path) == sorted(str(folder / f"bad{k}.png") for k in range(7))

    code, out, err = _cli(capsys, "explain-dataset", folder, "--store", store, *TINY)  # resumed: still said
    assert code == 1 and len([line for line in err.splitlines() if line.startswith("failed: ")]) == 5


def test_resuming_with_another_chunk_size_names_it_with_both_values(classes, tmp_path, capsys) -> None:
    """Was: "made with another spec (model ..., maps uint8, now model ..., maps uint8)", the same text twice."""
    flat = _flat(classes, tmp_path / "flat")
    store = tmp_path / "s"
    code, _, err = _cli(capsys, "explain-dataset", flat, "--store", store, "--chunk-size", "2", *TINY)
    assert code == 0, err
    code, _, err = _cli(capsys, "explain-dataset", flat, "--store", store, "--chunk-size", "3", *TINY)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: The store {store} was made with chunk size 2 (now 3); use --restart"), err
    code, _, err = _cli(capsys, "explain-dataset", flat, "--store", store, "--chunk-size", "2", "--map-dtype",
                        "float16", "--method", "gradcam,scorecam", "--set", "scorecam.max_channels=4", *TINY)
    assert code == 2 and ("made with methods gradcam (now gradcam,scorecam), method settings default (now "
                          "'scorecam: max_channels=4'), map precision uint8 (now float16);") in err, err
    code, out, err = _cli(capsys, "explain-dataset", flat, "--store", store, "--chunk-size", "2", *TINY)
    assert code == 0 and "0 processed now, 3 already done" in out, err


def test_every_setting_of_the_spec_hash_is_named(classes) -> None:
    """Each field the store's spec hash covers changes a named setting, so a refusal can always say which."""
    from dataclasses import fields, replace

    from lumos.dataset import RunOptions
    from lumos.dataset.batch import run_settings, spec_hash
    from lumos.explainer import ExplainSpec, MethodSpec, ModelSpec

    spec, options = ExplainSpec(model=ModelSpec("lumos.synthetic:load_tinycnn")), RunOptions()
    changes = {"weights": "w.pt", "size": 32, "mean": (0.1,), "std": (0.2,), "labels": "l.txt", "name": "other"}
    assert set(changes) == {f.name for f in fields(ModelSpec)}
    variants = [replace(spec, model=replace(spec.model, **{k: v})) for k, v in changes.items()]
    variants += [replace(spec, methods=(MethodSpec("gradients"),)), replace(spec, layer="conv2"),
                 replace(spec, output=0), replace(spec, probs="sigmoid"), replace(spec, top_k=5),
                 replace(spec, methods=(MethodSpec("scorecam", (("max_channels", 4),)),))]
    seen = {f.name for f in fields(ExplainSpec)} - {"model", "methods", "layer", "output", "probs", "top_k"}
    assert seen == {"target", "settings", "device"}  # target: below; settings merge into methods; device: not hashed
    base = run_settings(spec, options)
    for other, opts in [(v, options) for v in variants] + [
            (spec, RunOptions(chunk_size=7)), (spec, RunOptions(map_dtype="float32")), (spec, RunOptions(map_size=4)),
            (spec, RunOptions(target="both")), (replace(spec, target=2), RunOptions(target="class"))]:
        assert spec_hash(other, opts) != spec_hash(spec, options)
        assert run_settings(other, opts) != base, (other, opts)


def test_a_store_written_before_settings_were_recorded_still_names_the_chunk_size(classes, tmp_path) -> None:
    import json

    from lumos.dataset import Item, RunOptions, explain_dataset
    from lumos.errors import LumosError
    from lumos.explainer import ExplainSpec, ModelSpec

    spec = ExplainSpec(model=ModelSpec("lumos.synthetic:load_tinycnn", size=64, mean=(0.0,), std=(1.0,)))
    items = [Item(i, str(p)) for i, p in enumerate(sorted(classes.rglob("*.png"))[:2])]
    explain_dataset(items, spec, tmp_path / "s", options=RunOptions(chunk_size=1), workers=0)
    manifest = tmp_path / "s" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["settings"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(LumosError, match=r"made with chunk size 1 \(now 2\); use --restart"):
        explain_dataset(items, spec, tmp_path / "s", options=RunOptions(chunk_size=2), workers=0)
    with pytest.raises(LumosError, match=r"made with another spec \(model .*methods gradcam,.*now .*methods "
                                         r"gradients,"):
        explain_dataset(items, ExplainSpec(model=spec.model, methods=("gradients",)), tmp_path / "s",
                        options=RunOptions(chunk_size=1), workers=0)
