"""Keras models as tf-keras-vis / tf-explain users have them: layouts, grayscale inputs, nested models, the tracker."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

import lumos  # noqa: E402
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
