"""Audit fixes for detection and segmentation: the automatic layer of detectors and segmenters, ``lumos explain
--task`` with unreadable files and with --target/--layer/--save, and integrated gradients on a box that is not
found along the path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
from detection_models import calibrated
from lumos.errors import LumosError
from lumos.layers import auto_layer
from lumos.tasks import DetectionTarget, SegmentationModel, SegmentationTarget, TorchvisionDetector

SIZE = 96



def faster_rcnn(name: str) -> TorchvisionDetector:
    tv = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    return calibrated(getattr(tv, name)(
        weights=None, weights_backbone=None, num_classes=4, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0,
        box_detections_per_img=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50), SIZE)


# -- 1. the automatic layer of a detector -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn"])
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
    with pytest.raises(LumosError, match=r"Layer 'pool' outputs 6 maps for 3 image\(s\), not one per image"):
        lumos.explain(TwoStage(), torch.rand(3, 3, 16, 16), "gradcam", target=lambda out: out[:, 0, 4], layer="pool")


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


# -- 3 and 4. lumos explain --task: unreadable images, and the options it takes -----------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two synthetic scenes (at 128 px, as photos would be bigger than the models' 64), a file that is not an
    image and a plain grey picture (nothing detected, only background predicted)."""
    import numpy as np
    from PIL import Image

    from lumos.synthetic.scenes import make_scenes

    folder = tmp_path_factory.mktemp("task_files")
    data = make_scenes(2, seed=7)
    for i in range(2):
        pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((128, 128)).save(folder / f"scene{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "grey.png")
    return folder


def explain_cli(args: list[str]) -> int:
    """``lumos explain ARGS``; the exit code as ``main``'s."""
    import lumos.cli

    return lumos.cli.main(["explain", *args])


@pytest.mark.parametrize("task, picture", [("detection", "_detections.png"), ("segmentation", "_segments.png")])
def test_task_with_an_unreadable_image_explains_the_others(files, tmp_path, capsys, task, picture):
    """Was exit 2 at the bad file: the images after it not explained, no summary."""
    out = tmp_path / "out"
    code = explain_cli([str(files / "scene0.png"), str(files / "broken.png"), str(files / "scene1.png"),
                        "--task", task, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "broken.png" in errors[0]
    assert "Traceback" not in captured.err
    assert (out / f"scene0{picture}").exists() and (out / f"scene1{picture}").exists()
    assert "Explained 2 image(s)" in captured.out and "1 failed" in captured.out


@pytest.mark.parametrize("task, why", [("detection", "No detection"), ("segmentation", "no class but the background")])
def test_task_with_nothing_to_explain_in_one_image_goes_on(files, tmp_path, capsys, task, why):
    out = tmp_path / "out"
    code = explain_cli([str(files / "grey.png"), str(files / "scene0.png"), "--task", task, "--out", str(out)])
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert code == 1 and len(errors) == 1 and "grey.png" in errors[0] and why in errors[0]
    assert any(out.glob("scene0_*.png")) and not any(out.glob("grey*"))


def test_lumos_explain_task_goes_through_the_task_command(files, tmp_path, capsys):
    from lumos.cli import main

    code = main(["explain", str(files / "scene0.png"), str(files / "broken.png"), "--task", "detection",
                 "--layer", "features.block4", "--save", "npy", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1 and "1 failed" in captured.out
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".npy", ".npy"]


def scene_input(path, size: int = 64) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from lumos.io import load_image

    pil = load_image(path).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize("layer", ["auto", "features.block4"])
def test_task_layer_and_save_npy_are_honoured(files, tmp_path, layer):
    """--save npy writes each box's map (and no picture); --layer is the layer explained (was ignored)."""
    import numpy as np

    from lumos.synthetic.detector import load_tinydetector
    from lumos.tasks import detections

    out = tmp_path / "out"
    assert explain_cli([str(files / "scene0.png"), "--task", "detection", "--layer", layer, "--save", "npy",
                        "--out", str(out)]) == 0
    model, x = load_tinydetector(), scene_input(files / "scene0.png")
    with torch.no_grad():
        (boxes, labels, _), = detections(model(x), 0.5, 0.5, 10)
    reference = lumos.explain(model, x, "gradcam", target=DetectionTarget(boxes, labels),
                              layer="features.block5" if layer == "auto" else layer).maps
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"scene0_box{k}.npy" for k in range(len(boxes))]
    for k, path in enumerate(written):
        assert np.allclose(np.load(path), reference[k].numpy(), atol=1e-6)


def test_task_save_png_and_npy_and_size(files, tmp_path):
    import numpy as np

    out = tmp_path / "out"
    assert explain_cli([str(files / "scene0.png"), "--task", "segmentation", "--save", "png,npy", "--size", "96",
                        "--out", str(out)]) == 0
    maps = sorted(out.glob("scene0_class*.npy"))
    assert maps and all(np.load(p).shape == (96, 96) for p in maps)
    assert {p.with_suffix(".png").name for p in maps} <= {p.name for p in out.glob("*.png")}


def test_task_target_explains_one_class(files, tmp_path):
    """--target CLASS (name or index): that class's region only (was ignored: every class)."""
    from lumos.synthetic.segmenter import load_tinysegmenter

    with torch.no_grad():
        classes = load_tinysegmenter()(scene_input(files / "scene0.png")).argmax(1).unique().tolist()
    predicted = [c for c in classes if c]
    assert len(predicted) >= 2
    names = ["background", "disc", "square", "triangle", "plus"]
    for spec in (names[predicted[-1]], str(predicted[-1])):
        out = tmp_path / spec
        assert explain_cli([str(files / "scene0.png"), "--task", "segmentation", "--target", spec,
                            "--out", str(out)]) == 0
        assert sorted(p.name for p in out.glob("scene0_class*.png")) == [f"scene0_class{predicted[-1]}.png"]


def test_task_target_class_with_no_box_fails_that_image(files, tmp_path, capsys):
    from lumos.synthetic.detector import load_tinydetector
    from lumos.tasks import detections

    with torch.no_grad():
        found = {int(c) for c in detections(load_tinydetector()(scene_input(files / "scene0.png")), 0.5)[0][1]}
    absent = next(c for c in range(4) if c not in found)
    code = explain_cli([str(files / "scene0.png"), "--task", "detection", "--target", str(absent),
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No detection of class" in err[0] and "scene0.png" in err[0]


def test_task_settings_colormap_and_alpha_are_honoured(files, tmp_path):
    import numpy as np
    from PIL import Image

    def run(name: str, *extra: str) -> tuple[np.ndarray, np.ndarray]:
        out = tmp_path / name
        assert explain_cli([str(files / "scene0.png"), "--task", "detection", "--method", "occlusion",
                            "--save", "png,npy", "--out", str(out), *extra]) == 0
        return np.load(out / "scene0_box0.npy"), np.asarray(Image.open(out / "scene0_box0.png"))

    coarse, jet = run("coarse", "--set", "window=32", "--set", "stride=16")
    fine, _ = run("fine", "--set", "window=8", "--set", "stride=4")
    assert not np.allclose(coarse, fine)
    _, gray = run("gray", "--set", "window=32", "--set", "stride=16", "--colormap", "gray", "--alpha", "0.9")
    assert jet.shape == gray.shape and not np.array_equal(jet, gray)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "4"], "--batch-size is not available with --task"),
    (["--scale", "per-map"], "--scale is not available with --task"),
    (["--captions"], "--captions is not available with --task"),
    (["--probs", "softmax"], "--probs is not available with --task"),
    (["--output", "0"], "--output is not available with --task"),
    (["--mean", "0.5,0.5,0.5"], "--mean is not available with --task"),
    (["--target", "topk:2"], "--target 'topk:2' is not a class"),
    (["--target", "7"], "--target 7 is out of range"),
    (["--target", "top1"], "--target top1 is for classification"),  # was taken as 'every box'
    (["--layer", "features.nope"], "No layer named 'features.nope'"),
    (["--save", "jpg"], "Unknown save format 'jpg'"),
    (["--set", "nonsense=1"], "nonsense"),
    (["--colormap", "nope"], "--colormap"),
    (["--alpha", "2"], "--alpha must be between 0 and 1"),
    (["--model", "resnet18"], "for your own model use lumos.tasks"),
])
def test_task_options_it_cannot_honour_are_one_line_errors(files, tmp_path, capsys, extra, message):
    """Were silently ignored."""
    out = tmp_path / "out"
    code = explain_cli([str(files / "scene0.png"), "--task", "detection", *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


# -- 5. integrated gradients on a box that is not found along the path ---------------------------------------
def test_sparse_backward_of_a_zero_gradient_is_zero_not_missing():
    """A box that is gone scores a constant 0: its gradient is zero, which the sparse backward used to drop
    (no gradient at all reads as a cut graph: 'Gradients are blocked')."""
    from lumos.tasks.adapters import SparseRowBackward

    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with SparseRowBackward():
        y = torch.cat([a, b], 1)
        z = conv(x)
    assert y.grad_fn.name().startswith("SparseCat") and z.grad_fn.name().startswith("WindowConv2d")
    ga, gb = torch.autograd.grad(y, (a, b), torch.zeros_like(y), allow_unused=True)
    gx, gw = torch.autograd.grad(z, (x, conv.weight), torch.zeros_like(z), allow_unused=True)
    for g, like in ((ga, a), (gb, b), (gx, x), (gw, conv.weight)):
        assert g is not None and g.shape == like.shape and not g.any()


def test_gradient_of_a_box_gone_from_the_input_is_zero(one_thread):
    """Faster R-CNN on a black image (where the box is not detected): zero gradients, was a GradientError."""
    from lumos.engine import input_gradients

    model = faster_rcnn("fasterrcnn_mobilenet_v3_large_320_fpn")
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = DetectionTarget(score_threshold=0.0, max_boxes=1).resolve(model(x))
        assert target.scores(model(torch.zeros_like(x))).tolist() == [[0.0]]  # the box is gone there
    grads, scores = input_gradients(model, torch.zeros_like(x), target, torch.tensor([0]))
    assert scores.tolist() == [[0.0]] and grads.shape == (1, 1, 3, SIZE, SIZE) and not grads.any()


class Dim(nn.Module):
    """One box, class 0 scoring relu(mean(x) - 0.5): on the path from a black baseline to a white image the box is
    found where alpha > 0.5 only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.relu(x.mean((1, 2, 3)) - 0.5)
        boxes = torch.tensor([0.0, 0, 8, 8]).expand(x.shape[0], 1, 4)
        return torch.cat([boxes, score[:, None, None]], 2)


def test_integrated_gradients_says_how_often_the_box_is_not_found_on_the_path():
    from lumos.methods.quadrature import quadrature
    from lumos.targets import TargetError

    alphas, _ = quadrature("left", 8)
    missing = sum(a <= 0.5 for a in alphas)  # the box scores relu(alpha - 0.5): found for alpha > 0.5 only
    assert 0 < missing < len(alphas)
    box = DetectionTarget([[0, 0, 8, 8]], [0])
    with pytest.raises(TargetError) as err:
        lumos.explain(Dim(), torch.ones(1, 3, 8, 8), "integrated_gradients", target=box, quadrature="left", steps=8,
                      tolerance=None)
    message = str(err.value)
    assert f"Box 0 of image 0 is not found at {missing} of {len(alphas)} path points" in message
    assert "blocked" not in message and "\n" not in message


def test_integrated_gradients_on_a_box_found_along_the_whole_path_runs():
    """The check does not fire when the box is there at every path point (baseline 0.8: alpha * 0.2 + 0.8 > 0.5)."""
    box = DetectionTarget([[0, 0, 8, 8]], [0])
    ex = lumos.explain(Dim(), torch.ones(1, 3, 8, 8), "integrated_gradients", target=box, quadrature="left", steps=8,
                       tolerance=None, baseline=0.8)
    assert ex.maps.shape == (1, 8, 8) and torch.allclose(ex.params["delta"], torch.zeros(1), atol=1e-5)
