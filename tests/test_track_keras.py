"""LumosKerasCallback with a Keras 3 functional model on the torch backend."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

from lumos.errors import LumosError  # noqa: E402
from lumos.synthetic import make_dataset  # noqa: E402
from lumos.track import ExplanationLogger, MemorySink, TensorBoardSink  # noqa: E402
from lumos.track.keras import LumosKerasCallback  # noqa: E402


def build(num_classes: int = 4) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(num_classes, name="fc")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def data():
    d = make_dataset(16, size=32, seed=6)
    return d.images.permute(0, 2, 3, 1).numpy(), d.labels.numpy(), d.class_names


def test_keras_fit_to_tensorboard(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, names = data
    model = build()
    logger = ExplanationLogger(x[:2], y[:2], methods=["gradcam", "features"], layer="conv2", feature_layer="conv1",
                               class_names=names, sinks=[TensorBoardSink(tmp_path)])
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[LumosKerasCallback(logger)])
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["images"])
    assert tags == ["lumos/features/00", "lumos/features/01", "lumos/gradcam/00", "lumos/gradcam/01"]
    assert all([e.step for e in acc.Images(t)] == [0, 1] for t in tags)
    assert not model.get_layer("conv2")._forward_hooks  # hooks removed at the end of training


def test_keras_channels_last_maps_match_a_direct_gradcam(data):
    import lumos

    x, y, _ = data
    model = build()
    sink = MemorySink()
    logger = ExplanationLogger(x[:3], y[:3], layer="auto", target="true", sinks=[sink])
    net, layer, _ = logger._adapt(model)
    assert layer == "taps.conv2"  # auto: the last 4-D Keras layer
    ex = lumos.explain(net, torch.as_tensor(x[:3]).permute(0, 3, 1, 2), target=[int(v) for v in y[:3]], layer=layer,
                       relu=False, normalize=None, upsample="nearest")
    # reference Grad-CAM by hand, channels-last, through a Keras sub-model
    sub = keras.Model(model.inputs, [model.get_layer("conv2").output, model.output])
    xt = torch.as_tensor(x[:3])
    acts, out = sub(xt, training=False)
    score = out.gather(1, torch.as_tensor(y[:3]).long()[:, None]).sum()
    (g,) = torch.autograd.grad(score, acts)
    ref = (g.mean((1, 2))[:, None, None, :] * acts).sum(-1).detach()
    assert torch.allclose(ex.raw, ref, atol=1e-5)
    assert ex.raw.shape == (3, 32, 32)
    logger.close()


def test_keras_logging_does_not_change_training(data):
    x, y, _ = data
    plain, watched = build(), build()
    watched.set_weights(plain.get_weights())
    keras.utils.set_random_seed(1)
    plain.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=True)
    logger = ExplanationLogger(x[:2], y[:2], layer="conv2", sinks=[MemorySink()], every_n_steps=1)
    keras.utils.set_random_seed(1)
    watched.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=True, callbacks=[LumosKerasCallback(logger)])
    # batches 1, 2; the epoch end falls on batch 2, already logged
    assert [s for s, _, _ in logger.sinks[0].images["lumos/gradcam/00"]] == [1, 2]
    for a, b in zip(plain.get_weights(), watched.get_weights(), strict=True):  # incl. BN moving stats
        np.testing.assert_array_equal(a, b)


def test_keras_epoch_and_step_logging_share_one_axis(data):
    x, y, _ = data
    sink = MemorySink()
    logger = ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[sink], every_n_epochs=1, every_n_steps=3)
    build().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[LumosKerasCallback(logger)])
    # 2 batches per epoch: steps 3 (batches), 2 and 4 (epoch ends, as batch counts, not epochs 0 and 1)
    assert [s for s, _, _ in sink.images["lumos/gradcam/00"]] == [2, 3, 4]


def _steps(sink: MemorySink, tag: str = "lumos/gradcam/00") -> list[int]:
    return [s for s, _, _ in sink.images[tag]]


def test_keras_steps_go_on_across_fits_and_from_initial_epoch(data):
    """A resumed fit (initial_epoch) used to count batches from 1 again, and a second fit logged epochs from 0
    again: both overwrote the pictures already logged at those steps."""
    x, y, _ = data  # 16 images, batch 8: 2 batches per epoch
    model = build()
    sink = MemorySink()
    cb = LumosKerasCallback(ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[sink], every_n_steps=1), close=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])  # goes on where the first fit stopped
    assert _steps(sink) == [1, 2, 3, 4]
    resumed = MemorySink()  # a new callback, training resumed at epoch 3: 3 x 2 batches already trained
    cb = LumosKerasCallback(ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[resumed], every_n_steps=1))
    model.fit(x, y, epochs=4, initial_epoch=3, batch_size=8, verbose=0, callbacks=[cb])
    assert _steps(resumed) == [7, 8]
    # epochs alone: Keras' epoch index, counted on across fits too
    by_epoch = MemorySink()
    cb = LumosKerasCallback(ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[by_epoch]), close=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=6, initial_epoch=5, batch_size=8, verbose=0, callbacks=[cb])
    assert _steps(by_epoch) == [0, 1, 2, 5]


def test_keras_a_second_fit_logs_into_the_same_open_runs(tmp_path, data, monkeypatch):
    """The end of fit used to close the sinks: a second fit then logged into a finished W&B run (W&B refuses:
    model.fit failed). Now the sinks stay open until logger.close() (or interpreter exit); hooks still go."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lumos.track import WandbSink
    from test_track_sinks import wandb_history

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    x, y, _ = data
    model = build()
    wandb_sink = WandbSink(project="lumos-test", dir=tmp_path)
    run_dir = Path(wandb_sink.run.dir).parent
    logger = ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[wandb_sink, TensorBoardSink(tmp_path / "tb")])
    cb = LumosKerasCallback(logger)
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
        assert not model.get_layer("conv2")._forward_hooks  # removed at the end of each fit
    logger.close()
    assert [r["_step"] for r in wandb_history(run_dir) if "lumos/gradcam/00" in r] == [0, 1]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("lumos/gradcam/00")] == [0, 1]


def test_keras_callback_closes_the_logger_at_exit_unless_closed_before(data, monkeypatch):
    import atexit

    registered: list = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: registered.append(f) or f)
    monkeypatch.setattr(atexit, "unregister", lambda f: registered.remove(f))
    x, y, _ = data
    logger = ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[MemorySink()])
    LumosKerasCallback(logger)
    assert registered == [logger.close]
    logger.close()
    assert registered == []
    LumosKerasCallback(ExplanationLogger(x[:1], y[:1], layer="conv2", sinks=[MemorySink()]), close=False)
    assert registered == []


def test_keras_two_outputs_with_output_index(data):
    """A Keras model with two outputs ([aux, logits]) logs with output=1 exactly what the same layers with the logits
    alone log; without output= it is one line naming output=."""
    x, y, _ = data
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    logits = keras.layers.Dense(4, name="fc")(h)
    aux = keras.layers.Dense(4, name="aux")(h)
    two, one = keras.Model(inp, [aux, logits]), keras.Model(inp, logits)  # the same layers and weights
    xt = torch.as_tensor(x[:3])
    assert not torch.equal(two(xt)[0].argmax(1), one(xt).argmax(1))  # the aux head would give other captions
    got, ref = MemorySink(), MemorySink()
    tags = ExplanationLogger(x[:3], y[:3], layer="conv1", sinks=[got], output=1, metrics=["deletion"],
                             deletion_steps=4).log(two, 0)
    assert ExplanationLogger(x[:3], y[:3], layer="conv1", sinks=[ref], metrics=["deletion"],
                             deletion_steps=4).log(one, 0) == tags
    for tag in tags:
        (_, im, cap), = got.images[tag]
        (_, im_ref, cap_ref), = ref.images[tag]
        assert cap == cap_ref
        assert np.array_equal(np.asarray(im), np.asarray(im_ref))
    assert got.scalars == ref.scalars and got.scalars
    with pytest.raises(LumosError, match=r"returns a list of 2; give ExplanationLogger\(\.\.\., output=<index>\)"):
        ExplanationLogger(x[:3], y[:3], layer="conv1", sinks=[MemorySink()]).log(two, 0)
