"""Resume and preemption: ``ckpt_path=``, ``resume=auto``, and SIGTERM mid-epoch.

A job stopped by SIGTERM saves ``checkpoints/preempted.ckpt`` and exits 143; rerunning the same
command with ``resume=auto`` ends with an adapter bit-identical to an uninterrupted run's
(dropout on: the RNG state and the position in the epoch are restored).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import test_app
from safetensors.torch import load_file
from test_app import tiny_args, train_py

from lora_lightning.app.signals import resume_checkpoint

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)


class SigtermAtStep(pl.Callback):
    """Sends this process SIGTERM, as a scheduler would, after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _budget(model_dir: Path) -> list[str]:
    # 16 batches per epoch, 2 epochs; LoRA and BERT dropout on, so the RNG state matters.
    return [*tiny_args(model_dir), "data.train_limit=128", "data.batch_size=8",
            "trainer.max_steps=-1", "trainer.max_epochs=2", "logger=none"]  # fmt: skip


@pytest.mark.slow
def test_sigterm_mid_epoch_then_rerun_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_py([*_budget(tiny_model_dir), f"hydra.run.dir={straight}"])
    # PYTHONPATH: the killer callback is this module, imported by the job by its _target_.
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    killer = ["+callbacks.kill._target_=test_app_resume.SigtermAtStep", "+callbacks.kill.step=5"]
    stopped = train_py(
        [*_budget(tiny_model_dir), *killer, f"hydra.run.dir={interrupted}"], expect_rc=143,
        env=env,
    )  # fmt: skip
    assert (interrupted / "checkpoints" / "preempted.ckpt").is_file()
    assert "resume=auto" in stopped.stderr.strip().splitlines()[-1]
    assert (stopped.stdout + stopped.stderr).count("SIGTERM: checkpoint saved") == 1
    assert (
        "[WARNING] - stopped: rerun the same command with resume=auto"
        in (interrupted / "train.log").read_text()
    )
    assert not (interrupted / "adapter").exists()
    resumed = train_py([*_budget(tiny_model_dir), "resume=auto", f"hydra.run.dir={interrupted}"])
    assert f"Resuming from {interrupted / 'checkpoints' / 'preempted.ckpt'}" in resumed.stdout
    assert "not resumable" not in resumed.stdout + resumed.stderr
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].equal(got[key]), key


def test_resume_auto_in_an_empty_run_folder_starts_fresh(tmp_path):
    assert resume_checkpoint(None, "auto", tmp_path) is None


def test_resume_auto_picks_the_newest_checkpoint_of_the_run(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("last.ckpt", "preempted.ckpt"):
        (folder / name).touch()
        time.sleep(0.01)
    (tmp_path / "hpc_ckpt_1.ckpt").touch()  # SLURM requeue (Lightning's own name and place)
    assert resume_checkpoint(None, "auto", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    os.utime(folder / "last.ckpt")
    assert resume_checkpoint(None, "auto", tmp_path) == str(folder / "last.ckpt")


def test_an_explicit_checkpoint_path_is_used_as_given(tmp_path):
    assert resume_checkpoint("x.ckpt", None, tmp_path) == "x.ckpt"
    assert resume_checkpoint(None, None, tmp_path) is None


def test_a_run_stopped_by_max_steps_between_validations_ends_with_last_ckpt_at_its_final_step(
    tiny_model_dir, tmp_path
):
    import torch

    out = tmp_path / "run"
    # 64 sentences in batches of 8, validation every 2 steps: last.ckpt is written at step 2
    # by ModelCheckpoint, and the run stops at step 3.
    args = [*tiny_args(tiny_model_dir), "data.batch_size=8", "trainer.val_check_interval=2",
            "trainer.max_steps=3", "logger=none"]  # fmt: skip
    train_py([*args, f"hydra.run.dir={out}"])
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3


def test_a_job_rerun_in_its_folder_continues_its_wandb_run(tiny_model_dir, tmp_path):
    from test_app import wandb_runs

    out, other = tmp_path / "run", tmp_path / "other"
    args = [*tiny_args(tiny_model_dir), "trainer.max_steps=1"]
    train_py([*args, f"hydra.run.dir={out}"])
    train_py([*args, "trainer.max_steps=2", "resume=auto", f"hydra.run.dir={out}"])
    train_py([*args, f"hydra.run.dir={other}"])
    ids = {run.stem.removeprefix("run-") for run in wandb_runs(out)}
    assert len(wandb_runs(out)) == 2 and len(ids) == 1
    assert {run.stem.removeprefix("run-") for run in wandb_runs(other)}.isdisjoint(ids)
