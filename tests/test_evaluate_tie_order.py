"""A deletion/insertion "best" that holds only in the seeded random order of tied pixels gets no star: methods
whose maps are mostly one plateau are re-measured with ties in raster order, and the table says why."""

from __future__ import annotations

import pytest
import torch

from lumos.evaluate import Deletion, Insertion
from lumos.evaluate.benchmark import EvaluationReport, evaluate_methods
from lumos.evaluate.report import tie_note, to_dict
from lumos.synthetic import load_tinycnn, make_dataset


def _report(plateau_alt: float) -> EvaluationReport:
    rows = {"occlusion": {"deletion_auc": 0.077, "insertion_auc": 0.866},
            "guided_gradcam": {"deletion_auc": 0.226, "insertion_auc": 0.950},
            "rise": {"deletion_auc": 0.248, "insertion_auc": 0.949},
            "random": {"deletion_auc": 0.263, "insertion_auc": 0.514}}
    tie_order = {"occlusion": {"deletion_auc": plateau_alt, "insertion_auc": 0.904},
                 "guided_gradcam": {"deletion_auc": 0.158, "insertion_auc": 0.950}}
    return EvaluationReport(rows=rows, tie_order=tie_order, plateaus={"occlusion": 23, "guided_gradcam": 36})


def test_a_lead_that_only_the_tie_order_gives_gets_no_star_and_a_line_saying_why():
    report = _report(plateau_alt=0.222)  # raster order: guided Grad-CAM's 0.158 is lower
    assert "deletion_auc" not in report.best() and report.withheld() == {"deletion_auc": "occlusion"}
    assert report.best()["insertion_auc"] == "guided_gradcam"  # 0.950 in both orders: kept
    note = tie_note(report)
    assert note == ("deletion AUC: no star for Occlusion: its 0.077 depends on the order of tied pixels (0.222 in "
                    "raster order, not the lowest there); 23 of its maps are one value over more than half the image "
                    "(docs/evaluation.md).")
    assert to_dict(report)["withheld"] == {"deletion_auc": "occlusion"}


def test_a_lead_that_holds_in_both_orders_keeps_its_star():
    report = _report(plateau_alt=0.120)  # below 0.158 and every other method's AUC
    assert report.best()["deletion_auc"] == "occlusion" and report.withheld() == {}
    assert tie_note(report) is None


@pytest.fixture(scope="module")
def measured():
    data = make_dataset(12, seed=123)
    net = load_tinycnn().eval()
    report = evaluate_methods(net, data.images, ["gradcam", "gradients"], data.labels, layer="features.block4",
                              steps=16)
    return net, data, report


def test_plateau_maps_are_re_measured_in_raster_order(measured):
    """Grad-CAM's maps are zero (one plateau) over most of many images; the raster-order AUCs recorded are the
    metric's own with ``seed=None``, computed here independently from the same maps."""
    net, data, report = measured
    from lumos.evaluate.benchmark import method_maps

    maps = method_maps(net, data.images, "gradcam", data.labels, layer="features.block4")
    flat = maps.flatten(1)
    share = torch.stack([torch.unique(r, return_counts=True)[1].max() for r in flat]).float() / flat.shape[1]
    assert report.plateaus["gradcam"] == int((share > 0.5).sum()) > 0
    raster_del = Deletion(steps=16, seed=None)(net, data.images, maps, data.labels).auc
    raster_ins = Insertion(steps=16, seed=None)(net, data.images, maps, data.labels).auc
    assert report.tie_order["gradcam"]["deletion_auc"] == pytest.approx(float(raster_del.nanmean()), abs=1e-6)
    assert report.tie_order["gradcam"]["insertion_auc"] == pytest.approx(float(raster_ins.nanmean()), abs=1e-6)
    assert report.tie_order["gradcam"]["deletion_auc"] != pytest.approx(report.rows["gradcam"]["deletion_auc"])


def test_maps_without_plateaus_are_not_re_measured(measured):
    _, _, report = measured
    assert "gradients" not in report.tie_order and "random" not in report.tie_order
    assert set(report.rows) == {"gradcam", "gradients", "random"}


def test_the_task_benchmarks_re_measure_plateau_maps_too():
    """The detector's Grad-CAM maps are one cell wide, so zero over most of each box's map: its raster-order
    deletion AUC is recorded, and equals the box deletion with ``seed=None`` computed independently."""
    from lumos.evaluate.detection_benchmark import box_deletion, box_maps, evaluate_boxes, match_boxes
    from lumos.synthetic.detector import load_tinydetector
    from lumos.synthetic.scenes import make_scenes

    scenes = make_scenes(6, seed=123)
    model = load_tinydetector()
    found = match_boxes(model, scenes.images, scenes.labels, scenes.boxes, scenes.masks)
    report = evaluate_boxes(model, scenes.images, found, scenes.masks, ["hirescam"], steps=8)
    maps = box_maps(model, scenes.images, found, "hirescam")
    raster = box_deletion(model, scenes.images, found, maps, steps=8, seed=None).auc
    assert report.plateaus["hirescam"] > 0 and "random" not in report.tie_order
    assert report.tie_order["hirescam"]["deletion_auc"] == pytest.approx(float(raster.nanmean()), abs=1e-6)
