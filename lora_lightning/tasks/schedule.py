"""The tasks' learning-rate schedule: linear warmup, then linear decay to zero at the end of
the run, whose length is read late.

The run's length is `trainer.estimated_stepping_batches`, and reading it in
`configure_optimizers` builds the train loader: a loader built before Lightning restores a
checkpoint's loop state keeps its position at the start of the epoch, so a resumed epoch would
start over. :class:`WarmupDecaySchedule` therefore builds the scheduler with a placeholder for
step 0 and reads the length when training starts (the loader exists then), or at the first
step after 0 if nobody told it training started. Both tasks (`TextClassifier`,
`CausalLMTask`) use it.
"""

from __future__ import annotations

import math
from typing import NoReturn

import torch
from lightning.pytorch import LightningModule
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): rises linearly to 1 by
    step `warmup_steps`, then falls linearly to 0 at `total_steps`.

    The same shape as transformers' `get_linear_schedule_with_warmup`.
    """
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class WarmupDecaySchedule:
    """:func:`linear_warmup_decay` over a Lightning run, warming up for `warmup_ratio` of its
    optimizer steps; the number of steps is read from `module.trainer` when training starts.

    Use: `scheduler = schedule.build(optimizer)` in `configure_optimizers` (stepped every
    batch), and `schedule.start()` in `on_train_start`.

    Args:
        module: the LightningModule whose trainer says how long the run is.
        warmup_ratio: fraction of the optimizer steps spent warming up, in [0, 1].
        owner: the task's name, to start error messages.
        error: the exception type raised for a run with no end (the task's own).

    Raises:
        error: (from :meth:`build` or when the length is read) the run has no finite number of
            steps: `max_epochs=-1` without `max_steps`, or an iterable train set without
            `max_steps`.
    """

    def __init__(
        self,
        module: LightningModule,
        warmup_ratio: float,
        owner: str,
        error: type[Exception] = ValueError,
    ) -> None:
        self.module = module
        self.warmup_ratio = warmup_ratio
        self.owner = owner
        self.error = error
        #: (warmup, total) optimizer steps once read; None before.
        self.steps: tuple[int, int] | None = None
        self._scheduler: LambdaLR | None = None

    def build(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """A `LambdaLR` on `optimizer` following this schedule (the length still unread)."""
        trainer = self.module.trainer
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            self._no_end()
        self.steps = None
        # A lambda, not this object: LambdaLR's state_dict (and so every checkpoint) would
        # hold a callable object's attributes, the module included; it skips functions.
        self._scheduler = LambdaLR(optimizer, lambda step: self.multiplier(step))
        return self._scheduler

    def multiplier(self, step: int) -> float:
        """The learning-rate factor at optimizer step `step`.

        Before the length is read, step 0 (LambdaLR's own first call, in `build`) gets a
        placeholder, 0 with warmup and 1 without, that :meth:`start` replaces; a later step
        reads the length first.
        """
        if self.steps is None:
            if step == 0:
                return 0.0 if self.warmup_ratio > 0 else 1.0
            self._read_length()
        warmup, total = self.steps
        return linear_warmup_decay(step, warmup, total)

    def start(self) -> None:
        """Read the run's length and set the learning rates of the scheduler's current step
        from it (for a resumed run: the ones Lightning restored, computed the same way)."""
        scheduler = self._scheduler
        if scheduler is None:  # configure_optimizers was replaced (e.g. by a subclass)
            return
        self._read_length()
        rates = [
            base * factor(scheduler.last_epoch)
            for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        # What get_last_lr() (LearningRateMonitor) reports; LambdaLR sets it only when it
        # steps, and stepping here would count a step that never happened.
        scheduler._last_lr = rates

    def _read_length(self) -> None:
        total = self.module.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 0:  # -1: an iterable train set, no max_steps
            self._no_end()
        total = max(1, int(total))
        self.steps = (int(self.warmup_ratio * total), total)

    def _no_end(self) -> NoReturn:
        raise self.error(
            f"{self.owner}: the learning-rate schedule needs a finite run; set "
            "trainer.max_steps or trainer.max_epochs"
        )
