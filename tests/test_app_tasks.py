"""The app's detection and segmentation views: the page driven by ``streamlit.testing.v1.AppTest`` with the
shipped synthetic detector / segmenter, plus the plain helpers in ``lumos.app.task_logic``."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import lumos  # noqa: E402
from lumos.app import SCRIPT, logic, task_logic  # noqa: E402
from lumos.errors import LumosError  # noqa: E402
from lumos.synthetic.scenes import make_scenes  # noqa: E402
from lumos.tasks import DetectionTarget, SegmentationTarget, box_iou  # noqa: E402

TIMEOUT = 120  # generous: the machine is shared; nothing here asserts timings


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(max(task_logic.SCENES.values()) + 1, seed=task_logic.SCENE_SEED)


def _app(monkeypatch, task: str) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", "--task", task])
    logic.RESULTS.clear()
    at = AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def _captions(at: AppTest) -> list[str]:
    return [img.caption for el in at.get("image") for img in el.proto.imgs]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _task_results() -> dict[str, task_logic.TaskResult]:
    return {k: v for k, v in logic.RESULTS._items.items() if '"task"' in k}


def test_detection_view_example_boxes_then_explain_each_box(monkeypatch, scenes):
    at = _app(monkeypatch, "detection")
    assert at.selectbox(key="task").value == "detection"
    assert any("Upload a scene or pick an example scene" in i.value for i in at.info)
    at.button(key="scene_scene 1").click().run()
    assert not at.exception and not at.error

    i = task_logic.SCENES["scene 1"]
    truth = sorted(scenes.class_names[c] for c in scenes.labels[i].tolist() if c >= 0)
    options = at.radio[0].options
    # one line per box, "box k: class score", best first: the scene's three objects, each found once
    assert [o.split(":")[0] for o in options] == [f"box {k}" for k in range(len(options))]
    assert sorted(o.split(" ")[2] for o in options) == truth
    scores = [float(o.split(" ")[3]) for o in options]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    captions = _captions(at)
    assert captions[0] == f"scene 1.png: {len(options)} detections (score >= 0.50)"
    assert captions[1] == f"Grad-CAM @ features.block5: {options[0]}"

    # another box from the list: its own explanation, box drawn on it (a 4x larger image)
    at.radio[0].set_value(2).run()
    assert not at.exception and not at.error
    assert _captions(at)[1] == f"Grad-CAM @ features.block5: {options[2]}"
    maps = [r.map for r in _task_results().values()]
    assert len(maps) == 2  # one explanation per chosen box, nothing else computed

    # the same maps as explaining all the image's boxes in one call (the CLI's way), box by box
    tm = task_logic.load_task_model("detection")
    det = task_logic.find_boxes(tm, task_logic.scene_image("scene 1"))
    x = torch.from_numpy(np.asarray(task_logic.scene_image("scene 1"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert (x - scenes.images[i:i + 1]).abs().max() <= 0.5 / 255 + 1e-6  # the scene, as 8-bit PNG
    all_boxes = lumos.explain(tm.model, x, "gradcam", layer="features.block5",
                              target=DetectionTarget(det.boxes, det.labels)).maps.numpy()
    np.testing.assert_allclose(maps[0], all_boxes[0], atol=1e-5)
    np.testing.assert_allclose(maps[1], all_boxes[2], atol=1e-5)
    # ... and each map sits on its own object: most of its mass inside the object's ground-truth mask
    for m, k in zip(maps, (0, 2), strict=True):
        j = int(box_iou(det.boxes[k:k + 1], scenes.boxes[i]).argmax())
        inside = scenes.masks[i, j].numpy()
        assert m[inside].sum() / m.sum() >= 2 * inside.mean()

    # another method: recomputed for that method only; a method that cannot explain a box is never offered
    assert "cam" not in at.selectbox(key="task_method").options
    at.selectbox(key="task_method").set_value("occlusion").run()
    assert not at.exception and not at.error
    assert _captions(at)[1] == f"Occlusion: {options[2]}"


def test_upload_a_scene_lower_threshold_and_errors(monkeypatch, scenes):
    at = _app(monkeypatch, "detection")
    # an upload twice the model's size: resized to 64 x 64, the same boxes as the example scene
    big = task_logic.scene_image("scene 2").resize((128, 128), Image.NEAREST)
    at.file_uploader[0].set_value(("mine.png", _png(big), "image/png")).run()
    assert not at.exception and not at.error
    assert _captions(at)[0].startswith("mine.png: 3 detections")
    at.slider(key="task_score").set_value(0.95).run()
    assert not at.exception and not at.error
    assert _captions(at)[0] == "mine.png: 1 detection (score >= 0.95)"  # scene 2's boxes score 0.97, 0.69, 0.67
    assert len(at.radio[0].options) == 1
    at.file_uploader[0].set_value(("grey.png", _png(Image.new("RGB", (64, 64), (128, 128, 128))), "image/png"))
    at.run()
    assert not at.exception and not at.error
    assert any("No detection scores 0.95 or more" in i.value for i in at.info)

    at.file_uploader[0].set_value(("broken.png", b"not an image", "image/png")).run()
    assert not at.exception
    assert len(at.error) == 1 and "broken.png" in at.error[0].value


def test_segmentation_view_switched_in_the_sidebar(monkeypatch, scenes):
    at = _app(monkeypatch, "detection")
    at.selectbox(key="task").set_value("segmentation").run()
    at.button(key="scene_scene 3").click().run()
    assert not at.exception and not at.error
    i = task_logic.SCENES["scene 3"]
    present = sorted(c for c in scenes.semantic[i].unique().tolist() if c)
    options = at.radio[0].options
    names = ["background", *scenes.class_names]
    assert sorted(names.index(o.split(":")[0]) for o in options) == present  # the classes the scene holds
    captions = _captions(at)
    assert captions[0] == "scene 3.png: predicted class regions"
    first = names.index(options[0].split(":")[0])
    assert captions[1] == f"Grad-CAM @ features.block5: {names[first]} region"
    # a key under the picture says which tint is which class: each listed class's name after its colour swatch
    key = next(md.value for md in at.markdown if "lumos-region-key" in md.value)
    for option in options:
        c = names.index(option.split(":")[0])
        assert f"background:rgb{task_logic.region_colour(c)}'></span>{names[c]}</span>" in key

    # the class region's map = lumos.explain with the same target, and it lies on that class's ground truth
    (result,) = _task_results().values()
    tm = task_logic.load_task_model("segmentation")
    x = torch.from_numpy(np.asarray(task_logic.scene_image("scene 3"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = lumos.explain(tm.model, x, "gradcam", target=SegmentationTarget(first),
                        layer="features.block5").maps[0].numpy()
    np.testing.assert_allclose(result.map, ref, atol=1e-5)
    inside = (scenes.semantic[i] == first).numpy()
    assert result.map[inside].sum() / result.map.sum() >= 2 * inside.mean()


def test_task_helpers():
    assert task_logic.parse_task(["--model", "m", "--task", "Detection"]) == "detection"
    assert task_logic.parse_task([]) == "classification"
    with pytest.raises(LumosError, match="Unknown task 'tracking'"):
        task_logic.load_task_model("tracking")
    tm = task_logic.load_task_model("detection")
    det = task_logic.Detections(torch.tensor([[1.0, 2, 30, 40]]), torch.tensor([2]), torch.tensor([0.876]))
    assert task_logic.box_choices(det, tm.names) == ["box 0: triangle 0.88"]
    with pytest.raises(LumosError, match=r"There is no box 1: the image has 1 detections \(box 0 to 0\)"):
        task_logic.explain_box(tm, task_logic.scene_image("scene 1"), det, 1)
    with pytest.raises(LumosError, match="cannot explain a box"):
        task_logic.explain_box(tm, task_logic.scene_image("scene 1"), det, 0, method="cam")
    pred = torch.zeros(10, 10, dtype=torch.long)
    pred[:2] = 3  # 20% triangle
    pred[5, :5] = 1  # 5% disc
    seg = task_logic.load_task_model("segmentation")
    assert task_logic.class_choices(pred, seg.names) == [(3, "triangle: 20% of pixels"), (1, "disc: 5% of pixels")]
    big = torch.zeros(100, 100, dtype=torch.long)
    big[0, :40] = 2  # 0.4%
    big[1, 0] = 4  # one pixel in 10 000: there, so never "0%"
    assert task_logic.class_choices(big, seg.names) == [(2, "square: 0.4% of pixels"), (4, "plus: <0.1% of pixels")]
    # the legend's colour is the tint drawn: on a black image a region is 0.55 x its colour
    tinted = np.asarray(task_logic.segments_image(seg, Image.new("RGB", (64, 64)), torch.full((64, 64), 3)))
    assert tuple(tinted[0, 0]) == tuple(round(0.55 * v) for v in task_logic.region_colour(3))

    from lumos.cli_app import app_command

    cmd = app_command("efficientnet_lite0", 8765, task="detection")
    assert cmd[cmd.index("--") + 1:] == ["--model", "efficientnet_lite0", "--task", "detection"]
    assert "--task" not in app_command("efficientnet_lite0", 8765)


def test_cli_bad_task_is_one_line(capsys):
    from lumos.cli import main

    assert main(["app", "--task", "tracking", "--port", "8765"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Unknown task 'tracking'"), err
