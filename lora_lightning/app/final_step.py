"""A run's final step: validated, and resumable from where it stopped.

Owns :class:`FinalStep`. Two things Lightning leaves undone when training stops between two
validations or in the middle of an epoch (``trainer.max_steps`` below one epoch, or not a
multiple of ``val_check_interval``):

- it validates on its schedule only, so such a run ended with no validation of the model it
  exports: no monitored metric (Lightning's "could not find the monitored key" warning), no best
  checkpoint, no ``val/*`` in the final block and ``results.json``, a sweep comparing nothing;
- its checkpoints from the end of such a run count the cut-short epoch as finished, so
  "train a bit longer" (a larger ``trainer.max_steps`` with ``resume=auto``) started the next
  epoch: it skipped the rest of this one, trained nothing at all within ``max_epochs=1``, and
  skipped batches of the next one as well (the resumable loader's position is this epoch's).

Must not import W&B, Hydra or the default task.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl


class FinalStep(pl.Callback):
    """Validates the run's last training step, and makes the checkpoints written after an epoch
    cut short by ``max_steps`` resume inside that epoch.

    **Validation.** On the last step (``trainer.max_steps`` reached, or the last batch of the last epoch) it sets
    ``trainer.should_stop``: Lightning then validates at this step, as it does when early
    stopping asks to stop, inside ``fit``. So everything that listens to a validation sees this
    one too: ``ModelCheckpoint`` records the monitored metric and keeps the best and ``last``
    checkpoints at the final step (with the loop state a ``resume=auto`` continues from), the
    loggers get ``val/*``, and the adapter export and the test run come after it. A step the
    schedule validates anyway is validated once. Nothing changes where Lightning validates
    nothing (no validation data, ``limit_val_batches=0``, an epoch that
    ``check_val_every_n_epoch`` skips) or when training stops for another reason first (early
    stopping, ``max_time``: Lightning validates then already; SIGTERM: the job checkpoints and
    stops without validating).

    **Resume.** A checkpoint written once the fit loop has closed an epoch that stopped before
    its last batch (``ModelCheckpoint`` at the epoch's end, the app's final ``last.ckpt``) gets
    the loop state of that epoch's middle, as a checkpoint written at that step by SIGTERM has:
    a resumed run continues with the epoch's next batch. Checkpoints written inside an epoch are
    left as Lightning writes them.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if is_final_step(trainer, batch_idx):
            trainer.should_stop = True

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not closed_an_unfinished_epoch(trainer):
            return
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        for progress in epochs.values():  # "total" and "current" counters
            # Started but not processed: how Lightning recognises a restart mid-epoch.
            progress["processed"] = progress["completed"] = progress["started"] - 1


def closed_an_unfinished_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop has counted its current epoch as processed although fewer batches
    than the epoch holds were trained (it stopped on ``max_steps`` or ``should_stop``). False
    for data of unknown length, whose epochs end when the data does."""
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.current
    trained = loop.epoch_loop.batch_progress.current.completed
    closed = epochs.started > 0 and epochs.processed == epochs.started
    batches = trainer.num_training_batches
    return closed and math.isfinite(batches) and trained < batches


def is_final_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the training batch ``batch_idx`` that just ended is the run's last one.

    ``trainer.global_step`` counts optimizer steps (with gradient accumulation it reaches
    ``max_steps`` on the batch that completes the last step); an epoch's length is
    ``trainer.num_training_batches`` (``limit_train_batches`` applied; infinite for an iterable
    dataset without a length, which only ``max_steps`` ends).
    """
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs in (None, -1) or trainer.current_epoch + 1 < max_epochs:
        return False
    batches = trainer.num_training_batches
    return math.isfinite(batches) and batch_idx + 1 >= batches
