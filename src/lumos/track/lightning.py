"""PyTorch Lightning integration: ``LumosCallback(logger)``."""

from __future__ import annotations

from typing import Any

from lumos.errors import LumosError
from lumos.track.logger import ExplanationLogger
from lumos.track.sinks import require

require("lightning", "lightning")
from lightning.pytorch import Callback  # noqa: E402


class LumosCallback(Callback):
    """Log explanations with an :class:`ExplanationLogger` during ``Trainer.fit``.

    After every ``logger.every_n_steps``-th optimiser step (step = ``trainer.global_step``; once per
    optimiser step, also with gradient accumulation) and at the end of every ``logger.every_n_epochs``-th
    training epoch. The epoch-end step is ``trainer.current_epoch`` (``step="epoch"``) or
    ``trainer.global_step`` (``step="global_step"``); the default (``None``) is the global step when the
    logger also logs every N steps, so one tag never mixes two x-axes. A step already logged is not logged
    again. Only the global-rank-zero process logs. Sinks are closed at the end of fitting when ``close=True``.
    """

    def __init__(self, logger: ExplanationLogger, step: str | None = None, close: bool = True) -> None:
        if step not in (None, "epoch", "global_step"):
            raise LumosError(f"step must be 'epoch' or 'global_step', not {step!r}.")
        if step == "epoch" and logger.every_n_steps:
            raise LumosError("step='epoch' with every_n_steps would put epoch numbers and optimiser steps on one "
                             "axis; use step='global_step' (the default when every_n_steps is set).")
        self.logger = logger
        self.step = step or ("global_step" if logger.every_n_steps else "epoch")
        self.close = close
        self._last: tuple[str, int] | None = None  # (axis, step) last logged

    def _log(self, pl_module: Any, axis: str, step: int) -> None:
        if self._last == (axis, step):
            return
        self._last = (axis, step)
        self.logger.log(pl_module, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.logger.due_epoch(trainer.current_epoch):
            step = trainer.current_epoch if self.step == "epoch" else trainer.global_step
            self._log(pl_module, self.step, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # unchanged over the micro-batches of an accumulated step
        if trainer.is_global_zero and step > 0 and self.logger.every_n_steps and self.logger.due_step(step):
            self._log(pl_module, "global_step", step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.close:
            self.logger.close()
