"""Regenerate docs/images/detection_gallery.png and segmentation_gallery.png: the shipped detector's boxes with
one Grad-CAM per box, and the shipped segmenter's class regions, on the first held-out scene (seed 123) where
three objects of three classes are all detected. Run: ``.venv/bin/python scripts/make_task_figures.py``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from lumos.cli_tasks import explain_detection, explain_segmentation
from lumos.synthetic.detector import load_tinydetector
from lumos.synthetic.scenes import make_scenes
from lumos.synthetic.segmenter import load_tinysegmenter
from lumos.tasks import detections

DOCS = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> None:
    torch.set_num_threads(1)
    scenes, detector = make_scenes(40, seed=123), load_tinydetector()
    for i in range(len(scenes)):
        with torch.no_grad():
            (_, labels, _), = detections(detector(scenes.images[i:i + 1]), 0.5, 0.5)
        if len(labels) == 3 and len(set(labels.tolist())) == 3 and int((scenes.labels[i] >= 0).sum()) == 3:
            break
    image = scenes.images[i:i + 1]
    with tempfile.TemporaryDirectory() as tmp:
        boxes = explain_detection(detector, image, tmp, layer="features.block5", names=scenes.class_names,
                                  stem="scene")
        regions = explain_segmentation(load_tinysegmenter(), image, tmp, layer="features.block5",
                                       names=["background", *scenes.class_names], stem="scene")
        shutil.copy(boxes[-1], DOCS / "detection_gallery.png")
        shutil.copy(regions[-1], DOCS / "segmentation_gallery.png")
    print(f"scene {i}: wrote {DOCS / 'detection_gallery.png'} and {DOCS / 'segmentation_gallery.png'}")


if __name__ == "__main__":
    main()
