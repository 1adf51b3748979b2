"""Detection speed: Grad-CAM for the top 5 boxes of one image / one plain no-grad forward of the detector.

K boxes of one image cost one forward and K gradient passes (from the target layer down); the table also
shows one box, five separate one-box calls, and the wrapped detector's own no-grad forward (dense output,
sparse-backward mode on) for contrast. The reference is the bare detector's no-grad forward. Each method
call is timed right after a plain forward (the machine's speed drifts) and the median ratio reported.
Detectors: torchvision Faster R-CNN MobileNetV3-Large FPN and RetinaNet (ResNet-18 FPN) with random
weights, and the shipped TinyDetector.
Run: ``.venv/bin/python benchmarks/bench_detection.py`` (needs torchvision: ``pip install 'lumos[detection]'``).
"""

from __future__ import annotations

import argparse

import torch
from timing import ratio
from torch import nn

import lumos
from lumos.tasks import DetectionTarget, TorchvisionDetector


def calibrated(detector: nn.Module, size: int) -> TorchvisionDetector:
    """BatchNorm stats from a few random images (random-init stats make activations vanish with depth)."""
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    wrapped = TorchvisionDetector(detector).eval()
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        wrapped(torch.rand(4, 3, size, size))
    return wrapped.eval()


def detectors(size: int) -> list[tuple[str, nn.Module, str, int]]:
    """(name, model, Grad-CAM layer, input size)."""
    from lumos.synthetic.detector import load_tinydetector

    out = [("TinyDetector (shipped)", load_tinydetector(), "features.block5", 64)]
    try:
        import torchvision.models.detection as tv
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    except ImportError:
        return out
    frcnn = tv.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91,
                                                 min_size=size, max_size=size, box_score_thresh=0.0)
    out.append(("Faster R-CNN MobileNetV3 FPN", calibrated(frcnn, size), "detector.backbone.body.13", size))
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    retina = tv.RetinaNet(backbone, num_classes=91, min_size=size, max_size=size, score_thresh=0.0)
    out.append(("RetinaNet ResNet-18 FPN", calibrated(retina, size), "detector.backbone.body.layer4", size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=320, help="torchvision detectors' input size")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'detector':30s} {'what':34s} {'x forward':>9s} {'seconds':>8s}")
    for name, model, layer, size in detectors(args.size):
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = model(x)
        top5 = DetectionTarget(score_threshold=0.0, max_boxes=5).resolve(out)
        cam = lumos.method_class("gradcam")(model, layer)

        bare = getattr(model, "detector", None)

        def plain(model=model, bare=bare, x=x) -> None:  # the detector itself: no wrapper, no lumos
            with torch.no_grad():
                bare(list(x)) if bare is not None else model(x)

        def wrapped(model=model, x=x) -> None:
            with torch.no_grad():
                model(x)

        for what, fn in [
            ("wrapped forward (dense output)", wrapped),
            ("Grad-CAM, top 5 boxes, one call", lambda cam=cam, x=x, t=top5: cam(x, t)),
            ("Grad-CAM, 1 box", lambda cam=cam, x=x, t=top5: cam(x, t.box(0))),
            ("Grad-CAM, 5 boxes, 5 calls", lambda cam=cam, x=x, t=top5: [cam(x, t.box(j)) for j in range(5)]),
        ]:
            r, t = ratio(plain, fn, args.rounds)
            print(f"{name:30s} {what:34s} {r:9.2f} {t:8.3f}", flush=True)


if __name__ == "__main__":
    main()
