"""Mistakes in a Python call are one-line LumosErrors that name the argument, never a raw TypeError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lumos
from lumos.errors import LumosError
from nets import GapNet, images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GapNet().eval()


@pytest.mark.parametrize(("target", "words"), [
    (1.5, "target 1.5 is a float, not a class index"),
    (True, "target True is a bool, not a class index"),
    ([1, 2.0], "target 2.0 is a float"),
    (torch.tensor([1.0, 2.0]), "must hold integer class indices; this one is torch.float32"),
    (torch.tensor([True, False]), "this one is torch.bool"),
    (object(), "is not a target"),
])
def test_a_target_that_is_not_a_class_index_is_named(model, target, words):
    with pytest.raises(LumosError, match=words):
        lumos.explain(model, images(2), "gradcam", target=target)


@pytest.mark.parametrize("target", [np.int64(3), torch.tensor(3), [np.int64(3), 3], torch.tensor([3, 3])])
def test_integer_targets_of_any_kind_are_class_indices(model, target):
    assert lumos.explain(model, images(2), "gradcam", target=target).targets.tolist() == [3, 3]


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "scorecam", "smoothgrad"])
def test_an_unknown_setting_is_named_with_a_suggestion(model, method):
    with pytest.raises(LumosError, match=r"has no setting 'normalise'\. Did you mean: normalize\?"):
        lumos.explain(model, images(2), method, normalise="minmax")


def test_integrated_gradients_rule_is_reachable_from_explain(model):
    # lumos.explain's `method` is the lumos method; the IG rule is `quadrature` (Captum's `method` on the class)
    ex = lumos.explain(model, images(2), "integrated_gradients", quadrature="gausslegendre", steps=8)
    captum_name = lumos.IntegratedGradients(model, method="gausslegendre", steps=8)(images(2))
    assert ex.params["quadrature"] == "gausslegendre" and ex.params["points"].tolist() == [8, 8]
    assert torch.equal(ex.raw, captum_name.raw)
    with pytest.raises(LumosError, match="name two rules"):
        lumos.IntegratedGradients(model, method="left", quadrature="right")


@pytest.mark.parametrize("layer", [5, 2.0, {"features": 1}])
def test_a_layer_that_is_not_a_name_or_module_is_named(model, layer):
    with pytest.raises(LumosError, match=r"is not a layer: give a dotted name, a module, 'auto'"):
        lumos.explain(model, images(2), "gradcam", layer=layer)


def test_an_input_of_another_dtype_than_the_model_is_named(model):
    with pytest.raises(LumosError, match=r"input is torch.float64 but the model's weights are torch.float32"):
        lumos.explain(model, images(2).double(), "gradcam")
