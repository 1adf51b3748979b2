"""The engine survives the models people actually write, and leaves them exactly as it found them."""

from __future__ import annotations

import copy

import pytest
import torch

import lumos
from lumos.layers import auto_layer
from nets import FunctionalNet, GapNet, ReusedReLUNet, TupleNet, TwiceNet, copy_weights, images

GRAD_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]


def state_snapshot(model: torch.nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
        ],
    }


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = state_snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    assert after["hooks"] == before["hooks"]
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), k
    for k, v in before["buffers"].items():
        assert torch.equal(v, after["buffers"][k]), k


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_inplace_relu_model_matches_non_inplace_twin(method):
    torch.manual_seed(0)
    inplace = GapNet(inplace=True).eval()
    plain = copy_weights(inplace, GapNet(inplace=False).eval())
    x = images(3)
    for layer in ["features.0", "features.2", "features.3", "features"]:
        a = lumos.explain(inplace, x, method=method, layer=layer)
        b = lumos.explain(plain, x, method=method, layer=layer)
        torch.testing.assert_close(a.raw, b.raw, rtol=1e-5, atol=1e-6)
    # The conv output is recorded before the in-place ReLU overwrote it: it still has negatives.
    assert (lumos.explain(inplace, x, layer="features.3", method="eigencam").raw.numel()) > 0
    assert (lumos.feature_maps(inplace, x, layer="features.3").activations < 0).any()


def test_functional_relu_model_matches_module_twin():
    torch.manual_seed(0)
    functional = FunctionalNet().eval()
    module = GapNet(inplace=True).eval()
    with torch.no_grad():
        module.features[0].load_state_dict(functional.conv1.state_dict())
        module.features[3].load_state_dict(functional.conv2.state_dict())
        module.fc.load_state_dict(functional.fc.state_dict())
    x = images(3)
    a = lumos.explain(functional, x, layer="conv2")
    b = lumos.explain(module, x, layer="features.3")
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-5, atol=1e-6)


def test_reused_relu_module_and_shared_target_layer():
    torch.manual_seed(0)
    model = ReusedReLUNet().eval()
    x = images(2)
    before = state_snapshot(model)
    ex = lumos.explain(model, x, layer="conv3")
    assert ex.maps.shape == (2, 32, 32)
    assert auto_layer(model, x) == "conv3"  # the reused ReLU ran 3 times, so auto skips it
    with pytest.raises(lumos.LumosError, match="more than once"):
        lumos.explain(model, x, layer="relu")
    assert_unchanged(before, model)


def test_module_used_twice_as_target_layer_is_a_clear_error():
    model = TwiceNet().eval()
    before = state_snapshot(model)
    with pytest.raises(lumos.LumosError, match="'shared' runs more than once"):
        lumos.explain(model, images(2), layer="shared")
    assert_unchanged(before, model)


def test_frozen_parameters_and_no_grad_caller():
    torch.manual_seed(0)
    model = GapNet().eval()
    reference = lumos.explain(model, images(2), method="gradcam")
    for p in model.parameters():
        p.requires_grad_(False)
    before = state_snapshot(model)
    with torch.no_grad():
        frozen = lumos.explain(model, images(2), method="gradcam")
        assert not torch.is_grad_enabled()  # the caller's grad mode is restored
    torch.testing.assert_close(frozen.raw, reference.raw)
    assert_unchanged(before, model)
    assert torch.is_grad_enabled()


def test_train_mode_model_is_explained_in_eval_and_restored():
    torch.manual_seed(0)
    model = GapNet(bn=True)
    model.train()
    model.features[1].running_mean.fill_(0.3)
    before = state_snapshot(model)
    ex = lumos.explain(model, images(4), method="gradcam")
    assert_unchanged(before, model)
    assert model.training and model.features[1].training
    evaluated = copy.deepcopy(model).eval()
    torch.testing.assert_close(ex.raw, lumos.explain(evaluated, images(4), method="gradcam").raw)


def test_train_mode_kept_on_request_still_restores_batchnorm_stats():
    torch.manual_seed(0)
    model = GapNet(bn=True).train()
    before = state_snapshot(model)
    lumos.explain(model, images(4), method="gradcam", eval_mode=False)
    assert_unchanged(before, model)


def test_state_restored_after_an_exception_inside_the_call():
    torch.manual_seed(0)
    model = GapNet(bn=True).train()
    before = state_snapshot(model)

    def bad_target(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        lumos.explain(model, images(2), target=bad_target)
    assert_unchanged(before, model)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            lumos.explain(model, images(2), target=bad_target)
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_need_a_selector(as_dict):
    torch.manual_seed(0)
    model = TupleNet(as_dict=as_dict).eval()
    x = images(2)
    with pytest.raises(lumos.LumosError, match="output="):
        lumos.explain(model, x, layer="body.features")
    ex = lumos.explain(model, x, layer="body.features", output="logits" if as_dict else 0)
    plain = lumos.explain(model.body, x, layer="features")
    torch.testing.assert_close(ex.raw, plain.raw)
    fn = lumos.explain(model, x, layer="body.features", output=lambda o: o["aux"] if as_dict else o[1])
    torch.testing.assert_close(fn.raw, 2 * plain.raw)
    with pytest.raises(lumos.LumosError, match="does not select"):
        lumos.explain(model, x, layer="body.features", output="nope" if as_dict else 7)


def test_layers_by_module_name_auto_and_several():
    torch.manual_seed(0)
    model = GapNet().eval()
    x = images(2)
    auto = lumos.explain(model, x)
    assert auto.layer == "features" and auto.layer_auto
    by_module = lumos.explain(model, x, layer=model.features)
    assert by_module.layer == "features" and not by_module.layer_auto
    torch.testing.assert_close(auto.maps, by_module.maps)
    both = lumos.explain(model, x, layer=["features.0", "features.3"])
    assert both.layer == ("features.0", "features.3") and isinstance(both.raw, tuple)
    assert both.raw[0].shape[-1] == 32 and both.raw[1].shape[-1] == 16
    assert both.maps.shape == (2, 32, 32) and float(both.maps.max()) == pytest.approx(1.0)
    with pytest.raises(lumos.LumosError, match=r"No layer named 'featurs.3'.*features\.3"):
        lumos.explain(model, x, layer="featurs.3")
    with pytest.raises(lumos.LumosError, match="not part of this model"):
        lumos.explain(model, x, layer=torch.nn.Conv2d(3, 3, 1))


def test_explanation_fields_and_explicit_postprocessing():
    torch.manual_seed(0)
    model = GapNet().eval()
    x = images(3, size=40)
    ex = lumos.explain(model, x, method="gradcam")
    assert ex.maps.shape == (3, 40, 40) and ex.maps.dtype == torch.float32
    assert ex.raw.shape == (3, 20, 20)
    assert ex.method == "gradcam" and ex.params["upsample"] == "bilinear"
    logits = model(x)
    torch.testing.assert_close(ex.targets, logits.argmax(1))
    torch.testing.assert_close(ex.scores, logits.max(1).values)
    torch.testing.assert_close(ex.probs, torch.softmax(logits, 1).max(1).values)
    raw = lumos.explain(model, x, method="hirescam", relu=False, normalize=None, upsample="nearest")
    assert raw.maps.min() < 0  # no ReLU, no normalisation
    torch.testing.assert_close(raw.maps[:, ::2, ::2], raw.raw)
    with pytest.raises(lumos.LumosError, match="upsample"):
        lumos.explain(model, x, upsample="lanczos")


def test_constant_map_gives_zeros_not_nan_and_says_so_in_one_line(caplog):
    """A model with every weight 0: every method's maps are exactly 0 (never NaN), and each call logs one line
    saying the maps are zero everywhere (drawn as nothing); a trained-looking model logs no such line."""
    model = GapNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for method in lumos.methods(general=True):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lumos.engine"):
            ex = lumos.explain(model, images(2), method=method)
        assert torch.isfinite(ex.maps).all(), method
        assert (ex.maps == 0).all(), method
        lines = [r.getMessage() for r in caplog.records if "zero everywhere" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(f"{method}: 2 of 2 maps are zero everywhere"), (method, lines)
        assert "(image 0 class 0, image 1 class 0)" in lines[0] and "\n" not in lines[0], lines
    caplog.clear()
    with caplog.at_level("WARNING", logger="lumos.engine"):
        lumos.explain(GapNet().eval(), images(2), method="gradcam")
    assert not [r for r in caplog.records if "zero everywhere" in r.getMessage()]


def test_bad_inputs_are_one_line_errors():
    model = GapNet().eval()
    for bad in ["cat.jpg", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 3, 8, 8), torch.zeros(8, 8)]:
        with pytest.raises(lumos.LumosError) as info:
            lumos.explain(model, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(lumos.LumosError, match=r"Unknown method 'gradcan'.*gradcam"):
        lumos.explain(model, images(1), method="gradcan")
    with pytest.raises(lumos.LumosError, match="nn.Module"):
        lumos.explain(lambda t: t, images(1))
    assert lumos.explain(model, images(1)[0]).maps.shape == (1, 32, 32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_model_is_a_clear_error_not_a_traceback():
    scripted = torch.jit.script(GapNet().eval())
    for layer in ["auto", "features"]:
        with pytest.raises(lumos.LumosError, match="TorchScript"):
            lumos.explain(scripted, images(1), layer=layer)
