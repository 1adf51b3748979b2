"""LumosCallback in a short Lightning fit; TensorBoard files read back with TensorBoard's reader."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from lumos.synthetic import TinyCNN, make_dataset  # noqa: E402
from lumos.track import ExplanationLogger, MemorySink, TensorBoardSink  # noqa: E402
from lumos.track.lightning import LumosCallback  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(callback: LumosCallback, data, epochs: int = 2) -> Module:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=8)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    module = Module()
    trainer.fit(module, loader)
    return module


def test_lightning_epochs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_dataset(16, size=32, seed=5)
    logger = ExplanationLogger(data.images[:2], data.labels[:2], methods=["gradcam", "features"],
                               layer="net.features.block4", sinks=[TensorBoardSink(tmp_path)], every_n_epochs=1)
    fit(LumosCallback(logger), data)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["images"])
    assert tags == ["lumos/features/00", "lumos/features/01", "lumos/gradcam/00", "lumos/gradcam/01"]
    assert all([e.step for e in acc.Images(t)] == [0, 1] for t in tags)


def test_lightning_every_n_steps_uses_global_step():
    data = make_dataset(16, size=32, seed=5)
    sink = MemorySink()
    logger = ExplanationLogger(data.images[:2], data.labels[:2], layer="net.features.block4", sinks=[sink],
                               every_n_epochs=None, every_n_steps=2)
    fit(LumosCallback(logger), data)  # 2 batches x 2 epochs = global steps 1..4
    assert [s for s, _, _ in sink.images["lumos/gradcam/00"]] == [2, 4]


def _fit_steps(logger: ExplanationLogger, sink: MemorySink, epochs: int = 2, **trainer_kw) -> list[int]:
    data = make_dataset(32, size=32, seed=5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=4)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[LumosCallback(logger)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, **trainer_kw)
    trainer.fit(Module(), loader)
    return [s for s, _, _ in sink.images["lumos/gradcam/00"]]


def test_gradient_accumulation_logs_once_per_optimiser_step():
    data = make_dataset(2, size=32, seed=5)
    sink = MemorySink()
    logger = ExplanationLogger(data.images, data.labels, layer="net.features.block4", sinks=[sink],
                               every_n_epochs=None, every_n_steps=1)
    # 8 batches x 2 epochs, 4 micro-batches per optimiser step: global steps 1..4, never 0 (no step taken yet)
    assert _fit_steps(logger, sink, accumulate_grad_batches=4) == [1, 2, 3, 4]


def test_epoch_and_step_logging_share_one_axis():
    data = make_dataset(2, size=32, seed=5)
    sink = MemorySink()
    logger = ExplanationLogger(data.images, data.labels, layer="net.features.block4", sinks=[sink],
                               every_n_epochs=1, every_n_steps=4)
    steps = _fit_steps(logger, sink)  # 8 optimiser steps per epoch: epoch ends fall on logged steps 8 and 16
    assert steps == sorted(set(steps)) == [4, 8, 12, 16]
    with pytest.raises(ValueError, match="one axis"):
        LumosCallback(logger, step="epoch")


def _trainer(callback: LumosCallback, epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kw)


def _loader(data) -> torch.utils.data.DataLoader:  # 16 images, batch 8: 2 optimiser steps per epoch
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=8)


def _steps(sink: MemorySink, tag: str = "lumos/gradcam/00") -> list[int]:
    return [s for s, _, _ in sink.images[tag]]


def test_lightning_a_second_fit_logs_into_the_same_open_runs(tmp_path, monkeypatch):
    """The end of fit used to close the sinks: a second fit (a new Trainer with the same callback) then logged
    into a finished W&B run (W&B refuses: trainer.fit failed) and started the epoch axis at 0 again. Now the
    sinks stay open until logger.close() (or interpreter exit) and the steps go on."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lumos.track import WandbSink
    from test_track_sinks import wandb_history

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    data = make_dataset(16, size=32, seed=5)
    wandb_sink = WandbSink(project="lumos-test", dir=tmp_path)
    run_dir = Path(wandb_sink.run.dir).parent
    logger = ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                               sinks=[wandb_sink, TensorBoardSink(tmp_path / "tb")])
    cb = LumosCallback(logger)
    module = Module()
    _trainer(cb, 2).fit(module, _loader(data))
    _trainer(cb, 1).fit(module, _loader(data))  # a new Trainer starts at epoch 0: logged as epoch 2
    logger.close()
    assert [r["_step"] for r in wandb_history(run_dir) if "lumos/gradcam/00" in r] == [0, 1, 2]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("lumos/gradcam/00")] == [0, 1, 2]


def test_lightning_steps_never_go_back_across_trainers_and_checkpoints(tmp_path):
    """A new Trainer with the same callback used to log from step 0 again (over the pictures already logged; W&B
    drops such rows). Its steps now go on; Lightning's own continuation (the same Trainer, or a checkpoint) is
    kept, and the checkpoint carries the callback's count, so a resumed training goes on even with a new one."""
    data = make_dataset(16, size=32, seed=5)
    sink = MemorySink()
    cb = LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                         sinks=[sink], every_n_epochs=None, every_n_steps=1), close=False)
    module = Module()
    first = _trainer(cb, 1)
    first.fit(module, _loader(data))  # global steps 1, 2
    first.fit_loop.max_epochs = 2
    first.fit(module, _loader(data))  # the same Trainer goes on by itself: 3, 4
    second = _trainer(cb, 1)
    second.fit(module, _loader(data))  # a new Trainer counts 1, 2 again: logged as 5, 6
    assert _steps(sink) == [1, 2, 3, 4, 5, 6]
    second.save_checkpoint(tmp_path / "last.ckpt")  # its global step is 2; the callback's axis is at 6
    resumed = MemorySink()  # a new process: a new callback, training resumed from the checkpoint
    cb = LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                         sinks=[resumed], every_n_epochs=None, every_n_steps=1), close=False)
    _trainer(cb, 2).fit(Module(), _loader(data), ckpt_path=tmp_path / "last.ckpt")
    assert _steps(resumed) == [7, 8]
    # the epoch axis alike
    by_epoch = MemorySink()
    cb = LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                         sinks=[by_epoch]), close=False)
    _trainer(cb, 2).fit(module, _loader(data))
    _trainer(cb, 1).fit(module, _loader(data))
    assert _steps(by_epoch) == [0, 1, 2]


def test_lightning_resumed_accumulation_waits_for_its_first_optimiser_step(tmp_path):
    """Resumed at global step 2 with gradient accumulation, the first micro-batches (no optimiser step yet) used
    to log step 2 again: the checkpoint's model, already logged before it was saved."""
    data = make_dataset(16, size=32, seed=5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=4)
    first = _trainer(LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                                     sinks=[MemorySink()], every_n_epochs=None, every_n_steps=1)),
                     1, accumulate_grad_batches=2)
    first.fit(Module(), loader)  # 4 batches, 2 optimiser steps
    first.save_checkpoint(tmp_path / "last.ckpt")
    sink = MemorySink()
    cb = LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                         sinks=[sink], every_n_epochs=None, every_n_steps=1), close=False)
    _trainer(cb, 2, accumulate_grad_batches=2).fit(Module(), loader, ckpt_path=tmp_path / "last.ckpt")
    assert _steps(sink) == [3, 4]


def test_lightning_callback_closes_the_logger_at_exit_unless_closed_before(monkeypatch):
    import atexit

    registered: list = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: registered.append(f) or f)
    monkeypatch.setattr(atexit, "unregister", lambda f: registered.remove(f))
    data = make_dataset(16, size=32, seed=5)
    sink = MemorySink()
    logger = ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4", sinks=[sink])
    closed: list[int] = []
    monkeypatch.setattr(sink, "close", lambda: closed.append(1))
    cb = LumosCallback(logger)
    assert registered == [logger.close]
    _trainer(cb, 1).fit(Module(), _loader(data))
    assert closed == []  # the end of fit leaves the sinks open
    logger.close()
    assert registered == [] and closed == [1]
    LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                    sinks=[MemorySink()]), close=False)
    assert registered == []


@pytest.mark.parametrize("how", ["configure_callbacks", "append"])
def test_two_callbacks_with_one_prefix_stop_fit_at_the_start(how):
    """Lightning refuses two callbacks with one state_key only in Trainer(callbacks=[...]); added through
    configure_callbacks or trainer.callbacks, both used to log under the same tags and the checkpoint kept one
    count. Now fit stops at the start with one line naming the prefix."""
    from lumos.errors import LumosError

    data = make_dataset(16, size=32, seed=5)
    sinks = [MemorySink(), MemorySink()]
    loggers = [ExplanationLogger(data.images[:2], data.labels[:2], layer="net.features.block4", sinks=[s])
               for s in sinks]
    callbacks = [LumosCallback(lg) for lg in loggers]

    class Configured(Module):
        def configure_callbacks(self):
            return callbacks if how == "configure_callbacks" else []

    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks[:1] if how == "append" else [], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    if how == "append":
        trainer.callbacks.append(callbacks[1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=8)
    with pytest.raises(LumosError, match=r"Two LumosCallbacks log with prefix='lumos': .* give each "
                                         r"ExplanationLogger its own prefix=") as err:
        trainer.fit(Configured(), loader)
    assert "\n" not in str(err.value)
    assert sinks[0].images == sinks[1].images == {}


def test_two_callbacks_with_their_own_prefixes_log_and_checkpoint_apart(tmp_path):
    data = make_dataset(16, size=32, seed=5)
    sink = MemorySink()  # one sink for both, as with Lightning's own TensorBoard writer
    callbacks = [LumosCallback(ExplanationLogger(data.images[:1], data.labels[:1], layer="net.features.block4",
                                                 sinks=[sink], prefix=p, every_n_epochs=k))
                 for p, k in (("every", 1), ("second", 2))]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Module(), loader)
    assert {t: [s for s, _, _ in v] for t, v in sink.images.items()} == {"every/gradcam/00": [0, 1],
                                                                        "second/gradcam/00": [1]}
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"]
    assert sorted(k for k in saved if k.startswith("LumosCallback")) == [
        "LumosCallback{'prefix': 'every'}", "LumosCallback{'prefix': 'second'}"]
