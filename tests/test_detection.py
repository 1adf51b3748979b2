"""Detection targets: the box-matching score (hand-computed), adapters, torchvision detectors with random
weights (every gradient CAM, Score-CAM, occlusion and RISE explain a chosen box) and the shipped detector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
from detection_models import calibrated
from lumos.engine import GradientError
from lumos.targets import TargetError
from lumos.tasks import DenseDetector, DetectionTarget, TorchvisionDetector, box_iou, dense_from_dicts, detections

GRADIENT_CAMS = ["gradcam", "gradcam++", "hirescam", "layercam", "xgradcam"]
PERTURBATION = {"scorecam": {"max_channels": 4, "tolerance": None},
                "occlusion": {"window": 48, "stride": 48},
                "rise": {"n_masks": 8, "cell": 3, "batch_size": 8}}


# -- the target on hand-made outputs --------------------------------------------------------------------
def dense(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0, 0.0]]))


def test_score_is_the_best_matching_prediction_of_the_class():
    out = dense([[0, 0, 10, 10, 0.9, 0.1],      # the box, class 0
                 [1, 1, 11, 11, 0.2, 0.7],      # IoU 0.68, class 1 is strong here
                 [20, 20, 30, 30, 0.8, 0.3]])   # far away
    t = DetectionTarget([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 1]).resolve(out)
    assert torch.allclose(t.scores(out), torch.tensor([[0.9, 0.1]]))  # best IoU of each class's carriers
    moved = dense([[1, 1, 11, 11, 0.6, 0.0], [20, 20, 30, 30, 0.8, 0.3]])  # the box moved, class 1 is gone there
    # class 1 rows: only the far one (IoU 0 < 0.5): the box is gone -> 0
    assert torch.allclose(t.scores(moved), torch.tensor([[0.6, 0.0]]))
    loose = DetectionTarget([[0, 0, 10, 10]], [1], iou_threshold=0.0).resolve(out)
    assert torch.allclose(loose.scores(moved), torch.tensor([[0.3]]))


def test_torchvision_rows_only_match_their_own_class():
    dets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), "scores": torch.tensor([0.9, 0.4]),
             "labels": torch.tensor([2, 1])}, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                              "labels": torch.zeros(0, dtype=torch.long)}]
    out = dense_from_dicts(dets, 3)
    assert out.shape == (2, 2, 7)
    assert torch.equal(out[0, 0], torch.tensor([0, 0, 10, 10, 0, 0, 0.9]))
    assert torch.equal(out[1], torch.zeros(2, 7))  # padding
    t = DetectionTarget([[0, 0, 10, 10]], [1]).resolve(out[:1])
    assert torch.allclose(t.scores(out[:1]), torch.tensor([[0.4]]))
    assert torch.allclose(t.scores(out[1:]), torch.tensor([[0.0]]))  # nothing detected: 0, never another class


def test_lazy_target_takes_every_detection_above_the_score_after_nms():
    out = dense([[0, 0, 10, 10, 0.9, 0.1], [1, 0, 10, 10, 0.8, 0.0],  # duplicate of the first (NMS)
                 [20, 20, 30, 30, 0.2, 0.7], [40, 40, 50, 50, 0.3, 0.1]])
    t = DetectionTarget(score_threshold=0.5).resolve(out)
    assert t.boxes.tolist() == [[[0, 0, 10, 10], [20, 20, 30, 30]]] and t.labels.tolist() == [[0, 1]]
    assert torch.allclose(t.scores(out), torch.tensor([[0.9, 0.7]]))
    assert DetectionTarget(score_threshold=0.5, max_boxes=1).resolve(out).k == 1
    (boxes, labels, scores), = detections(out, 0.25)
    assert labels.tolist() == [0, 1, 0] and torch.allclose(scores, torch.tensor([0.9, 0.7, 0.3]))


def test_given_box_without_label_takes_the_matched_class():
    out = dense([[0, 0, 10, 10, 0.1, 0.9]])
    assert DetectionTarget([[1, 1, 10, 10]]).resolve(out).labels.tolist() == [[1]]


def test_box_j_of_given_boxes_needs_no_resolve():
    t = DetectionTarget([[0.0, 0, 4, 4], [4, 4, 8, 8]], [0, 1])
    for j in (1, -1):
        one = t.box(j)
        assert one.boxes.tolist() == [[4.0, 4, 8, 8]] and one.labels.tolist() == [1]
    assert DetectionTarget([[0.0, 0, 4, 4]]).box(0).labels is None  # the class comes from the clean output
    with pytest.raises(TargetError, match="Box 2 does not exist"):
        t.box(2)
    with pytest.raises(TargetError, match="not resolved yet"):
        DetectionTarget(score_threshold=0.3).box(0)


def test_clear_errors():
    out = dense([[0, 0, 10, 10, 0.9, 0.1]])
    with pytest.raises(TargetError, match="matches no prediction"):
        DetectionTarget([[30, 30, 40, 40]], [0]).resolve_targets(out)
    with pytest.raises(TargetError, match="No detection"):
        DetectionTarget(score_threshold=0.95).resolve(out)
    with pytest.raises(TargetError, match="out of range"):
        DetectionTarget([[0, 0, 10, 10]], [5]).resolve(out)
    with pytest.raises(TargetError, match="4 \\+ classes"):
        DetectionTarget([[0, 0, 10, 10]], [0]).resolve(torch.zeros(1, 6))
    with pytest.raises(TargetError, match="different numbers"):
        two = torch.cat([dense([[0, 0, 10, 10, 0.9, 0.1], [20, 20, 30, 30, 0.8, 0.1]]),
                         dense([[0, 0, 10, 10, 0.9, 0.1], [20, 20, 30, 30, 0.1, 0.1]])])
        DetectionTarget(score_threshold=0.5).resolve(two)
    with pytest.raises(TargetError, match="boxes must be"):
        DetectionTarget([0, 0, 10, 10])
    with pytest.raises(TargetError, match="one box per image"):
        DetectionTarget([[0, 0, 10, 10]] * 2, [0, 0]).resolve(out).spec()


def test_dense_detector_converts_cxcywh_and_objectness():
    raw = torch.tensor([[[5.0, 5, 4, 2, 0.0, 0.0, 2.0]]])  # cx cy w h, objectness logit 0, two class logits
    class Raw(nn.Module):
        def forward(self, x):
            return raw

    out = DenseDetector(Raw(), box_format="cxcywh", objectness=True, activation="sigmoid")(torch.zeros(1, 3, 4, 4))
    s = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(out, torch.tensor([[[3.0, 4, 7, 6, 0.25, 0.5 * s]]]))


def test_sparse_row_backward_gives_the_dense_gradients():
    from lumos.tasks.adapters import SparseRowBackward

    x, w, b = torch.randn(6, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.randn(3)
    g = torch.zeros(6, 3)
    g[2] = torch.randn(3)
    dense = torch.autograd.grad(nn.functional.linear(x, w, b), (x, w), g)
    with SparseRowBackward():
        y = nn.functional.linear(x, w, b)
    assert y.grad_fn.name().startswith("RowSparseLinear")
    sparse = torch.autograd.grad(y, (x, w), g)
    assert all(torch.allclose(d, s_) for d, s_ in zip(dense, sparse, strict=True))


def test_sparse_cat_gives_no_gradient_to_pieces_no_score_depends_on():
    from lumos.tasks.adapters import SparseRowBackward

    a, b, c = (torch.randn(2, n, 3, requires_grad=True) for n in (4, 5, 6))
    g = torch.zeros(2, 15, 3)
    g[:, 6] = torch.randn(2, 3)  # a row of b only
    with SparseRowBackward():
        y = torch.cat([a, b, c], dim=1)
        z = torch.cat([a, b, c], 1)
    assert y.grad_fn.name().startswith("SparseCat") and torch.equal(y, torch.cat([a, b, c], 1))
    ga, gb, gc = torch.autograd.grad(y, (a, b, c), g, allow_unused=True, materialize_grads=True)
    assert torch.equal(gb, g[:, 4:9]) and not ga.any() and not gc.any()
    (gz,) = torch.autograd.grad(z, b, g)
    assert torch.equal(gz, g[:, 4:9])


@pytest.mark.parametrize("kernel, padding, cells", [
    (3, 1, [(0, 0)]), (3, 1, [(5, 9), (6, 9)]), (1, 0, [(11, 3)]), (5, 2, [(11, 11), (2, 7)]), (3, 0, [(4, 4)]),
    (3, 1, "all"),
])
def test_window_conv_gives_the_dense_gradients(kernel, padding, cells):
    """Gradients at a few cells (corners, borders, the middle) or everywhere: the same as autograd's dense ones."""
    from lumos.tasks.adapters import SparseRowBackward

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, padding=padding)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    dense_out = conv(x)
    g = torch.randn_like(dense_out)
    if cells != "all":
        keep = torch.zeros_like(g)
        for y, x_ in cells:
            keep[1, :, y, x_] = 1
        g = g * keep
    with SparseRowBackward():
        out = conv(x)
    assert out.grad_fn.name().startswith("WindowConv2d") and torch.allclose(out, dense_out)
    dense = torch.autograd.grad(dense_out, (x, conv.weight, conv.bias), g)
    window = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
    assert all(torch.allclose(d, w, atol=1e-5) for d, w in zip(dense, window, strict=True))
    assert dense[0].abs().max() > 0


def test_sparse_multiscale_roi_pooling_gives_the_dense_values_and_gradients():
    ops = pytest.importorskip("torchvision.ops")
    from lumos.tasks.adapters import sparse_backward

    torch.manual_seed(0)
    pooler = ops.MultiScaleRoIAlign(["0", "1", "2"], 3, 2)
    holder = nn.Module()
    holder.pool = pooler
    feats = {k: torch.randn(1, 4, s, s, requires_grad=True) for k, s in (("0", 128), ("1", 64), ("2", 32))}
    xy = torch.rand(40, 2) * 100
    boxes = [torch.cat([xy, xy + 10 + torch.rand(40, 2) * 400], 1)]  # small and large: every level used
    dense_out = pooler(feats, boxes, [(512, 512)])
    levels = pooler.map_levels(boxes)
    assert len(set(levels.tolist())) == 3
    g = torch.zeros(40, 4, 3, 3)
    g[[int((levels == k).nonzero()[0, 0]) for k in range(3)]] = torch.randn(3, 4, 3, 3)  # a region per level
    dense = torch.autograd.grad(dense_out, list(feats.values()), g)
    with sparse_backward(holder):
        out = pooler(feats, boxes, [(512, 512)])
    assert "forward" not in vars(pooler), "the pooler's own forward must be back after the block"
    assert out.grad_fn.name().startswith("SparseMultiScaleRoIAlign")
    assert torch.equal(out, dense_out)
    sparse = torch.autograd.grad(out, list(feats.values()), g)
    assert all(torch.allclose(d, s_, atol=1e-6) for d, s_ in zip(dense, sparse, strict=True))
    assert all(d.abs().max() > 0 for d in dense)


# -- gradients: a hand-made dense detector whose box k sees only its own quadrant -------------------------
class QuadrantDetector(nn.Module):
    """Two predictions: box 0 (top-left quadrant) scores class 0 from the top-left of the feature map, box 1
    (bottom-right) scores class 1 from the bottom-right. Grad-CAM of box k must vanish off its quadrant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).relu()
        h, w = f.shape[-2:]
        s0 = f[:, :, : h // 2, : w // 2].mean((1, 2, 3))
        s1 = f[:, :, h // 2:, w // 2:].mean((1, 2, 3))
        b = x.shape[0]
        boxes = torch.tensor([[0.0, 0, 8, 8], [8, 8, 16, 16]]).expand(b, 2, 4)
        scores = torch.stack([torch.stack([s0, s0 * 0], 1), torch.stack([s1 * 0, s1], 1)], 1)
        return torch.cat([boxes, scores.sigmoid() * torch.tensor([[1.0, 0], [0, 1]])], 2)


def test_each_box_map_lives_in_its_own_quadrant_and_is_the_same_alone():
    model, x = QuadrantDetector(), torch.rand(1, 3, 16, 16) + 0.1
    both = DetectionTarget([[0, 0, 8, 8], [8, 8, 16, 16]], [0, 1])
    ex = lumos.explain(model, x, "hirescam", target=both, layer="conv")
    assert ex.maps.shape == (2, 16, 16) and ex.raw.shape == (2, 16, 16)
    assert ex.raw[0, :8, :8].abs().max() > 0 and ex.raw[0, 8:].abs().max() == 0 and ex.raw[0, :, 8:].abs().max() == 0
    assert ex.raw[1, 8:, 8:].abs().max() > 0 and ex.raw[1, :8].abs().max() == 0
    alone = lumos.explain(model, x, "hirescam", target=DetectionTarget([[8, 8, 16, 16]], [1]), layer="conv")
    assert torch.allclose(alone.raw[0], ex.raw[1])
    # the closed form: d sigmoid(mean relu(conv))/d f = sigmoid' / (4 * 8 * 8) on the quadrant where f > 0
    f = model.conv(x).relu()
    s0 = f[:, :, :8, :8].mean()
    g = torch.sigmoid(s0) * (1 - torch.sigmoid(s0)) / (4 * 64)
    expected = (g * f.detach()[0, :, :8, :8] * (f[0, :, :8, :8] > 0)).sum(0)  # grad is through the relu
    assert torch.allclose(ex.raw[0, :8, :8], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_perturbation_maps_follow_each_box_to_its_quadrant(method):
    """Hiding the top-left quadrant lowers box 0's score only: box 0's map lives there, box 1's opposite."""
    model, x = QuadrantDetector(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    kw = {"occlusion": {"window": 8, "stride": 8}, "rise": {"n_masks": 200, "cell": 2}}[method]
    both = DetectionTarget([[0, 0, 8, 8], [8, 8, 16, 16]], [0, 1], iou_threshold=0.9)
    ex = lumos.explain(model, x, method, target=both, layer="conv", **kw)
    quads = [(slice(0, 8), slice(0, 8)), (slice(8, 16), slice(8, 16))]
    for k, (own, other) in enumerate([(quads[0], quads[1]), (quads[1], quads[0])]):
        assert ex.maps[k][own].mean() > 2 * ex.maps[k][other].mean() + 1e-6, (method, k)
    if method == "occlusion":  # closed form: the drop of box 0's score when its quadrant is zeroed
        clean = both.resolve(model(x)).scores(model(x))[0, 0]
        hidden = x.clone()
        hidden[..., :8, :8] = 0
        drop = clean - both.resolve(model(x)).scores(model(hidden))[0, 0]
        assert torch.allclose(ex.raw[0, 0, 0], drop.detach(), atol=1e-6)


def test_blocked_gradients_are_an_error():
    class Detached(QuadrantDetector):
        def forward(self, x):
            return super().forward(x).detach()

    with pytest.raises(GradientError):
        lumos.explain(Detached(), torch.rand(1, 3, 16, 16), "gradcam", layer="conv",
                      target=DetectionTarget([[0, 0, 8, 8]], [0]))


# -- torchvision detectors with random weights ----------------------------------------------------------
SIZE = 96


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def faster_rcnn(one_thread) -> TorchvisionDetector:
    tv = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    det = tv.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0,
        box_detections_per_img=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    return calibrated(det, SIZE)


@pytest.fixture(scope="module")
def retinanet(one_thread) -> TorchvisionDetector:
    tv = pytest.importorskip("torchvision.models.detection")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6)
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3)
    det = tv.RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=SIZE, max_size=SIZE,
                       score_thresh=0.0, detections_per_img=100, topk_candidates=100)
    for conv in det.head.classification_head.modules():  # torchvision's std-0.01 init: every score is 0.01
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight)
    return calibrated(det, SIZE)


FRCNN_LAYER = "detector.backbone.body.13"
RETINA_LAYER = "detector.backbone.body.12"


@pytest.fixture(scope="module")
def frcnn_boxes(faster_rcnn, image) -> DetectionTarget:
    with torch.no_grad():
        out = faster_rcnn(image)
    assert out.shape[2] == 4 + 4
    return DetectionTarget(score_threshold=0.0, max_boxes=3).resolve(out)


@pytest.mark.parametrize("method", GRADIENT_CAMS + list(PERTURBATION))
def test_faster_rcnn_every_method_explains_a_chosen_box(faster_rcnn, image, frcnn_boxes, method):
    before = faster_rcnn(image).detach()
    box = frcnn_boxes.box(1)
    ex = lumos.explain(faster_rcnn, image, method, target=box, layer=FRCNN_LAYER, **PERTURBATION.get(method, {}))
    assert ex.maps.shape == (1, SIZE, SIZE) and torch.isfinite(ex.maps).all()
    assert torch.allclose(ex.scores, box.scores(before)[:, 0])
    # the score responded. Not asserted where a zero is a true answer on a random network: Grad-CAM++/LayerCAM
    # ReLU the gradients, and a random detector's boxes move under any mask (IoU < 0.5: the box is gone, 0).
    # The perturbation methods' maps are checked on the hand-made and the shipped detectors.
    if method in ("gradcam", "hirescam", "xgradcam"):
        assert ex.raw.abs().max() > 0
    assert torch.equal(faster_rcnn(image).detach(), before), "explaining must not change the detector's output"


def test_faster_rcnn_box_map_same_alone_or_with_other_boxes(faster_rcnn, image, frcnn_boxes):
    for method in ("gradcam", "occlusion"):
        kw = PERTURBATION.get(method, {})
        together = lumos.explain(faster_rcnn, image, method, target=frcnn_boxes, layer=FRCNN_LAYER, **kw)
        assert together.maps.shape == (3, SIZE, SIZE)
        for j in (0, 2):
            alone = lumos.explain(faster_rcnn, image, method, target=frcnn_boxes.box(j), layer=FRCNN_LAYER, **kw)
            assert torch.allclose(alone.maps[0], together.maps[j], atol=1e-5)
        if method == "gradcam":
            assert not torch.allclose(together.maps[0], together.maps[2])


def test_faster_rcnn_gradcam_matches_a_hand_written_reference(faster_rcnn, image, frcnn_boxes):
    """Grad-CAM from the detector's own dicts: hook the layer, find the box's detection, autograd by hand."""
    box, label = frcnn_boxes.boxes[0, 0], int(frcnn_boxes.labels[0, 0])
    module = dict(faster_rcnn.named_modules())[FRCNN_LAYER]
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        dets = faster_rcnn.detector(list(image))[0]
    finally:
        handle.remove()
    same = (dets["labels"] == label) & (box_iou(box[None], dets["boxes"])[0] > 0.999)
    score = dets["scores"][same.nonzero()[0, 0]]
    acts = store["a"]
    grads, = torch.autograd.grad(score, acts)
    reference = (grads.mean((2, 3), keepdim=True) * acts).sum(1)[0].detach()  # lumos's raw map: before the ReLU
    ex = lumos.explain(faster_rcnn, image, "gradcam", target=frcnn_boxes.box(0), layer=FRCNN_LAYER)
    assert torch.allclose(ex.raw[0], reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("method", GRADIENT_CAMS + list(PERTURBATION))
def test_retinanet_every_method_explains_a_box(retinanet, image, method):
    before = retinanet(image).detach()
    target = DetectionTarget(score_threshold=0.0, max_boxes=2).resolve(before)
    ex = lumos.explain(retinanet, image, method, target=target, layer=RETINA_LAYER, **PERTURBATION.get(method, {}))
    assert ex.maps.shape == (2, SIZE, SIZE) and torch.isfinite(ex.maps).all()
    assert torch.allclose(ex.scores, target.scores(before).flatten())
    if method in ("gradcam", "hirescam", "xgradcam"):  # (see the Faster R-CNN test for the others)
        assert ex.raw.flatten(1).abs().amax(1).min() > 0
    assert torch.equal(retinanet(image).detach(), before)


def test_retinanet_box_map_same_alone_or_with_other_boxes(retinanet, image):
    target = DetectionTarget(score_threshold=0.0, max_boxes=3).resolve(retinanet(image).detach())
    for method in ("gradcam", "occlusion"):
        kw = PERTURBATION.get(method, {})
        together = lumos.explain(retinanet, image, method, target=target, layer=RETINA_LAYER, **kw)
        for j in (0, 2):
            alone = lumos.explain(retinanet, image, method, target=target.box(j), layer=RETINA_LAYER, **kw)
            assert torch.allclose(alone.maps[0], together.maps[j], atol=1e-5)


def test_retinanet_sparse_backward_gives_the_dense_maps(retinanet, image):
    """The sparse backward (per-level head pieces skipped when their gradient is zero) changes no value."""
    dense = TorchvisionDetector(retinanet.detector, sparse_backward=False)
    target = DetectionTarget(score_threshold=0.0, max_boxes=3)
    for method in ("gradcam", "hirescam"):
        a = lumos.explain(retinanet, image, method, target=target, layer=RETINA_LAYER).raw
        b = lumos.explain(dense, image, method, target=target, layer=RETINA_LAYER).raw
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())) and b.abs().max() > 0


# -- the shipped detector on held-out synthetic scenes ---------------------------------------------------
N_SCENES = 24  # scripts/train_scenes_detector.py --measure 150 gives the full figures (docs/detection.md)


@pytest.fixture(scope="module")
def shipped(one_thread):
    from lumos.synthetic.detector import load_tinydetector
    from lumos.synthetic.scenes import make_scenes

    model, scenes = load_tinydetector(), make_scenes(N_SCENES, seed=123)
    found = []
    for i in range(N_SCENES):
        with torch.no_grad():
            (boxes, labels, _), = detections(model(scenes.images[i:i + 1]), 0.5, 0.3)
        objs = []
        for label, box, mask in scenes.objects(i):
            iou = box_iou(box[None], boxes)[0] * (labels == label).float() if len(boxes) else torch.zeros(1)
            if float(iou.max()) >= 0.5:
                objs.append((boxes[int(iou.argmax())], label, mask))
        found.append(objs)
    return model, scenes, found


def energy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Independent of lumos.synthetic.energy_share: share of the map's mass inside each mask."""
    return (maps * masks).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)


def test_shipped_detector_finds_most_objects(shipped):
    _, scenes, found = shipped
    total = sum(len(scenes.objects(i)) for i in range(len(scenes)))
    assert sum(len(f) for f in found) >= 0.6 * total


def test_shipped_detector_gradcam_is_on_the_box_object_and_instance_specific(shipped):
    model, scenes, found = shipped
    own, rand, wins, pairs = [], [], 0, 0
    gen = torch.Generator().manual_seed(0)
    for i, objs in enumerate(found):
        if not objs:
            continue
        target = DetectionTarget(torch.stack([b for b, _, _ in objs]), [lab for _, lab, _ in objs])
        maps = lumos.explain(model, scenes.images[i:i + 1], "gradcam", target=target, layer="features.block5").maps
        masks = torch.stack([m for _, _, m in objs]).float()
        own.append(energy(maps, masks))
        rand.append(energy(torch.rand(maps.shape, generator=gen), masks))
        for a in range(len(objs)):
            for b in range(len(objs)):
                if a != b:
                    pairs += 1
                    wins += int(energy(maps[a:a + 1], masks[a:a + 1]) > energy(maps[a:a + 1], masks[b:b + 1]))
    own_t, rand_t = torch.cat(own), torch.cat(rand)
    assert own_t.mean() >= 2 * rand_t.mean()
    assert pairs >= 20 and wins / pairs >= 0.8


@pytest.mark.parametrize("method", ["scorecam", "occlusion", "rise"])
def test_shipped_detector_perturbation_maps_follow_the_box(shipped, method):
    model, scenes, found = shipped
    i = next(i for i, objs in enumerate(found) if len(objs) >= 2)
    (box_a, label_a, mask_a), (box_b, label_b, mask_b) = found[i][:2]
    kw = {"scorecam": {}, "occlusion": {"window": 8, "stride": 4}, "rise": {"n_masks": 500, "cell": 8}}[method]
    target = DetectionTarget(torch.stack([box_a, box_b]), [label_a, label_b])
    before = model(scenes.images[i:i + 1]).detach()
    maps = lumos.explain(model, scenes.images[i:i + 1], method, target=target, layer="features.block5", **kw).maps
    masks = torch.stack([mask_a, mask_b]).float()
    share = energy(maps, masks)
    if method == "scorecam":  # Score-CAM's channel masks give this detector broad maps (docs/detection.md)
        assert not torch.allclose(maps[0], maps[1]) and torch.isfinite(maps).all()
    else:
        assert (share >= 2 * masks.mean((1, 2))).all(), share  # twice a uniform map's share
        assert energy(maps[:1], masks[1:]) < share[0] and energy(maps[1:], masks[:1]) < share[1]
    assert torch.equal(model(scenes.images[i:i + 1]).detach(), before)


@pytest.mark.parametrize("method", GRADIENT_CAMS + ["scorecam", "rise"])
def test_shipped_detector_box_map_same_alone_or_with_other_boxes(shipped, method):
    model, scenes, found = shipped
    i = next(i for i, objs in enumerate(found) if len(objs) >= 2)
    target = DetectionTarget(torch.stack([b for b, _, _ in found[i]]), [lab for _, lab, _ in found[i]])
    kw = {"rise": {"n_masks": 200, "cell": 8}}.get(method, {})
    together = lumos.explain(model, scenes.images[i:i + 1], method, target=target, layer="features.block5", **kw)
    for j in range(len(found[i])):
        alone = lumos.explain(model, scenes.images[i:i + 1], method, target=target.box(j), layer="features.block5",
                              **kw)
        assert torch.allclose(alone.maps[0], together.maps[j], atol=1e-5), (method, j)


def test_shipped_detector_scorecam_equals_a_hand_loop_over_channels(shipped):
    """Score-CAM's broad maps on this detector are the method's answer, not a target bug: all-channel Score-CAM
    of a box equals the loop written from the paper (mask, run, box score minus the black image's)."""
    model, scenes, found = shipped
    i = next(i for i, objs in enumerate(found) if objs)
    x, (box, label, _) = scenes.images[i:i + 1], found[i][0]
    target = DetectionTarget(box[None, None], [[label]])
    store = {}
    layer = dict(model.named_modules())["features.block5"]
    handle = layer.register_forward_hook(lambda m, i, o: store.update(a=o.detach()[0]))  # returns None
    with torch.no_grad():
        model(x)
        handle.remove()
        base = target.scores(model(torch.zeros_like(x)))[0, 0]
        weights = []
        for a in store["a"]:
            m = nn.functional.interpolate(a[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            span = m.max() - m.min()
            weights.append(target.scores(model(x * (m - m.min()) / span))[0, 0] - base if span > 0 else 0.0)
    reference = torch.einsum("k,khw->hw", torch.tensor(weights), store["a"])
    ex = lumos.explain(model, x, "scorecam", target=target, layer="features.block5", max_channels=None)
    assert torch.allclose(ex.raw[0], reference, atol=1e-4 * float(reference.abs().max()))


def test_cli_helper_writes_boxes_overlays_and_gallery(shipped, tmp_path):
    from PIL import Image

    from lumos.cli_tasks import explain_detection

    model, scenes, found = shipped
    i = next(i for i, objs in enumerate(found) if len(objs) >= 2)
    paths = explain_detection(model, scenes.images[i:i + 1], tmp_path, layer="features.block5",
                              names=scenes.class_names, scale=2)
    with torch.no_grad():
        n = len(detections(model(scenes.images[i:i + 1]), 0.5, 0.5)[0][0])
    assert [p.name for p in paths] == ["image_boxes.png", *(f"image_box{k}.png" for k in range(n)),
                                       "image_detections.png"]
    assert Image.open(paths[1]).size == (128, 128)
    with pytest.raises(lumos.LumosError, match="No detection"):
        explain_detection(model, scenes.images[i:i + 1], tmp_path, layer="features.block5", score_threshold=1.01)


def test_cli_pictures_draw_a_pixel_method_as_pixels_and_number_the_boxes(shipped, tmp_path):
    """Guided backprop's per-box picture is its pixel drawing (grey), not a jet heatmap, and the overview labels
    the boxes "#k" as the files count them; the same picture drawn as a layer map would differ."""
    import numpy as np
    from PIL import Image

    from lumos.cli_tasks import explain_detection
    from lumos.render import to_pil_image
    from lumos.render.boxes import draw_boxes, explained_box
    from lumos.tasks import DetectionTarget

    model, scenes, found = shipped
    i = next(i for i, objs in enumerate(found) if len(objs) >= 2)
    x = scenes.images[i:i + 1]
    paths = explain_detection(model, x, tmp_path, method="guided_backprop", layer="features.block5",
                              names=scenes.class_names, scale=2)
    with torch.no_grad():
        (boxes, labels, scores), = detections(model(x), 0.5, 0.5, 10)
    ex = lumos.explain(model, x, "guided_backprop", target=DetectionTarget(boxes, labels))
    image = to_pil_image(x[0])
    as_pixels = explained_box(image, ex.maps[0], boxes[0], int(labels[0]), float(scores[0]), scenes.class_names,
                              2, kind="pixel")
    as_layer = explained_box(image, ex.maps[0], boxes[0], int(labels[0]), float(scores[0]), scenes.class_names, 2)
    written = np.asarray(Image.open(paths[1]).convert("RGB"), dtype=int)
    assert np.abs(written - np.asarray(as_pixels, dtype=int)).max() <= 1
    assert np.abs(written - np.asarray(as_layer, dtype=int)).max() > 50
    numbered = np.asarray(draw_boxes(image, boxes, labels, scores, scenes.class_names, 2, numbered=True))
    plain = np.asarray(draw_boxes(image, boxes, labels, scores, scenes.class_names, 2))
    assert np.array_equal(np.asarray(Image.open(paths[0]).convert("RGB")), numbered)
    assert not np.array_equal(numbered, plain)


def test_box_labels_move_rather_than_cover_each_other():
    """Two boxes with the same top-left corner: the second label goes inside its box, a third below it; every
    label is painted where it says (black plate) and no two plates overlap."""
    from PIL import Image, ImageDraw

    from lumos.render.boxes import draw_boxes, label_place

    draw = ImageDraw.Draw(Image.new("RGB", (100, 100)))
    box = (20.0, 30.0, 80.0, 70.0)
    taken = []
    for _ in range(3):
        taken.append(label_place(draw, "#0 disc 0.65", box, taken)[1])
    assert taken[0][3] <= 30 and 30 < taken[1][1] < 70 and taken[2][1] > 70
    assert not any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                   for j, a in enumerate(taken) for b in taken[j + 1:])
    assert label_place(draw, "x", box, [(0.0, 0.0, 100.0, 100.0)])[0] == (22.0, 19.0)  # all taken: the first place
    pic = draw_boxes(Image.new("RGB", (100, 100), (255, 255, 255)), torch.tensor([box, box, box]),
                     torch.tensor([0, 1, 2]), numbered=True)
    for x0, y0, *_ in taken:  # each plate's corner is black on the white image (label text is coloured)
        assert pic.getpixel((int(x0), int(y0))) == (0, 0, 0)


def test_run_task_on_image_files(tmp_path, one_thread):
    from PIL import Image

    from lumos.cli_tasks import run_task
    from lumos.synthetic.scenes import make_scenes

    scenes = make_scenes(1, seed=123)
    path = tmp_path / "scene.png"
    Image.fromarray((scenes.images[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    det = run_task("detection", [path], tmp_path / "out")
    seg = run_task("segmentation", [path], tmp_path / "out")
    assert det[0].name == "scene_boxes.png" and det[-1].name == "scene_detections.png"
    assert seg[-1].name == "scene_segments.png" and all(p.exists() for p in det + seg)
    with pytest.raises(lumos.LumosError, match="Unknown task"):
        run_task("tracking", [path], tmp_path)
