"""PyTorch Lightning integration: ``LumosCallback(logger)``."""

from __future__ import annotations

from typing import Any

from lumos.track.logger import ExplanationLogger
from lumos.track.sinks import require

require("lightning", "lightning")
from lightning.pytorch import Callback  # noqa: E402


class LumosCallback(Callback):
    """Log explanations with an :class:`ExplanationLogger` during ``Trainer.fit``.

    At the end of every ``logger.every_n_epochs``-th training epoch (step = ``trainer.current_epoch``
    unless ``step="global_step"``) and after every ``logger.every_n_steps``-th optimiser step
    (step = ``trainer.global_step``). Only the global-rank-zero process logs. Sinks are closed at the
    end of fitting when ``close=True``.
    """

    def __init__(self, logger: ExplanationLogger, step: str = "epoch", close: bool = True) -> None:
        if step not in ("epoch", "global_step"):
            raise ValueError(f"step must be 'epoch' or 'global_step', not {step!r}")
        self.logger = logger
        self.step = step
        self.close = close

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.logger.due_epoch(trainer.current_epoch):
            step = trainer.current_epoch if self.step == "epoch" else trainer.global_step
            self.logger.log(pl_module, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero and self.logger.every_n_steps and self.logger.due_step(trainer.global_step):
            self.logger.log(pl_module, trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.close:
            self.logger.close()
