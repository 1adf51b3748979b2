"""Every target form: None, int, per-image list/tensor, class name, topk:N, callables."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import lumos
from lumos.targets import SegmentationTarget, SimilarityTarget
from nets import GapNet, images

LABELS = ["tench", "goldfish", "tabby, tabby cat", "tiger cat", "espresso"]


@pytest.fixture(scope="module")
def model() -> GapNet:
    torch.manual_seed(0)
    return GapNet().eval()


def test_int_list_tensor_and_name_targets_agree(model):
    x = images(3)
    by_list = lumos.explain(model, x, target=[2, 2, 2])
    for spec in (2, torch.tensor([2, 2, 2]), "tabby cat", "TABBY", ["tabby cat", 2, "2"]):
        ex = lumos.explain(model, x, target=spec, labels=LABELS)
        assert ex.targets.tolist() == [2, 2, 2]
        torch.testing.assert_close(ex.maps, by_list.maps)


def test_per_image_targets_and_length_mismatch(model):
    x = images(3)
    ex = lumos.explain(model, x, target=[0, 3, 4])
    assert ex.targets.tolist() == [0, 3, 4]
    for i, c in enumerate([0, 3, 4]):
        torch.testing.assert_close(ex.maps[i], lumos.explain(model, x[i : i + 1], target=c).maps[0])
    with pytest.raises(lumos.LumosError, match="Got 2 targets for 3 images"):
        lumos.explain(model, x, target=[0, 1])
    with pytest.raises(lumos.LumosError, match="out of range"):
        lumos.explain(model, x, target=9)


def test_unknown_class_name_lists_close_matches(model):
    with pytest.raises(lumos.LumosError, match="Did you mean: tiger cat"):
        lumos.explain(model, images(1), target="tigr cat", labels=LABELS)
    with pytest.raises(lumos.LumosError, match="needs labels"):
        lumos.explain(model, images(1), target="tiger cat")


def test_topk_gives_k_maps_per_image_best_first(model):
    x = images(2)
    ex = lumos.explain(model, x, target="topk:3")
    assert ex.maps.shape == (6, 32, 32)
    assert ex.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    top = model(x).topk(3, 1).indices
    assert ex.targets.tolist() == top.flatten().tolist()
    assert (ex.scores.view(2, 3).diff(dim=1) <= 0).all()
    for i in range(2):
        for j in range(3):
            single = lumos.explain(model, x[i : i + 1], target=int(top[i, j]))
            torch.testing.assert_close(ex.maps[3 * i + j], single.maps[0])
    with pytest.raises(lumos.LumosError, match="asks for 9"):
        lumos.explain(model, x, target="topk:9")


def test_callable_target_equals_the_class_it_computes(model):
    x = images(2)
    ex = lumos.explain(model, x, target=lambda out: out[:, 3])
    torch.testing.assert_close(ex.maps, lumos.explain(model, x, target=3).maps)
    assert ex.targets is None and ex.probs is None
    with pytest.raises(lumos.LumosError, match="one score per image"):
        lumos.explain(model, x, target=lambda out: out)


class TinySeg(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_segmentation_target_explains_a_region():
    torch.manual_seed(0)
    model = TinySeg().eval()
    x = images(2, size=16)
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 1
    ex = lumos.explain(model, x, target=SegmentationTarget(1, mask), layer="body", normalize=None, relu=False,
                       method="hirescam")
    a = model.body(x)
    expected = (a * model.head.weight[1, :, 0, 0][None, :, None, None]).sum(1) * mask
    torch.testing.assert_close(ex.raw, expected, rtol=1e-5, atol=1e-6)
    default = lumos.explain(model, x, target=SegmentationTarget(2), layer="body")
    assert default.maps.shape == (2, 16, 16)


def test_similarity_target_scores_cosine(model):
    x = images(3)
    with torch.no_grad():
        ref = model(x[:1])[0]
    ex = lumos.explain(model, x, target=SimilarityTarget(ref))
    expected = torch.nn.functional.cosine_similarity(model(x), ref[None], dim=1)
    torch.testing.assert_close(ex.scores, expected.detach())
    assert ex.scores[0] == pytest.approx(1.0, abs=1e-5)


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_no_memory_growth_over_200_calls(model, method):
    x = images(4, size=64)
    cam = lumos.method_class(method)(model, max_channels=4) if method == "scorecam" else lumos.GradCAM(model)
    for _ in range(20):
        cam(x)
    gc.collect()
    start, tensors = _rss_bytes(), _live_tensors()
    for _ in range(200):
        ex = cam(x)
    del ex
    gc.collect()
    # what a leak keeps is tensors (maps, activations, graphs): count them; RSS alone moves by +-10 MiB between
    # calls as the allocator keeps or returns pages, so it is only a backstop against a large leak
    assert _live_tensors() <= tensors, f"{_live_tensors() - tensors} more live tensors after 200 calls"
    growth = _rss_bytes() - start
    assert growth < 48 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 calls"
    assert all(not m._forward_hooks for m in model.modules())


def test_output_on_a_model_returning_one_tensor_is_refused_by_name():
    from lumos.targets import TargetError
    """output=0 on a model returning one (batch, classes) tensor indexed batch row 0 and then failed with
    'Class targets need a (batch, classes) output; this one is (K,)', which does not say what was wrong."""
    import lumos
    from lumos.synthetic import TinyCNN
    from lumos.targets import select_output

    with pytest.raises(TargetError, match="output=0 .* the model returns one tensor: leave output= out"):
        select_output(torch.zeros(2, 4), 0)
    assert select_output((torch.zeros(2, 3), torch.ones(2, 4)), 1).shape == (2, 4)
    with pytest.raises(TargetError, match="returns one tensor"):
        lumos.explain(TinyCNN().eval(), torch.rand(2, 3, 32, 32), "gradcam", output=0)
