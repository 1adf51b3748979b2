"""PyTorch Lightning integration: ``LumosCallback(logger)``."""

from __future__ import annotations

from typing import Any

from lumos.errors import LumosError
from lumos.track.logger import ExplanationLogger
from lumos.track.sinks import require

require("lightning", "lightning")
from lightning.pytorch import Callback  # noqa: E402

AXES = ("global_step", "epoch")


class LumosCallback(Callback):
    """Log explanations with an :class:`ExplanationLogger` during ``Trainer.fit``.

    After every ``logger.every_n_steps``-th optimiser step (once per optimiser step, also with gradient
    accumulation) and at the end of every ``logger.every_n_epochs``-th training epoch. The epoch-end step is the
    epoch (``step="epoch"``) or the global step (``step="global_step"``); the default (``None``) is the global
    step when the logger also logs every N steps, so one tag never mixes two x-axes. A step already logged is not
    logged again. Only the global-rank-zero process logs. Two callbacks in one ``Trainer`` need loggers with different
    ``prefix=`` (their tags and checkpoint state are named by it): the same prefix stops ``fit`` at the start.

    Steps never go back, as the sinks (one TensorBoard folder, one W&B run) are shared by every ``fit`` with this
    callback: the step is ``trainer.global_step`` (the epoch ``trainer.current_epoch``) plus an offset, 0 unless
    the trainer starts counting below what this callback has already seen: a new ``Trainer`` starts at 0 and
    goes on from the last step. Lightning's own continuation is kept as it is: another ``fit`` of the same
    ``Trainer``, or one resumed with ``ckpt_path`` (the checkpoint also holds this callback's count, so a new
    callback resumed from it goes on too). For a fresh count, make a new callback.

    The end of a ``fit`` flushes the sinks but leaves them open, so another ``fit`` logs into the same runs. With
    ``close=True`` (the default) they are closed when the interpreter exits, or earlier by ``logger.close()``;
    with ``close=False`` closing is left to you.
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
        self.done = dict.fromkeys(AXES, 0)  # optimiser steps / epochs trained with this callback, on its axes
        self._offset = dict.fromkeys(AXES, 0)  # added to the trainer's counts in this fit
        self._start = 0  # trainer.global_step when this fit's training started
        self._last: tuple[str, int] | None = None  # (axis, step) last logged
        if close:
            logger.close_at_exit()

    # -- the count, kept in checkpoints -------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.logger.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"done": dict(self.done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for axis, value in state_dict.get("done", {}).items():
            if axis in self.done:
                self.done[axis] = max(self.done[axis], int(value))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Trainer(callbacks=[...]) refuses two of them itself (RuntimeError: state_key must be unique); callbacks
        # from configure_callbacks or trainer.callbacks.append are not checked by Lightning
        prefix = self.logger.prefix
        if any(isinstance(cb, LumosCallback) and cb is not self and cb.logger.prefix == prefix
               for cb in trainer.callbacks):
            raise LumosError(f"Two LumosCallbacks log with prefix={prefix!r}: they would write the same tags and "
                             "share one checkpoint state; give each ExplanationLogger its own prefix= (e.g. "
                             "prefix='lumos_val').")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # the trainer's counts here are after a checkpoint was restored; below this callback's: shift them up
        self._start = trainer.global_step
        now = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        self._offset = {axis: max(0, self.done[axis] - now[axis]) for axis in AXES}

    # -- logging -------------------------------------------------------------------------------------
    def _log(self, pl_module: Any, axis: str, step: int) -> None:
        if self._last == (axis, step):
            return
        self._last = (axis, step)
        self.logger.log(pl_module, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step + self._offset["global_step"]  # unchanged over an accumulated step's batches
        self.done["global_step"] = max(self.done["global_step"], step)
        if (trainer.is_global_zero and trainer.global_step > self._start and self.logger.every_n_steps
                and self.logger.due_step(step)):  # not before this fit's first optimiser step
            self._log(pl_module, "global_step", step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + self._offset["epoch"]
        self.done["epoch"] = max(self.done["epoch"], epoch + 1)
        if trainer.is_global_zero and self.logger.due_epoch(epoch):
            step = epoch if self.step == "epoch" else trainer.global_step + self._offset["global_step"]
            self._log(pl_module, self.step, step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.logger.remove_hooks()
        self.logger.flush()
