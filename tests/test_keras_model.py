"""Saved Keras 3 models (``.keras``) loaded with ``lumos.load_model`` and explained like torch modules."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported anywhere in this process

import copy  # noqa: E402
import sys  # noqa: E402
from importlib import resources  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

import lumos  # noqa: E402
from lumos.errors import LumosError, ModelLoadError  # noqa: E402
from lumos.evaluate import PointingGame  # noqa: E402
from lumos.layers import auto_layer, trace_layers  # noqa: E402
from lumos.synthetic import load_tinycnn, make_dataset  # noqa: E402
from lumos.zoo.keras_model import KerasModule, import_keras  # noqa: E402

SHIPPED = resources.files("lumos.synthetic").joinpath("tinykeras.keras")


def build_small() -> keras.Model:
    """32 x 32 input, a Rescaling(1/255) first (so it takes 0-255), a nested Sequential, BN, pooling."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    block = keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", name="inner_conv"),
                              keras.layers.ReLU(name="inner_relu")], name="block")
    x = block(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(4, name="fc")(x)
    model = keras.Model(inp, out, name="small")
    rng = np.random.default_rng(0)  # non-trivial BN statistics, so eval mode matters
    bn = model.get_layer("bn1")
    bn.moving_mean.assign(rng.normal(0, 0.1, 8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 8).astype("float32"))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "small.keras"
    build_small().save(path)
    return path


@pytest.fixture(scope="module")
def bundle(saved):
    return lumos.load_model(saved)


@pytest.fixture(scope="module")
def images():
    return make_dataset(3, size=32, seed=4).images * 255  # the small model takes 0-255


def test_load_gives_a_channels_first_module_with_the_models_preprocessing(bundle, saved):
    model, pre, labels = bundle
    assert isinstance(model, KerasModule) and not model.training
    assert model.pixel_range == 255.0 and model.input_size == (32, 32)
    assert pre.size == (32, 32) and pre.mean == (0.0,) * 3 and pre.std == pytest.approx((1 / 255,) * 3)
    x = pre(Image.new("RGB", (50, 40), (255, 128, 0)))
    assert x.shape == (1, 3, 32, 32) and x[0, :, 0, 0].tolist() == pytest.approx([255, 128, 0], abs=1e-3)
    assert list(labels) == ["class 0", "class 1", "class 2", "class 3"]
    assert lumos.load_model(saved, std=(0.5,)).preprocess.std == (0.5,) * 3  # an override wins


def test_input_range_follows_the_models_own_rescaling(tmp_path):
    inp = keras.Input((16, 16, 3))
    plain = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inp))))
    plain.save(tmp_path / "plain.keras")
    bundle = lumos.load_model(tmp_path / "plain.keras")
    assert bundle.model.pixel_range == 1.0 and bundle.preprocess.std == (1.0,) * 3


def test_output_equals_the_keras_model_on_channels_last_input(bundle, saved, images):
    fresh = keras.saving.load_model(saved, compile=False)
    with torch.no_grad():
        ours = bundle.model(images)
        ref = fresh(images.permute(0, 2, 3, 1), training=False)
    assert torch.equal(ours, ref)
    assert ours.shape == (3, 4)


def test_layers_are_named_as_keras_names_them(bundle):
    names = [n for n, _ in bundle.model.named_modules() if n]
    assert names == ["rescale", "conv1", "bn1", "relu1", "pool1", "block", "block.inner_conv", "block.inner_relu",
                     "conv2", "gap", "fc"]
    assert type(bundle.model.conv1).__name__ == "Conv2D"
    kernel = bundle.model.keras_model.get_layer("conv1").kernel
    assert any(p is kernel.value for p in bundle.model.conv1.parameters())  # the Keras variables themselves
    infos = {i.name: i for i in trace_layers(bundle.model, torch.zeros(1, 3, 32, 32))}
    assert infos["conv1"].shape == (1, 8, 32, 32)  # channels-first, as lumos sees maps
    assert infos["block.inner_conv"].shape == (1, 8, 16, 16)
    assert infos["fc"].shape == (1, 4)
    assert auto_layer(bundle.model, torch.zeros(1, 3, 32, 32)) == "conv2"


def test_gradcam_on_a_keras_layer_equals_a_hand_computation(bundle, saved, images):
    ex = lumos.explain(bundle.model, images, method="gradcam", layer="conv1", target=[0, 1, 3], relu=False,
                       normalize=None, upsample="nearest")
    fresh = keras.saving.load_model(saved, compile=False)
    sub = keras.Model(fresh.inputs, [fresh.get_layer("conv1").output, fresh.output])
    acts, out = sub(images.permute(0, 2, 3, 1), training=False)  # channels-last, straight from Keras
    score = out.gather(1, torch.tensor([[0], [1], [3]])).sum()
    (grads,) = torch.autograd.grad(score, acts)
    ref = (grads.mean((1, 2))[:, None, None, :] * acts).sum(-1).detach()
    assert ex.raw.shape == ref.shape == (3, 32, 32)
    torch.testing.assert_close(ex.raw, ref, rtol=1e-5, atol=1e-6)
    assert ref.abs().max() > 1e-4  # not a vacuous comparison


def keras_tinycnn() -> keras.Model:
    """TinyCNN (lumos.synthetic) written in Keras with its trained weights: an independent torch reference."""
    state = load_tinycnn().state_dict()
    inp = keras.Input((64, 64, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    for i, pool in enumerate([True, True, False, False], start=1):
        w = state[f"features.block{i}.conv.weight"]
        x = keras.layers.Conv2D(w.shape[0], 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(epsilon=1e-5, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(2)(x) if pool else x
    out = keras.layers.Dense(4, name="fc")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    for i in range(1, 5):
        p = f"features.block{i}."
        model.get_layer(f"conv{i}").set_weights([state[p + "conv.weight"].permute(2, 3, 1, 0).numpy()])
        model.get_layer(f"bn{i}").set_weights([state[p + k].numpy() for k in
                                               ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")])
    model.get_layer("fc").set_weights([state["fc.weight"].T.numpy(), state["fc.bias"].numpy()])
    return model


def test_the_same_network_in_keras_and_torch_gives_the_same_maps():
    data = make_dataset(2, seed=123)
    wrapped = KerasModule(keras_tinycnn())
    torch_model = load_tinycnn()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(data.images * 255), torch_model(data.images), rtol=1e-4, atol=1e-4)
    for method in ("gradcam", "cam"):
        ours = lumos.explain(wrapped, data.images * 255, method=method, layer="relu4", target=data.labels,
                             normalize=None)
        ref = lumos.explain(torch_model, data.images, method=method, layer="features.block4",
                            target=data.labels, normalize=None)
        torch.testing.assert_close(ours.raw, ref.raw, rtol=1e-3, atol=1e-4 * ref.raw.abs().max().item())
    assert auto_layer(wrapped, data.images[:1]) == "relu4"


def test_a_deep_copy_has_its_own_keras_variables(bundle, images):
    twin = copy.deepcopy(bundle.model)
    assert [n for n, _ in twin.named_modules()] == [n for n, _ in bundle.model.named_modules()]
    with torch.no_grad():
        assert torch.equal(twin(images), bundle.model(images))
        twin.conv2.kernel.mul_(-1)  # what model randomisation does to the copy
        assert not torch.equal(twin(images), bundle.model(images))


def _map_methods() -> list[str]:
    try:
        from lumos.methods.attention import AttentionMethod
    except ImportError:  # pragma: no cover - before the attention methods exist
        return lumos.methods()
    return [m for m in lumos.methods() if not issubclass(lumos.api.method_class(m), AttentionMethod)]


LIGHT = {"rise": {"n_masks": 64}, "occlusion": {"window": 8, "stride": 8}, "smoothgrad": {"n_samples": 4},
         "integrated_gradients": {"steps": 8, "method": "gausslegendre"}, "scorecam": {"batch_size": 16}}


@pytest.mark.parametrize("method", _map_methods())
def test_every_method_explains_a_keras_model(bundle, images, method):
    kwargs = LIGHT.get(method, {})
    ex = lumos.api.method_class(method)(bundle.model, "auto", **kwargs)(images[:2], [1, 2])
    assert ex.maps.shape == (2, 32, 32)
    assert torch.isfinite(ex.maps).all() and ex.maps.abs().max() > 0  # (an untrained model's ReLU'd map may be 0)
    if ex.kind == "layer":
        assert ex.layer == "conv2" and ex.layer_auto


def test_missing_keras_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # what `import keras` sees when it is not installed
    with pytest.raises(LumosError, match=r"pip install 'lumos\[keras\]'"):
        import_keras()


def test_another_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(LumosError, match="already imported with the 'jax' backend.*KERAS_BACKEND=torch"):
        import_keras()
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "keras")  # as if keras were not imported yet
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(LumosError, match="KERAS_BACKEND is 'tensorflow'"):
        import_keras()


def test_bad_keras_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="Cannot load .*broken.keras as a Keras 3 model") as info:
        lumos.load_model(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="not found"):
        lumos.load_model(tmp_path / "missing.keras")


# ----------------------------------------------------------------------- the shipped synthetic model


@pytest.fixture(scope="module")
def shipped():
    with resources.as_file(SHIPPED) as path:
        return lumos.load_model(path)


@pytest.fixture(scope="module")
def held_out():
    return make_dataset(50, seed=123)  # seed 123: never used in training


def test_shipped_model_is_small_and_takes_0_255(shipped):
    assert SHIPPED.is_file() and len(SHIPPED.read_bytes()) < 2 * 1024 * 1024
    assert shipped.model.pixel_range == 255.0 and shipped.preprocess.size == (64, 64)


def test_gradcam_points_at_the_object_on_held_out_images(shipped, held_out):
    x = held_out.images * 255
    with torch.no_grad():
        accuracy = (shipped.model(x).argmax(1) == held_out.labels).float().mean().item()
    ex = lumos.explain(shipped.model, x, method="gradcam", layer="auto", target=held_out.labels)
    hits = PointingGame(tolerance=2.0)(maps=ex.maps, masks=held_out.masks)
    random_maps = torch.rand(50, 64, 64, generator=torch.Generator().manual_seed(0))
    chance = PointingGame(tolerance=2.0)(maps=random_maps, masks=held_out.masks).mean().item()
    assert accuracy >= 0.9
    assert hits.mean().item() >= 0.8 > chance + 0.5


def test_cli_explains_an_image_with_a_keras_model(tmp_path, shipped, held_out):
    from typer.testing import CliRunner

    from lumos.cli import app

    img = tmp_path / "shape.png"
    Image.fromarray((held_out.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(img)
    with resources.as_file(SHIPPED) as path:
        run = CliRunner().invoke(app, ["explain", str(img), "--model", str(path), "--method", "gradcam",
                                       "--out", str(tmp_path / "out")])
        layers = CliRunner().invoke(app, ["layers", "--model", str(path)])
    assert run.exit_code == 0, run.output
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert pngs and Image.open(pngs[0]).size == (64, 64)
    ex = lumos.explain(shipped.model, shipped.preprocess(Image.open(img)), method="gradcam")  # what the CLI drew
    assert ex.targets.tolist() == [int(held_out.labels[0])]  # the predicted class is the true one
    assert PointingGame(tolerance=2.0)(maps=ex.maps, masks=held_out.masks[:1]).item() == 1.0
    assert layers.exit_code == 0, layers.output
    assert "conv4" in layers.output and "BatchNormalization" in layers.output
    assert "64x16x16" in layers.output and "<- auto" in layers.output


def test_a_bare_keras_model_is_refused_with_the_way_to_wrap_it():
    """Keras 3 models are torch modules on this backend but take channels-last input: refused in one line."""
    from lumos.evaluate import Deletion

    raw = build_small()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(LumosError, match="is a Keras model: wrap it as lumos.zoo.keras_model.KerasModule"):
        lumos.explain(raw, x, "gradcam")
    with pytest.raises(LumosError, match="KerasModule"):
        Deletion(steps=2)(raw, x, torch.rand(1, 32, 32))
    assert lumos.explain(KerasModule(raw), x, "gradcam").maps.shape == (1, 32, 32)  # wrapped, it runs
