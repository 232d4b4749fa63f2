"""What a job shows and records: the console, train.log, the W&B run's status and artifact."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import test_app
import wandb
from test_app import run_in_process, tiny_args, train_py, wandb_runs

from lora_lightning.app.checks import warn_if_cpu_oversubscribed

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)


class FailAtTrainStart(pl.Callback):
    """A job that fails once training has started (the W&B run exists by then)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def finish_codes(monkeypatch) -> list[int | None]:
    """Exit codes passed to W&B's ``Run.finish`` (the real finish still runs)."""
    codes: list[int | None] = []
    finish = wandb.Run.finish

    def spy(self, exit_code=None, *args, **kwargs):
        codes.append(exit_code)
        return finish(self, exit_code, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "finish", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return codes


def _written_run(output_dir: Path) -> bytes:
    """The job's offline run file once W&B's service has finished writing it (asynchronously)."""
    (run,) = wandb_runs(output_dir)
    size, deadline = -1, time.monotonic() + 60
    while (run.stat().st_size != size or size < 1000) and time.monotonic() < deadline:
        size = run.stat().st_size
        time.sleep(1.0)
    return run.read_bytes()


def test_console_shows_the_final_block_last_and_train_log_keeps_everything(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    result = train_py([*tiny_args(tiny_model_dir), f"hydra.run.dir={out}"], merge_stderr=True)
    console = result.stdout
    tail = console.rstrip().splitlines()[-16:]
    block = tail[tail.index("Finished") :]
    assert block[-1].startswith("  wall time")
    assert any(line.startswith("  LoRA         r=8") for line in block)
    assert any(line.startswith(f"  adapter      {out / 'adapter'}") for line in block)
    assert any(line.startswith("  W&B offline  wandb sync") for line in block)
    noises = ("💡 Tip", "LeafSpec", "Loading `train_dataloader`", "Run history", "FLOPs")
    noises += ("Failed to load", "is an Enum subclass", "Detected no triton")  # torchao
    noises += ("wandb:", "GPU available", "TPU available")
    for noise in noises:
        assert noise not in console, noise
    log = (out / "train.log").read_text()
    assert "LoRA summary" in log and "Finished" in log and "💡 Tip" in log


def test_a_failed_job_marks_its_wandb_run_failed(tiny_model_dir, tmp_path, finish_codes):
    fail = "+callbacks.fail._target_=test_app_output.FailAtTrainStart"
    with pytest.raises(RuntimeError, match="boom"):
        run_in_process([*tiny_args(tiny_model_dir), fail], tmp_path)
    assert finish_codes == [1]


def test_final_adapter_is_logged_as_a_wandb_model_artifact(tiny_model_dir, tmp_path, finish_codes):
    run_in_process(tiny_args(tiny_model_dir), tmp_path)
    assert finish_codes == [0]
    logged = _written_run(tmp_path)
    run_id = wandb_runs(tmp_path)[0].stem.removeprefix("run-")
    assert f"adapter-{run_id}".encode() in logged and b"adapter_config.json" in logged


def test_the_artifact_can_be_switched_off(tiny_model_dir, tmp_path, finish_codes):
    run_in_process([*tiny_args(tiny_model_dir), "lora_export.log_artifact=false"], tmp_path)
    logged = _written_run(tmp_path)
    assert b"lora/trainable_params" in logged and b"adapter-" not in logged


def test_more_cpu_processes_than_cores_warns(caplog):
    cores = len(os.sched_getaffinity(0))
    trainer = pl.Trainer(accelerator="cpu", devices=cores + 1, strategy="ddp", logger=False)
    warn_if_cpu_oversubscribed(trainer)
    assert f"trainer.devices={cores + 1} starts {cores + 1} CPU processes on {cores} cores" in (
        caplog.text
    )


def test_one_cpu_process_does_not_warn(caplog):
    warn_if_cpu_oversubscribed(pl.Trainer(accelerator="cpu", devices=1, logger=False))
    assert "CPU processes" not in caplog.text


def test_the_console_shortens_the_load_report_and_train_log_keeps_it_whole():
    import io
    import logging

    from lora_lightning.app.console import ConsoleFormatter, ConsoleNoiseFilter

    console, file = io.StringIO(), io.StringIO()
    to_console, to_file = logging.StreamHandler(console), logging.StreamHandler(file)
    to_console.addFilter(ConsoleNoiseFilter())
    to_console.setFormatter(ConsoleFormatter("%(message)s"))
    to_file.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("transformers.modeling_utils.test")
    logger.propagate = False
    for handler in (to_console, to_file):  # the console first, as in app.yaml
        logger.addHandler(handler)
    report = "BertForSequenceClassification LOAD REPORT\nKey | Status\nclassifier.weight | MISSING"
    logger.warning(report)
    assert console.getvalue().strip() == (
        "BertForSequenceClassification LOAD REPORT (full report in train.log)"
    )
    assert file.getvalue().strip() == report


@pytest.mark.parametrize(
    "line",
    [
        "GPU available: False, used: False",
        "TPU available: False, using: 0 TPU cores",
        "Warning: Detected no triton, on systems without Triton certain kernels will not work",
        "Checkpoint directory /x/checkpoints exists and is not empty.",
    ],
)
def test_known_dependency_noise_stays_off_the_console(line):
    import logging

    from lora_lightning.app.console import ConsoleNoiseFilter

    record = logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 0, line, None, None)
    assert not ConsoleNoiseFilter().filter(record)


class BarAtFirstBatch(pl.Callback):
    """Records the training bar's label and length when the first batch of a fit ends."""

    def __init__(self) -> None:
        self.seen: tuple[str, int | None] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.seen is None:
            bar = trainer.progress_bar_callback.train_progress_bar
            self.seen = (bar.desc.rstrip(": "), bar.total)


def test_the_progress_bar_labels_the_epoch_a_job_resumes_in_the_middle_of(tmp_path):
    from lightning_models import MLPModule

    from lora_lightning.app.console import ProgressBar

    # 16 samples in batches of 4: 4 batches per epoch; a checkpoint after the second.
    every_2 = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[every_2]).fit(MLPModule())
    seen = BarAtFirstBatch()
    resumed = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False,
                         enable_checkpointing=False, callbacks=[ProgressBar(), seen])  # fmt: skip
    resumed.fit(MLPModule(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert seen.seen == ("Epoch 0", 4)
