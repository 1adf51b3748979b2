"""`lumos explain --task detection|segmentation`: boxes drawn and explained per box, class regions per class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lumos.cli import main
from lumos.synthetic.scenes import make_scenes


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    data = make_scenes(1, seed=7)
    path = tmp_path_factory.mktemp("scenes") / "scene.png"
    Image.fromarray((data.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).resize((128, 128)).save(path)
    return path


def test_detection_writes_one_overlay_per_box_per_method(scene, tmp_path, capsys):
    assert main(["explain", str(scene), "--task", "detection", "--method", "gradcam,layercam",
                 "--out", str(tmp_path)]) == 0
    for method in ("gradcam", "layercam"):
        boxes = sorted((tmp_path / method).glob("scene_box*.png"))
        assert boxes and (tmp_path / method / "scene_boxes.png").exists()
        assert (tmp_path / method / "scene_detections.png").exists()
    # the two methods' files do not overwrite each other: one folder each, the same boxes
    assert {p.name for p in (tmp_path / "gradcam").iterdir()} == {p.name for p in (tmp_path / "layercam").iterdir()}
    out = capsys.readouterr().out
    assert "Explained 1 image(s) with 2 method(s)" in out


def test_segmentation_writes_class_regions(scene, tmp_path):
    assert main(["explain", str(scene), "--task", "segmentation", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("scene_class*.png")) and (tmp_path / "scene_segments.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--task", "detect"], "Unknown --task 'detect'"),
    (["--task", "detection", "--model", "mypkg:net"], "for your own model use lumos.tasks"),
])
def test_task_mistakes_are_one_line(scene, tmp_path, capsys, extra, message):
    code = main(["explain", str(scene), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
