"""Keras 3 integration (torch backend): ``LumosKerasCallback(logger)``.

Set ``KERAS_BACKEND=torch`` before Keras is first imported. Layers are named as in ``model.summary()``
(found with ``model.get_layer``); channels-last activations are presented channels-first to lumos.
"""

from __future__ import annotations

from typing import Any

from lumos.errors import LumosError
from lumos.track.logger import ExplanationLogger
from lumos.track.sinks import require

keras = require("keras", "keras")
if keras.backend.backend() != "torch":
    raise LumosError(
        f"lumos explains Keras models on the torch backend; this Keras runs on '{keras.backend.backend()}'. "
        "Set KERAS_BACKEND=torch before importing keras."
    )


class LumosKerasCallback(keras.callbacks.Callback):
    """Log explanations with an :class:`ExplanationLogger` during ``model.fit``.

    After every ``logger.every_n_steps``-th batch (step = the number of batches trained so far) and at the
    end of every ``logger.every_n_epochs``-th epoch: step = the epoch index, or the number of batches when
    the logger also logs every N steps (so one tag never mixes two x-axes; a step already logged is not
    logged again).
    """

    def __init__(self, logger: ExplanationLogger, close: bool = True) -> None:
        super().__init__()
        self.logger = logger
        self.close = close
        self.global_step = 0
        self._last: int | None = None  # the batch count last logged

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.global_step += 1
        if self.logger.every_n_steps and self.logger.due_step(self.global_step):
            self._last = self.global_step
            self.logger.log(self.model, self.global_step)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.logger.due_epoch(epoch):
            return
        if not self.logger.every_n_steps:
            self.logger.log(self.model, epoch)
        elif self._last != self.global_step:
            self._last = self.global_step
            self.logger.log(self.model, self.global_step)

    def on_train_end(self, logs: Any = None) -> None:
        if self.close:
            self.logger.close()
