"""Audit fixes for detection and segmentation: the automatic layer of detectors and segmenters, ``lumos explain
--task`` with unreadable files and with --target/--layer/--save, and integrated gradients on a box that is not
found along the path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lumos
from lumos import layouts
from lumos.errors import LumosError
from lumos.layers import auto_layer
from lumos.tasks import DetectionTarget, SegmentationModel, SegmentationTarget, TorchvisionDetector

SIZE = 96

# The automatic layer is chosen in lumos.layers / lumos.layouts (not this change's files): until the change the
# audit report describes lands there (Trace.output_shape is its sign), these tests are expected to fail.
AUTO_LAYER_CHANGED = "output_shape" in {f.name for f in dataclasses.fields(layouts.Trace)}
needs_auto_layer_change = pytest.mark.xfail(not AUTO_LAYER_CHANGED, strict=True,
                                            reason="needs the lumos.layers/layouts auto-layer change")


def calibrated(detector: nn.Module) -> TorchvisionDetector:
    """BatchNorm statistics from a few random images (as in tests/test_detection.py), so boxes mean something."""
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    wrapped = TorchvisionDetector(detector).eval()
    for m in detector.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        wrapped(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    return wrapped.eval()


def faster_rcnn(name: str) -> TorchvisionDetector:
    tv = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    return calibrated(getattr(tv, name)(
        weights=None, weights_backbone=None, num_classes=4, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0,
        box_detections_per_img=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50))


# -- 1. the automatic layer of a detector -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn"])
@needs_auto_layer_change
def test_detector_auto_layer_is_a_backbone_map_with_one_map_per_box(one_thread, name):
    """Was ``roi_heads.box_roi_pool`` (one 7x7 map per proposal): 150 maps for 3 boxes."""
    model = faster_rcnn(name)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = DetectionTarget(score_threshold=0.0, max_boxes=3).resolve(model(x))
    ex = lumos.explain(model, x, "gradcam", target=target, layer="auto")
    assert ex.layer.startswith("detector.backbone.") and ex.layer_auto
    assert ex.maps.shape == (3, SIZE, SIZE)
    assert (ex.raw.flatten(1).abs().amax(1) > 0).all(), "every box's score reaches the chosen layer"
    # the choice: a map every feature level the heads read is computed from (checked here by autograd)
    module = dict(model.named_modules())[ex.layer]
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        images, _ = model.detector.transform(list(x))
        levels = model.detector.backbone(images.tensors)
    finally:
        handle.remove()
    for level in levels.values():
        (g,) = torch.autograd.grad(level.sum(), store["a"], retain_graph=True, allow_unused=True)
        assert g is not None and g.abs().sum() > 0


@needs_auto_layer_change
def test_detector_without_a_backbone_asks_for_layer():
    class Flat(nn.Module):
        """Lists in, list of dicts out, like a torchvision detector, but no backbone to choose from."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            f = self.conv(torch.stack(images)).mean((1, 2, 3))
            return [{"boxes": torch.tensor([[0.0, 0, 8, 8]]), "scores": s[None].sigmoid(),
                     "labels": torch.tensor([1])} for s in f]

    model, x = TorchvisionDetector(Flat(), num_classes=2), torch.rand(1, 3, 16, 16)
    with pytest.raises(LumosError, match="pass layer="):
        lumos.explain(model, x, "gradcam", target=DetectionTarget([[0, 0, 8, 8]], [1]), layer="auto")
    ex = lumos.explain(model, x, "gradcam", target=DetectionTarget([[0, 0, 8, 8]], [1]), layer="detector.conv")
    assert ex.maps.shape == (1, 16, 16)


@needs_auto_layer_change
def test_per_proposal_maps_are_never_the_auto_layer():
    """Any model: a 4-D output with more rows than images (RoI pooling) is not a map per image."""

    class TwoStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(3)
            self.head = nn.Linear(36, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.backbone(x)
            crops = torch.cat([f[:, :, :8, :8], f[:, :, 8:, 8:]])  # (2B, 4, 8, 8): two proposals per image
            rois = self.pool(crops)  # (2B, 4, 3, 3)
            return self.head(rois.flatten(1)).view(2, x.shape[0], 6).transpose(0, 1)  # (B, 2, 4 + 2)

    assert auto_layer(TwoStage(), torch.rand(1, 3, 16, 16)) == "backbone"


@needs_auto_layer_change
def test_shipped_detector_auto_layer_is_its_trunk(one_thread):
    """Was ``head`` (the 1x1 prediction map: each box's Grad-CAM one cell); now the trunk, as features.block5."""
    from lumos.synthetic.detector import load_tinydetector
    from lumos.synthetic.scenes import make_scenes

    model, x = load_tinydetector(), make_scenes(1, seed=123).images
    target = DetectionTarget(score_threshold=0.5, max_boxes=2)
    auto = lumos.explain(model, x, "gradcam", target=target, layer="auto")
    block5 = lumos.explain(model, x, "gradcam", target=target, layer="features.block5")
    assert auto.layer != "head" and torch.equal(auto.maps, block5.maps)


# -- 2. the automatic layer of a segmenter ----------------------------------------------------------------
@pytest.mark.parametrize("name, aux", [("deeplabv3_mobilenet_v3_large", False), ("deeplabv3_mobilenet_v3_large", True),
                                       ("fcn_resnet50", True)])
@needs_auto_layer_change
def test_segmenter_auto_layer_is_the_last_feature_map_before_the_classifier(one_thread, name, aux):
    """Was ``classifier`` (its last 1x1 convolution's logits: Grad-CAM showed the class's own logits) or, with an
    auxiliary head, ``aux_classifier`` (a branch ``out`` does not even depend on)."""
    seg = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    raw = getattr(seg, name)(weights=None, weights_backbone=None, num_classes=3, aux_loss=aux).eval()
    x = torch.rand(1, 3, 64, 64)
    last_conv = raw.classifier[-1]
    assert isinstance(last_conv, nn.Conv2d) and last_conv.kernel_size == (1, 1)
    seen: dict[str, torch.Tensor] = {}
    handle = last_conv.register_forward_hook(lambda m, i, o: seen.update(input=i[0]))
    with torch.no_grad():
        out = raw(x)["out"]
    handle.remove()
    category = int(out.argmax(1).flatten().mode().values)
    for model, output, prefix in ((raw, "out", ""), (SegmentationModel(raw), None, "model.")):
        ex = lumos.explain(model, x, "gradcam", target=SegmentationTarget(category), layer="auto", output=output)
        assert ex.layer == f"{prefix}classifier.3"
        # the classifier's input: the same map as the layer, so the same Grad-CAM
        handle = dict(model.named_modules())[ex.layer].register_forward_hook(lambda m, i, o: seen.update(layer=o))
        with torch.no_grad():
            model(x)
        handle.remove()
        assert torch.equal(seen.pop("layer"), seen["input"])


@needs_auto_layer_change
def test_shipped_segmenter_auto_layer_is_its_trunk(one_thread):
    from lumos.synthetic.scenes import make_scenes
    from lumos.synthetic.segmenter import load_tinysegmenter

    model, x = load_tinysegmenter(), make_scenes(1, seed=123).images
    with torch.no_grad():
        category = [c for c in model(x).argmax(1).unique().tolist() if c][0]
    auto = lumos.explain(model, x, "gradcam", target=SegmentationTarget(category), layer="auto")
    block5 = lumos.explain(model, x, "gradcam", target=SegmentationTarget(category), layer="features.block5")
    assert auto.layer != "classifier" and torch.equal(auto.maps, block5.maps)


def test_classifier_auto_layer_unchanged():
    """A model with one vector per image keeps the last spatial map (squeezenet's class maps included)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 96, 96)
    assert auto_layer(tvm.resnet18().eval(), x) == "layer4"
    assert auto_layer(tvm.squeezenet1_1().eval(), x) == "classifier.2"
