"""The tasks' shared learning-rate schedule: linear warmup and decay over a run whose length is
read when training starts (``lora_lightning.tasks.WarmupDecaySchedule``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_lightning.tasks import WarmupDecaySchedule, linear_warmup_decay


class _Trainer:
    """A trainer stub that counts how often the run length was asked for."""

    def __init__(self, total: float, max_epochs: int = 1, max_steps: int = -1) -> None:
        self.total, self.max_epochs, self.max_steps = total, max_epochs, max_steps
        self.asked = 0

    @property
    def estimated_stepping_batches(self) -> float:
        self.asked += 1
        return self.total


def _schedule(total: float, warmup_ratio: float, **trainer) -> tuple:
    module = SimpleNamespace(trainer=_Trainer(total, **trainer))
    schedule = WarmupDecaySchedule(module, warmup_ratio, "Task")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    return module.trainer, schedule, schedule.build(optimizer), optimizer


def _rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.3, 0.1])  # 0.1 of 6 steps: no warmup step
def test_started_schedule_follows_linear_warmup_decay_over_the_run_length(warmup_ratio):
    trainer, schedule, scheduler, optimizer = _schedule(6, warmup_ratio)
    assert trainer.asked == 0  # building it does not ask (that would build the train loader)
    schedule.start()
    assert trainer.asked == 1
    expected = [2.0 * linear_warmup_decay(s, int(warmup_ratio * 6), 6) for s in range(7)]
    assert _rates(scheduler, optimizer, 6) == pytest.approx(expected)
    assert scheduler.get_last_lr() == pytest.approx([expected[-1]])


def test_start_sets_the_current_steps_rate_and_what_get_last_lr_reports():
    _, schedule, scheduler, optimizer = _schedule(10, 0.05)  # placeholder 0: the ratio rounds
    assert optimizer.param_groups[0]["lr"] == 0.0  # to no warmup step, so step 0 has rate 2
    schedule.start()
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 2.0


def test_without_start_the_first_step_after_zero_reads_the_length():
    trainer, _, scheduler, optimizer = _schedule(4, 0.5)
    rates = _rates(scheduler, optimizer, 4)
    assert trainer.asked == 1
    assert rates == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])


def test_the_scheduler_state_holds_no_reference_to_the_module():
    _, schedule, scheduler, _ = _schedule(4, 0.5)
    schedule.start()
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # a function: not saved


@pytest.mark.parametrize(
    ("total", "trainer"),
    [(float("inf"), {}), (-1, {}), (10, {"max_epochs": -1, "max_steps": -1})],
    ids=["infinite", "iterable-without-max-steps", "max-epochs-minus-one"],
)
def test_a_run_without_end_is_refused_with_the_owners_error(total, trainer):
    class OwnError(ValueError):
        pass

    module = SimpleNamespace(trainer=_Trainer(total, **trainer))
    schedule = WarmupDecaySchedule(module, 0.1, "Task", error=OwnError)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(OwnError, match="Task: the learning-rate schedule needs a finite run"):
        schedule.build(optimizer)
        schedule.start()
