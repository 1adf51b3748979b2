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
