"""The per-box detection benchmark: localisation numbers on hand-made maps, a box's deletion curve against a
hand loop, the shipped detector against random maps, and `lumos evaluate --benchmark synthetic-detection`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lumos
from lumos.errors import LumosError
from lumos.evaluate import Deletion
from lumos.evaluate.detection_benchmark import (
    FoundBoxes,
    box_deletion,
    box_localisation,
    box_maps,
    detection_benchmark,
    match_boxes,
)
from lumos.tasks import DetectionTarget

pytestmark = pytest.mark.usefixtures("one_thread")


# -- localisation on hand-made maps ---------------------------------------------------------------------
def hand_made() -> tuple[torch.Tensor, FoundBoxes, torch.Tensor]:
    """Two 6x6 scenes. Scene 0: object A (slot 0, an L of 3 px in the box x 0-2, y 0-2) and object B (slot 2,
    the full box x 3-6, y 3-5); scene 1: object C (slot 0, box x 2-4, y 2-4). One map per object."""
    masks = torch.zeros(2, 3, 6, 6, dtype=torch.bool)
    masks[0, 0, 0, 0] = masks[0, 0, 0, 1] = masks[0, 0, 1, 0] = True
    masks[0, 2, 3:5, 3:6] = True
    masks[1, 0, 2:4, 2:4] = True
    gt = torch.tensor([[0.0, 0, 2, 2], [3, 3, 6, 5], [2, 2, 4, 4]])
    found = FoundBoxes(scene=torch.tensor([0, 0, 1]), boxes=gt.clone(), labels=torch.tensor([0, 1, 2]),
                       scores=torch.ones(3), slot=torch.tensor([0, 2, 0]), gt_boxes=gt,
                       masks=torch.stack([masks[0, 0], masks[0, 2], masks[1, 0]]))
    maps = torch.zeros(3, 6, 6)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 4, 4], maps[0, 5, 5] = 1.0, 0.5, 2.0, -3.0  # max on B; (1,1): box only
    maps[1, 3, 4], maps[1, 0, 0] = 1.0, 0.25
    maps[2, 0, 5] = 1.0  # 2.83 px from C's box
    return maps, found, masks


def test_localisation_numbers_by_hand():
    maps, found, masks = hand_made()
    got = box_localisation(maps, found, masks, tolerance=2.0)
    assert got["pointing_game"].tolist() == [0.0, 1.0, 0.0]  # A: max at (4, 4), 4.24 px from A's box
    assert torch.allclose(got["energy_pointing_game"], torch.tensor([1.5 / 3.5, 1 / 1.25, 0.0]))
    assert torch.allclose(got["relevance_mass"], torch.tensor([1 / 3.5, 1 / 1.25, 0.0]))  # negatives ignored
    d = got["discrimination"]
    assert d[0] == 0.0 and d[1] == 1.0 and math.isnan(d[2])  # A's map: 2/3.5 on B > 1/3.5 on A; C is alone
    assert box_localisation(maps, found, masks, tolerance=3.0)["pointing_game"].tolist() == [0.0, 1.0, 1.0]


def test_discrimination_counts_each_other_object():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3], maps[0, 0, 3] = 2.0, 1.0, 3.0
    own = torch.zeros(1, 4, 4, dtype=torch.bool)
    own[0, 0, 0] = True
    others = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    others[0, 0, 3, 3] = True  # energy 1 < 2: a win
    others[0, 1, 0, 3] = True  # energy 3 > 2: a loss; slot 2 empty: not counted
    from lumos.evaluate.detection_benchmark import discrimination

    assert discrimination(maps, own, others).tolist() == [0.5]


# -- the shipped detector ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from lumos.synthetic.detector import load_tinydetector
    from lumos.synthetic.scenes import make_scenes

    model, scenes = load_tinydetector(), make_scenes(6, seed=123)
    found = match_boxes(model, scenes.images, scenes.labels, scenes.boxes, scenes.masks)
    return model, scenes, found


def test_found_boxes_match_their_objects(shipped):
    _, scenes, found = shipped
    from lumos.tasks import box_iou

    assert len(found) >= 8 and found.scene.tolist() == sorted(found.scene.tolist())
    for j in range(len(found)):
        s, slot = int(found.scene[j]), int(found.slot[j])
        assert int(scenes.labels[s, slot]) == int(found.labels[j])
        assert float(box_iou(found.boxes[j:j + 1], scenes.boxes[s, slot][None])) >= 0.5
        assert torch.equal(found.masks[j], scenes.masks[s, slot])


def test_box_deletion_matches_a_hand_loop(shipped):
    model, scenes, found = shipped
    rows = torch.arange(3)
    sub = FoundBoxes(*(getattr(found, f)[rows] for f in ("scene", "boxes", "labels", "scores", "slot", "gt_boxes",
                                                          "masks")))
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = box_deletion(model, scenes.images, sub, maps, steps=4, batch_size=5)
    for j in range(3):
        x = scenes.images[int(sub.scene[j])][None]
        with torch.no_grad():
            target = DetectionTarget(sub.boxes[j][None], [int(sub.labels[j])]).resolve(model(x))
            order = maps[j].flatten().argsort(descending=True, stable=True)
            curve = []
            for k in range(5):
                y = x.clone().flatten(2)
                y[..., order[: k * 4096 // 4]] = 0.0
                curve.append(float(target.scores(model(y.view_as(x)))[0, 0]))
        auc = sum((curve[k] + curve[k + 1]) / 2 * 0.25 for k in range(4))
        assert result.curves[j].tolist() == pytest.approx(curve, abs=1e-5)
        assert float(result.auc[j]) == pytest.approx(auc, abs=1e-5)
        assert curve[0] == pytest.approx(float(sub.scores[j]), abs=1e-5)  # the clean score of the detection
    with pytest.raises(LumosError, match="one target per image"):  # two boxes per image: one curve cannot say
        Deletion(steps=2)(model, scenes.images[:1], maps[:1], DetectionTarget(found.boxes[:2], found.labels[:2]))


def test_average_drop_of_a_box_matches_a_hand_loop(shipped):
    """Average Drop / Increase take a detection box as Deletion does: the box's score on the image against its
    score on the image times its min-max-scaled map (by hand), one value per image; two boxes per image are a
    one-line error."""
    from lumos.evaluate import AverageDropIncrease

    model, scenes, found = shipped
    rows = torch.arange(3)
    x = scenes.images[found.scene[rows]]
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = DetectionTarget(found.boxes[rows, None], found.labels[rows, None])
    result = AverageDropIncrease()(model, x, maps, target)
    for j in range(3):
        m = (maps[j] - maps[j].min()) / (maps[j].max() - maps[j].min())
        m = torch.nn.functional.interpolate(m[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0]
        with torch.no_grad():
            t = DetectionTarget(found.boxes[j][None], [int(found.labels[j])]).resolve(model(x[j:j + 1]))
            y, o = float(t.scores(model(x[j:j + 1]))[0, 0]), float(t.scores(model(x[j:j + 1] * m))[0, 0])
        assert float(result.probs[j]) == pytest.approx(y, abs=1e-5)
        assert float(result.masked_probs[j]) == pytest.approx(o, abs=1e-5)
        assert float(result.drop[j]) == pytest.approx(max(0.0, y - o) / y, abs=1e-5)
        assert bool(result.increase[j]) == (o > y)
    assert result.classes.tolist() == [-1, -1, -1]
    with pytest.raises(LumosError, match="one target per image"):
        AverageDropIncrease()(model, scenes.images[:1], maps[:1], DetectionTarget(found.boxes[:2], found.labels[:2]))


@pytest.mark.parametrize("method, settings", [("gradcam", {}), ("occlusion", {"window": 16, "stride": 16})])
def test_grouped_maps_are_each_scenes_own_maps(shipped, method, settings):
    model, scenes, found = shipped
    grouped = box_maps(model, scenes.images, found, method, group=2, **settings)
    for s in found.scene.unique().tolist():
        rows = (found.scene == s).nonzero()[:, 0]
        target = DetectionTarget(found.boxes[rows], found.labels[rows])
        alone = lumos.explain(model, scenes.images[s:s + 1], method, target=target, layer="features.block5",
                              **settings).maps
        assert torch.allclose(grouped[rows], alone, atol=1e-5), (method, s)


def test_one_box_at_a_time_methods_get_one_call_per_box(shipped):
    model, scenes, found = shipped
    maps = box_maps(model, scenes.images, found, "smoothgrad", n_samples=2)
    assert maps.shape == (len(found), 64, 64) and torch.isfinite(maps).all()
    s = next(s for s in found.scene.unique().tolist() if (found.scene == s).sum() >= 2)
    rows = (found.scene == s).nonzero()[:, 0]
    assert not torch.allclose(maps[rows[0]], maps[rows[1]])


def test_shipped_detector_gradcam_beats_random():
    report = detection_benchmark(["gradcam", "occlusion"], n=16, steps=8,
                                 method_kwargs={"occlusion": {"window": 8, "stride": 8}})
    g, o, r = report.rows["gradcam"], report.rows["occlusion"], report.rows["random"]
    assert report.meta["boxes"] >= 30 and len(report.per_image["gradcam"]["relevance_mass"]) == report.meta["boxes"]
    assert g["relevance_mass"] >= 2 * r["relevance_mass"] and g["energy_pointing_game"] >= 2 * r["energy_pointing_game"]
    assert g["pointing_game"] >= r["pointing_game"] + 0.5
    assert g["discrimination"] >= 0.8 and r["discrimination"] < 0.7
    assert o["deletion_auc"] < 0.7 * r["deletion_auc"]  # removing occlusion's pixels first kills the box fast
    assert len(report.curves["gradcam"]["deletion"]) == 9
    with pytest.raises(LumosError, match="cam cannot explain a detector box"):
        detection_benchmark(["cam"], n=2, steps=2)


# -- the command ------------------------------------------------------------------------------------------
def lumos_command() -> list[str]:
    script = Path(sys.executable).with_name("lumos")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lumos.cli"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "ev"
    run = subprocess.run([*lumos_command(), "evaluate", "--benchmark", "synthetic-detection", "--method",
                          "gradcam,occlusion", "--n", "3", "--steps", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "discrimination" in run.stdout and "Grad-CAM" in run.stdout and "random" in run.stdout
    assert "boxes found of" in run.stdout
    for name in ("evaluation.csv", "evaluation.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["meta"]["benchmark"] == "synthetic-detection" and set(data["metrics"]) == {"gradcam", "occlusion",
                                                                                            "random"}
    assert len(data["curves"]["gradcam"]["deletion"]) == 5
    assert (out / "evaluation.csv").read_text().splitlines()[0] == (
        "method,pointing_game,energy_pointing_game,relevance_mass,discrimination,deletion_auc")
    bad = subprocess.run([*lumos_command(), "evaluate", "--benchmark", "synthetic-detection", "--method", "cam",
                          "--n", "2", "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "Traceback" not in bad.stderr
    assert lines[0].startswith("error: cam cannot explain a detector box")


@pytest.fixture(scope="module")
def main():
    import lumos.cli as cli
    from lumos.cli_evaluate import register

    register(cli.app)
    return cli.main


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet18"], "runs the shipped detector"),
    (["--sanity"], "--sanity is not available"),
    (["--method", "gradcamm"], "Unknown method"),
    (["--n", "0"], "positive"),
    (["--method", "rollout"], "rollout cannot explain a detector box"),
    (["scene.png"], "not both"),
])
def test_cli_bad_input_is_one_line(main, capsys, tmp_path, args, message):
    code = main(["evaluate", "--benchmark", "synthetic-detection", "--n", "2", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_cli_method_all_skips_what_cannot_explain_a_box(main, capsys, tmp_path):
    code = main(["evaluate", "--benchmark", "synthetic-detection", "--method", "all", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path), "--set", "rise.n_masks=50", "--set", "integrated_gradients.steps=4"])
    captured = capsys.readouterr()
    assert code == 0
    assert "warning: cam skipped" in captured.err
    rows = json.loads((tmp_path / "evaluation.json").read_text())["metrics"]
    assert "cam" not in rows and {"gradcam", "rise", "smoothgrad", "random"} <= set(rows)


def test_cli_methods_typed_out_are_the_methods_run(main, capsys, tmp_path):
    """Typing the classification benchmark's default list explicitly must run exactly that list, not the
    detection benchmark's own default."""
    from lumos.cli_evaluate import DEFAULT_METHODS

    code = main(["evaluate", "--benchmark", "synthetic-detection", "--method", DEFAULT_METHODS, "--n", "1",
                 "--steps", "2", "--out", str(tmp_path)])
    capsys.readouterr()
    assert code == 0
    rows = json.loads((tmp_path / "evaluation.json").read_text())["metrics"]
    assert set(rows) == {*DEFAULT_METHODS.split(","), "random"}


# -- the segmentation sibling -----------------------------------------------------------------------------
def test_region_probability_by_hand():
    from lumos.evaluate.segmentation_benchmark import RegionProbability

    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1, 0, 0] = math.log(2.0)  # softmax at (0, 0): class 1 gets 2 / (1 + 2 + 1) = 0.5
    logits[1, 2] = math.log(6.0)  # everywhere: class 2 gets 6 / 8
    region = torch.zeros(2, 2, 2, dtype=torch.bool)
    region[0, 0, 0] = region[0, 1, 1] = True  # (0, 0): 0.5 and (1, 1): 1/3 -> mean 5/12
    region[1] = True
    target = RegionProbability(torch.tensor([1, 2]), region)
    assert torch.allclose(target(logits), torch.tensor([5 / 12, 0.75]))
    assert torch.allclose(target.select(torch.tensor([1]))(logits[1:]), torch.tensor([0.75]))


def test_region_localisation_by_hand():
    from lumos.evaluate.segmentation_benchmark import FoundRegions, region_localisation

    semantic = torch.zeros(1, 4, 4, dtype=torch.long)
    semantic[0, 0, :2] = 1  # class 1: (0, 0), (0, 1); class 3: (3, 3)
    semantic[0, 3, 3] = 3
    found = FoundRegions(scene=torch.tensor([0, 0]), category=torch.tensor([1, 3]),
                         masks=torch.stack([semantic[0] == 1, semantic[0] == 3]),
                         regions=torch.stack([semantic[0] == 1, semantic[0] == 3]))
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 3.0, 1.0, 4.0  # class 1's map: most energy on class 3
    maps[1, 3, 3], maps[1, 2, 2] = 1.0, 1.0  # class 3's map: max tied at (3, 3) and at (2, 2), 1.41 px away
    got = region_localisation(maps, found, semantic, tolerance=1.0)
    assert got["pointing_game"].tolist() == [0.0, 0.5]  # one of the two tied maxima hits (raster order: (2, 2))
    assert torch.allclose(got["relevance_mass"], torch.tensor([3 / 8, 0.5]))
    assert torch.allclose(got["energy_pointing_game"], torch.tensor([3 / 8, 0.5]))  # boxes: row 0 x 0-1; (3, 3)
    assert got["discrimination"].tolist() == [0.0, 1.0]
    assert region_localisation(maps, found, semantic, tolerance=1.5)["pointing_game"].tolist() == [0.0, 1.0]


def test_shipped_segmenter_gradcam_beats_random():
    from lumos.evaluate.segmentation_benchmark import segmentation_benchmark

    report = segmentation_benchmark(["gradcam"], n=12, steps=8)
    g, r = report.rows["gradcam"], report.rows["random"]
    assert report.meta["regions"] >= 20
    assert g["relevance_mass"] >= 2 * r["relevance_mass"] and g["pointing_game"] >= r["pointing_game"] + 0.5
    assert g["discrimination"] >= 0.8


def test_cli_segmentation_benchmark(main, capsys, tmp_path):
    code = main(["evaluate", "--benchmark", "synthetic-segmentation", "--method", "hirescam", "--n", "3",
                 "--steps", "4", "--out", str(tmp_path)])
    assert code == 0
    assert "class regions found of" in capsys.readouterr().out
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert data["meta"]["model"] == "tinysegmenter" and set(data["metrics"]) == {"hirescam", "random"}
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert main(["evaluate", "--benchmark", "synthetic-segmentation", "--model", "tinydetector"]) == 2
    assert "runs the shipped segmenter" in capsys.readouterr().err


def test_reading_names_only_the_faithfulness_metrics_measured():
    from lumos.evaluate.benchmark import EvaluationReport
    from lumos.evaluate.report import format_reading, read_report

    rows = {"gradcam": {"deletion_auc": 0.1, "pointing_game": 0.9},
            "random": {"deletion_auc": 0.3, "pointing_game": 0.1}}
    line = format_reading(read_report(EvaluationReport(rows=rows)))[0]
    assert line.startswith("Most faithful here: Grad-CAM (best average rank on deletion: the pixels"), line
    rows["gradcam"] |= {"insertion_auc": 0.8, "avg_drop": 0.2}
    rows["random"] |= {"insertion_auc": 0.5, "avg_drop": 0.6}
    line = format_reading(read_report(EvaluationReport(rows=rows)))[0]
    assert "best average rank on deletion, insertion and average drop/increase: the pixels" in line, line
