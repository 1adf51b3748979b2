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

    After every ``logger.every_n_steps``-th batch and at the end of every ``logger.every_n_epochs``-th epoch.
    Steps count on across ``fit`` calls, as a resumed training expects: the step is the number of batches
    trained so far with this callback, raised at the start of a ``fit`` to ``initial_epoch`` x batches per epoch
    when that is more (training resumed from a checkpoint); the epoch is Keras' epoch index (which starts at
    ``initial_epoch``), or the number of epochs trained so far with this callback when that is more (a second
    ``fit`` without ``initial_epoch`` goes on from where the first stopped). At an epoch end the step is the
    epoch, or the batch count when the logger also logs every N steps (so one tag never mixes two x-axes; a step
    already logged is not logged again). For a fresh count, make a new callback.

    The end of a ``fit`` removes lumos' hooks from the Keras layers and flushes the sinks, but leaves them open,
    so another ``fit`` with this callback logs into the same TensorBoard folder, W&B and MLflow runs. With
    ``close=True`` (the default) the sinks are closed when the interpreter exits, or earlier by
    ``logger.close()``; with ``close=False`` closing is left to you.
    """

    def __init__(self, logger: ExplanationLogger, close: bool = True) -> None:
        super().__init__()
        self.logger = logger
        self.close = close
        self.global_step = 0  # batches trained with this callback (raised to initial_epoch x batches per epoch)
        self.epochs_done = 0  # epochs trained with this callback (or up to initial_epoch)
        self._epoch = 0  # the current epoch, counted on across fits
        self._fit_started = False
        self._last: int | None = None  # the batch count last logged
        if close:
            logger.close_at_exit()

    def on_train_begin(self, logs: Any = None) -> None:
        self._fit_started = True

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = max(int(epoch), self.epochs_done)
        if self._fit_started:  # the first epoch of this fit: initial_epoch (Keras' epoch) says where it resumes
            self._fit_started = False
            steps = (self.params or {}).get("steps")
            if steps:
                self.global_step = max(self.global_step, self._epoch * int(steps))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.global_step += 1
        if self.logger.every_n_steps and self.logger.due_step(self.global_step):
            self._last = self.global_step
            self.logger.log(self.model, self.global_step)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        epoch = self._epoch
        self.epochs_done = epoch + 1
        if not self.logger.due_epoch(epoch):
            return
        if not self.logger.every_n_steps:
            self.logger.log(self.model, epoch)
        elif self._last != self.global_step:
            self._last = self.global_step
            self.logger.log(self.model, self.global_step)

    def on_train_end(self, logs: Any = None) -> None:
        self.logger.remove_hooks()  # the user's model trains and predicts without them between fits
        self.logger.flush()
