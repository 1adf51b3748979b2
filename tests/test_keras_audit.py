"""Keras models as tf-keras-vis / tf-explain users have them: layouts, grayscale inputs, nested models, the tracker."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

import lumos  # noqa: E402
from lumos.errors import LumosError  # noqa: E402
from lumos.zoo.keras_model import KerasModule  # noqa: E402

L = keras.layers


def hand_gradcam(model, layer, x_keras: torch.Tensor, target: list[int], channel_axis: int = -1) -> torch.Tensor:
    """Grad-CAM by hand: the Keras layer's own output (a plain torch hook), torch.autograd, no lumos."""
    store = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    out = model(x_keras, training=False)
    handle.remove()
    acts = store["a"]
    (grads,) = torch.autograd.grad(out[torch.arange(len(target)), torch.tensor(target)].sum(), acts)
    spatial = (1, 2) if channel_axis == -1 else (2, 3)
    weights = grads.mean(spatial, keepdim=True)
    return (weights * acts).sum(channel_axis).detach()


def lumos_gradcam(net, x, layer, target):
    return lumos.explain(net, x, method="gradcam", layer=layer, target=target, relu=False, normalize=None,
                         upsample="nearest").raw


def channels_first_model(channels: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        L.Input((channels, 16, 16)),
        L.Conv2D(6, 3, padding="same", activation="relu", name="conv", data_format="channels_first"),
        L.GlobalAveragePooling2D(data_format="channels_first"),
        L.Dense(3, name="fc"),
    ])


@pytest.mark.parametrize("channels", [3, 4])
def test_channels_first_layers_are_read_from_the_layers_not_guessed_from_the_shape(channels):
    """Input((4, 16, 16)) with channels_first convs was taken for a 4 x 16 channels-last image: a 4 x 16 input size
    (the CLI ran it on 4 x 16 x 3 pictures: a silently wrong map) and a raw Keras error from Python."""
    model = channels_first_model(channels)
    net = KerasModule(model)
    assert not net.channels_last and net.input_size == (16, 16)
    x = torch.rand(2, channels, 16, 16)
    ref = hand_gradcam(model, model.get_layer("conv"), x, [0, 2], channel_axis=1)
    ours = lumos_gradcam(net, x, "conv", [0, 2])
    assert ref.shape == (2, 16, 16) and ref.abs().max() > 1e-6
    torch.testing.assert_close(ours, ref)


# ----------------------------------------------------------------------- the training-time tracker


def _fit_and_adapt(model, x, y, layer):
    """model.fit with a LumosKerasCallback (it must not raise), then the logger's own view of the model."""
    from lumos.track import ExplanationLogger, MemorySink
    from lumos.track.keras import LumosKerasCallback

    sink = MemorySink()
    logger = ExplanationLogger(x[:2], y[:2], layer=layer, target="true", sinks=[sink])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[LumosKerasCallback(logger, close=False)])
    assert sorted(sink.images) == ["lumos/gradcam/00", "lumos/gradcam/01"]
    logger.close()  # removes the hooks of the fit; the adapter below hooks the layers afresh
    net, name, _ = logger._adapt(model)
    return net, name


def test_the_tracker_feeds_a_channels_first_model_channels_first():
    """The Keras adapter always permuted to channels-last: model.fit stopped with a raw Keras shape error."""
    model = channels_first_model(3)
    x = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    y = np.arange(8) % 3
    net, name = _fit_and_adapt(model, x, y, "conv")
    xt = torch.as_tensor(x[:2])
    ref = hand_gradcam(model, model.get_layer("conv"), xt, [0, 1], channel_axis=1)
    torch.testing.assert_close(lumos_gradcam(net, xt, name, [0, 1]), ref)
    assert ref.abs().max() > 1e-6


def nested_model() -> tuple[keras.Model, keras.Model]:
    """A backbone named like keras.applications names theirs (a dot in it) used as a layer of another model."""
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3))
    feats = L.ReLU(name="out_relu")(L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", name="conv")(image)))
    backbone = keras.Model(image, feats, name="backbone_1.00_16")  # functional, like keras.applications
    inp = keras.Input((16, 16, 3))
    x = backbone(inp)
    out = L.Dense(3, name="fc")(L.Dropout(0.5)(L.GlobalAveragePooling2D()(x)))
    return keras.Model(inp, out), backbone


@pytest.mark.parametrize("layer", ["auto", "backbone_1.00_16.out_relu", "backbone_1_00_16.out_relu"])
def test_the_tracker_explains_a_nested_model_with_a_dotted_name(layer):
    """A nested keras.applications model ('mobilenetv2_1.00_224') stopped model.fit with torch's raw KeyError
    ('module name can't contain "."') at layer='auto'; its inner layers could not be named at all."""
    model, backbone = nested_model()
    x = np.random.default_rng(1).random((8, 16, 16, 3), dtype=np.float32)
    y = np.arange(8) % 3
    net, name = _fit_and_adapt(model, x, y, layer)
    xt = torch.as_tensor(x[:2])
    keras_layer = backbone if layer == "auto" else backbone.get_layer("out_relu")
    ref = hand_gradcam(model, keras_layer, xt, [0, 1])
    torch.testing.assert_close(lumos_gradcam(net, xt.permute(0, 3, 1, 2), name, [0, 1]), ref)
    assert ref.abs().max() > 1e-6


def test_the_tracker_names_a_missing_nested_layer_in_one_line():
    model, _ = nested_model()
    from lumos.track import ExplanationLogger, MemorySink

    logger = ExplanationLogger(np.zeros((1, 16, 16, 3), np.float32), [0], layer="out_relu", sinks=[MemorySink()])
    with pytest.raises(LumosError, match=r"no layer 'out_relu' \(a nested model's layer is 'outer.inner'\)") as info:
        logger.log(model, 0)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------- the input range


@pytest.mark.parametrize("before", ["augmentation", "resizing"])
def test_rescaling_after_augmentation_or_a_resizing_still_means_0_255(tmp_path, before):
    """Keras' own image-classification tutorial puts a RandomFlip/RandomRotation block before Rescaling(1/255) (others
    a Resizing): lumos looked at the first layer only, fed 0-1 pixels and the model saw a nearly black image."""
    keras.utils.set_random_seed(0)
    if before == "augmentation":
        inp = keras.Input((16, 16, 3))
        x = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.1)], name="augment")(inp)
    else:
        inp = keras.Input((32, 32, 3))
        x = L.Resizing(16, 16)(inp)
    x = L.Rescaling(1 / 255)(x)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="conv")(x)))
    keras.Model(inp, out).save(tmp_path / "m.keras")
    bundle = lumos.load_model(tmp_path / "m.keras")
    assert bundle.model.pixel_range == 255.0
    assert bundle.preprocess.std == pytest.approx((1 / 255,) * 3)


# ----------------------------------------------------------------------- grayscale (MNIST-style) models


def mnist_model(input_shape: tuple[int, ...]) -> keras.Model:
    """The usual MNIST model: Input((28, 28)) with a Reshape, or Input((28, 28, 1))."""
    keras.utils.set_random_seed(0)
    first = [L.Input(input_shape)]
    if len(input_shape) == 2:
        first.append(L.Reshape((*input_shape, 1)))
    return keras.Sequential([*first, L.Rescaling(1 / 255), L.Conv2D(4, 3, activation="relu", name="conv"),
                             L.MaxPooling2D(name="pool"), L.Flatten(), L.Dense(10, activation="softmax")])


@pytest.mark.parametrize("shape", [(12, 12), (12, 12, 1)])
def test_a_grayscale_model_is_explained_on_its_own_input_and_on_rgb(shape):
    """Input((28, 28)) models were refused outright; RGB input (what lumos.load_model's preprocessing and the CLI
    give) stopped a one-channel model with a raw multi-line Keras shape error."""
    model = mnist_model(shape)
    net = KerasModule(model)
    assert net.input_size == (12, 12) and net.channels == 1 and net.pixel_range == 255.0
    gray = torch.rand(2, 1, 12, 12) * 255
    x_keras = gray[:, 0] if len(shape) == 2 else gray.permute(0, 2, 3, 1)
    ref = hand_gradcam(model, model.get_layer("conv"), x_keras, [3, 7])
    assert ref.abs().max() > 1e-9
    torch.testing.assert_close(lumos_gradcam(net, gray, "conv", [3, 7]), ref)
    rgb = gray.expand(-1, 3, -1, -1)  # a gray picture as RGB: the model sees the same pixels
    torch.testing.assert_close(lumos_gradcam(net, rgb, "conv", [3, 7]), ref)
    assert lumos.explain(net, rgb, method="integrated_gradients", steps=4).maps.shape == (2, 12, 12)


def test_a_saved_grayscale_model_runs_from_the_cli(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lumos.cli import app

    mnist_model((12, 12)).save(tmp_path / "mnist.keras")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    run = CliRunner().invoke(app, ["explain", str(tmp_path / "d.png"), "--model", str(tmp_path / "mnist.keras"),
                                   "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert [p.name for p in (tmp_path / "out").rglob("*.png")] == ["d_gradcam.png"]


def test_other_channel_counts_and_unbuilt_models_are_one_line_errors():
    net = KerasModule(channels_first_model(4))
    with pytest.raises(LumosError, match=r"takes 4-channel images; got 3 channels") as info:
        net(torch.rand(1, 3, 16, 16))
    assert "\n" not in str(info.value)
    with pytest.raises(LumosError, match=r"is not built.*keras.Input"):
        KerasModule(keras.Sequential([L.Conv2D(2, 3), L.Flatten(), L.Dense(2)]))


@pytest.mark.parametrize(("adapt_scale", "expected"), [(255.0, 255.0), (1.0, 1.0)])
def test_a_normalization_adapted_to_0_255_pixels_gets_0_255(tmp_path, adapt_scale, expected):
    """Normalization().adapt(uint8 images) expects 0-255; lumos fed 0-1, so every image became about -2.2 std:
    a silently wrong prediction and map. Adapted to 0-1 images it stays 0-1."""
    keras.utils.set_random_seed(0)
    norm = L.Normalization()
    norm.adapt(np.random.default_rng(0).random((20, 16, 16, 3), dtype=np.float32) * adapt_scale)
    model = keras.Sequential([L.Input((16, 16, 3)), norm, L.Conv2D(4, 3, name="conv"), L.Flatten(), L.Dense(2)])
    model.save(tmp_path / "m.keras")
    bundle = lumos.load_model(tmp_path / "m.keras")
    assert bundle.model.pixel_range == expected
    assert bundle.preprocess.std == pytest.approx((1 / expected,) * 3)


def test_the_tracker_says_an_unbuilt_model_is_not_built():
    """layer='auto' on a Sequential never called said 'No Keras layer with a 4-D output found' (it has a Conv2D)."""
    from lumos.track import ExplanationLogger, MemorySink

    model = keras.Sequential([L.Conv2D(2, 3, name="conv"), L.Flatten(), L.Dense(2)])
    logger = ExplanationLogger(np.zeros((1, 8, 8, 3), np.float32), [0], sinks=[MemorySink()])
    with pytest.raises(LumosError, match=r"is not built.*keras.Input.*layer='<name>'"):
        logger.log(model, 0)


def test_the_cli_help_says_model_takes_a_keras_file():
    """docs/keras.md runs `lumos explain --model model.keras`, but --help offered zoo names and import paths only."""
    from typer.testing import CliRunner

    from lumos.cli import app

    run = CliRunner().invoke(app, ["explain", "--help"], env={"COLUMNS": "200"})
    assert run.exit_code == 0
    assert "Keras 3 .keras" in " ".join(run.output.split())


def test_a_torch_model_from_a_module_named_keras_something_is_a_torch_model():
    """is_keras_model matched any module name starting with 'keras': a torch net defined in keras_nets.py was sent
    to the Keras adapter and failed there (no Keras layers)."""
    from lumos.track import ExplanationLogger, MemorySink

    class Net(torch.nn.Module):
        __module__ = "keras_nets"  # as if defined in the user's keras_nets.py

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    sink = MemorySink()
    logger = ExplanationLogger(torch.rand(1, 3, 8, 8), [1], layer="conv", sinks=[sink])
    assert logger.log(Net(), 0) == ["lumos/gradcam/00"]


# ----------------------------------------------------------------------- subclassed keras.Model


class SubclassedNet(keras.Model):
    """The tf-explain way: layers as attributes, the graph in call()."""

    def __init__(self) -> None:
        super().__init__(name="subclassed")
        self.conv = L.Conv2D(4, 3, activation="relu", name="conv")
        self.gap = L.GlobalAveragePooling2D()
        self.fc = L.Dense(3, name="fc")

    def call(self, x, training=False):
        return self.fc(self.gap(self.conv(x)))


def test_a_subclassed_model_is_wrapped_and_its_gradcam_is_the_hand_computed_one():
    """A called subclassed model has no symbolic input: KerasModule refused it ('this one has inputs none')."""
    keras.utils.set_random_seed(0)
    model = SubclassedNet()
    model(torch.zeros(1, 16, 16, 3))
    net = KerasModule(model)
    assert net.channels_last and net.input_size is None
    x = torch.rand(2, 3, 16, 16)
    ref = hand_gradcam(model, model.conv, x.permute(0, 2, 3, 1), [0, 2])
    assert ref.abs().max() > 1e-6
    torch.testing.assert_close(lumos_gradcam(net, x, "conv", [0, 2]), ref)
    assert lumos.explain(net, x, "gradcam").layer == "conv"  # auto: lumos traces the forward itself


def test_the_tracker_asks_for_a_layer_name_on_a_subclassed_model():
    from lumos.track import ExplanationLogger, MemorySink

    keras.utils.set_random_seed(0)
    model = SubclassedNet()
    model(torch.zeros(1, 16, 16, 3))
    x = np.random.default_rng(3).random((2, 16, 16, 3), dtype=np.float32)
    with pytest.raises(LumosError, match=r"subclassed Keras model 'subclassed'.*pass layer='<name>'"):
        ExplanationLogger(x, [0, 1], sinks=[MemorySink()]).log(model, 0)
    assert ExplanationLogger(x, [0, 1], layer="conv", sinks=[MemorySink()]).log(model, 0) == [
        "lumos/gradcam/00", "lumos/gradcam/01"]
