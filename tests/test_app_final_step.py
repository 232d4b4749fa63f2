"""A run's final step is validated: a job stopped between two validations (``trainer.max_steps``
below one epoch or between two ``val_check_interval`` points) ends with its monitored metric,
its best checkpoint and ``val/*`` in its results, and ``resume=auto`` continues after it.

Jobs run in this process (``run(cfg)``) on the tiny classifier: 64 sentences in batches of 8,
8 batches per epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import test_app
import torch
from test_app import run_in_process, tiny_args

from lora_lightning.app.final_step import is_final_step

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)


def _short(model_dir: Path, *overrides: str) -> list[str]:
    return [*tiny_args(model_dir), "data.batch_size=8", "logger=none", *overrides]


class RecordBatches(pl.Callback):
    """Records, for every training batch of the jobs of a test, the optimizer step it starts at
    and a fingerprint of its sentences."""

    seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        RecordBatches.seen.append((trainer.global_step, int(batch["input_ids"].sum())))


RECORD = "+callbacks.record._target_=test_app_final_step.RecordBatches"


def test_a_run_stopped_before_its_first_validation_is_validated_at_its_last_step(
    tiny_model_dir, tmp_path, caplog
):
    metric = run_in_process(_short(tiny_model_dir, "trainer.max_steps=3"), tmp_path)
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert {"val/acc", "val/f1", "val/loss"} <= set(metrics) and metric == metrics["val/acc"]
    assert (tmp_path / "checkpoints" / "epoch=0-step=3.ckpt").is_file()  # the best one
    assert "could not find the monitored key" not in caplog.text


@pytest.mark.parametrize(("max_steps", "validated"), [(3, [2, 3]), (4, [2, 4])])
def test_the_last_step_is_validated_once_and_the_best_checkpoint_is_the_best_validation(
    tiny_model_dir, tmp_path, max_steps, validated
):
    overrides = ("trainer.val_check_interval=2", f"trainer.max_steps={max_steps}",
                 "logger=csv", "optimized_metric=val/loss", "callbacks.model_checkpoint.mode=min")  # fmt: skip
    run_in_process(_short(tiny_model_dir, *overrides), tmp_path)
    (metrics_csv,) = tmp_path.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(metrics_csv.open()) if row["val/loss"]]
    # Lightning logs a validation at the step count of the batches trained before it.
    assert [int(row["step"]) + 1 for row in rows] == validated
    best = min(rows, key=lambda row: float(row["val/loss"]))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert Path(state["best_model_path"]).name == f"epoch=0-step={int(best['step']) + 1}.ckpt"
    assert float(state["best_model_score"]) == pytest.approx(float(best["val/loss"]))


def test_resume_auto_after_a_short_run_trains_the_next_batches_once(tiny_model_dir, tmp_path):
    RecordBatches.seen = []
    run_in_process(_short(tiny_model_dir, "trainer.max_steps=5", RECORD), tmp_path / "straight")
    straight, RecordBatches.seen = RecordBatches.seen, []
    run_in_process(_short(tiny_model_dir, "trainer.max_steps=3", RECORD), tmp_path / "run")
    run_in_process(
        _short(tiny_model_dir, "trainer.max_steps=5", "resume=auto", RECORD), tmp_path / "run"
    )
    assert RecordBatches.seen == straight  # steps 0-2, then 3-4: none repeated, none skipped
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5


@pytest.mark.parametrize(
    ("limits", "step", "epoch", "batch_idx", "final"),
    [
        ({"max_steps": 3, "max_epochs": 1}, 3, 0, 2, True),  # max_steps reached mid-epoch
        ({"max_steps": 3, "max_epochs": 1}, 2, 0, 1, False),
        ({"max_steps": -1, "max_epochs": 2}, 8, 0, 7, False),  # the end of an earlier epoch
        ({"max_steps": -1, "max_epochs": 2}, 16, 1, 7, True),  # the last batch of the last one
        ({"max_steps": -1, "max_epochs": -1}, 99, 12, 7, False),  # no end
    ],
)
def test_the_final_step_is_the_max_steps_one_or_the_last_batch_of_the_last_epoch(
    monkeypatch, limits, step, epoch, batch_idx, final
):
    trainer = pl.Trainer(accelerator="cpu", logger=False, **limits)
    for name, value in (
        ("global_step", step),
        ("current_epoch", epoch),
        ("num_training_batches", 8),
    ):
        monkeypatch.setattr(type(trainer), name, property(lambda self, v=value: v))
    assert is_final_step(trainer, batch_idx) is final
