"""Resume and preemption: ``ckpt_path=``, ``resume=auto``, and "time is up" mid-epoch.

Each way a cluster says "time is up" is delivered to a real short CPU job at optimizer step 5
of 32 (16 batches per epoch, 2 epochs, LoRA and BERT dropout on, so the RNG state and the
position in the epoch matter): SIGTERM; SLURM's requeue signal under Lightning's
SLURMEnvironment (SIGUSR1, with ``scontrol`` replaced by a script that records its arguments);
submitit's signal (USR2) in a job of submitit's local executor, which requeues and restarts it
as SLURM would. Each test checks the checkpoint written, the exit status, and that the job
continued ends with an adapter bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import test_app
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_models import MLPModule
from safetensors.torch import load_file
from test_app import ROOT, compose_train, subprocess_env, tiny_args, train_py
from torch.utils.data import DataLoader, RandomSampler

from lora_lightning.app.signals import SUBMITIT, Preemption, resume_checkpoint

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)
# PYTHONPATH: the killer callback is this module, imported by the job by its _target_.
KILLER_ENV = {"PYTHONPATH": str(Path(__file__).parent)}


class SignalAtStep(pl.Callback):
    """Sends this process ``signal`` (a name: SIGTERM, SIGUSR1...), as a scheduler would, after
    optimizer step ``step``; with several processes, in those of global rank in ``ranks``
    (None: every one, as SLURM signals every task; ``[0]``: the launching process only, as
    ``kill <pid>`` would)."""

    def __init__(self, step: int, signal: str = "SIGTERM", ranks: list[int] | None = None) -> None:
        self.step = step
        self.signal = signal
        self.ranks = ranks

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and (
            self.ranks is None or trainer.global_rank in self.ranks
        ):
            os.kill(os.getpid(), getattr(signal, self.signal))


def _budget(model_dir: Path) -> list[str]:
    # 16 batches per epoch, 2 epochs; LoRA and BERT dropout on, so the RNG state matters.
    return [*tiny_args(model_dir), "data.train_limit=128", "data.batch_size=8",
            "trainer.max_steps=-1", "trainer.max_epochs=2", "logger=none"]  # fmt: skip


def _killer(signal_name: str, ranks: str = "null") -> list[str]:
    return ["+callbacks.kill._target_=test_app_resume.SignalAtStep", "+callbacks.kill.step=5",
            f"+callbacks.kill.signal={signal_name}", f"+callbacks.kill.ranks={ranks}"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Iterator[Callable[[], dict]]:
    """The adapter of the budget's job run straight through, as a function that waits for it.

    The job starts when a test first asks for the fixture and runs beside that test's own
    jobs: every job here is one single-threaded interpreter start, and CI has 2 cores."""
    out = tmp_path_factory.mktemp("straight")
    log = out.parent / f"{out.name}.log"
    with log.open("w") as output:
        job = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *_budget(tiny_model_dir),
             f"hydra.run.dir={out}"],
            cwd=ROOT, env=subprocess_env(), stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def adapter() -> dict:
        assert job.wait(timeout=300) == 0, log.read_text()[-5000:]
        return load_file(out / "adapter" / "adapter_model.safetensors")

    yield adapter
    job.kill()  # a test failed before it waited: the job must not outlive the module
    job.wait()


def _assert_same_adapter(expected: dict, folder: Path) -> None:
    got = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].equal(got[key]), key


@pytest.mark.slow
def test_sigterm_mid_epoch_then_rerun_gives_the_uninterrupted_adapter(
    tiny_model_dir, uninterrupted, tmp_path
):
    interrupted = tmp_path / "interrupted"
    stopped = train_py(
        [*_budget(tiny_model_dir), *_killer("SIGTERM"), f"hydra.run.dir={interrupted}"],
        expect_rc=143, env=KILLER_ENV,
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
    _assert_same_adapter(uninterrupted(), interrupted)


def preempt_then_resume(args: list[str], run_dir: Path, ranks: str) -> None:
    """Run ``train.py <args>`` in ``run_dir`` with 2 processes, SIGTERM the ranks ``ranks`` at
    step 5 (a Hydra list, or ``null`` for every rank); check that it stops with status 143 after
    every rank took part in writing ``preempted.ckpt``; rerun it with ``resume=auto``."""
    stopped = train_py(
        [*args, *_killer("SIGTERM", ranks), f"hydra.run.dir={run_dir}"],
        expect_rc=143, env=KILLER_ENV, timeout=400,
    )  # fmt: skip
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert preempted.exists()
    # Both ranks left the loop at the same step and saved together (a collective), each
    # logging it; a rank stuck in another collective would have hung or failed the job.
    assert (stopped.stdout + stopped.stderr).count(f"SIGTERM: checkpoint saved to {preempted}") == 2
    assert not (run_dir / "adapter").exists()
    resumed = train_py([*args, "resume=auto", f"hydra.run.dir={run_dir}"], timeout=400)
    assert f"Resuming from {preempted}" in resumed.stdout


DDP = ["trainer=ddp", "trainer.accelerator=cpu"]  # 2 processes


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """The budget's job run straight through by 2 DDP processes, logging to CSV: its folder and
    its console output. (One job serves two tests: each job costs two interpreter starts.)"""
    out = tmp_path_factory.mktemp("straight-ddp")
    budget = [a for a in _budget(tiny_model_dir) if a != "logger=none"]
    result = train_py([*budget, *DDP, "logger=csv", f"hydra.run.dir={out}"], timeout=400)
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_two_process_cpu_ddp_through_train_py(uninterrupted_ddp):
    out, output = uninterrupted_ddp
    assert "GLOBAL_RANK: 1" in output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Only rank zero writes: one results file, no second Hydra config folder.
    assert json.loads((out / "results.json").read_text())["adapter_dir"]


@pytest.mark.slow
def test_sigterm_to_the_launching_process_of_a_ddp_job_stops_both_ranks_then_resumes_exactly(
    tiny_model_dir, uninterrupted_ddp, tmp_path
):
    run_dir = tmp_path / "interrupted"
    preempt_then_resume([*_budget(tiny_model_dir), *DDP], run_dir, ranks="[0]")
    straight, _ = uninterrupted_ddp
    _assert_same_adapter(load_file(straight / "adapter" / "adapter_model.safetensors"), run_dir)


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a one-task SLURM job whose ``scontrol`` appends its arguments to
    ``tmp_path/scontrol.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip


@pytest.mark.slow
def test_slurm_requeue_signal_writes_hpc_checkpoint_requeues_and_the_requeued_job_continues(
    tiny_model_dir, uninterrupted, tmp_path
):
    run_dir, slurm = tmp_path / "run", _fake_slurm(tmp_path)
    args = [*_budget(tiny_model_dir), f"hydra.run.dir={run_dir}"]
    stopped = train_py([*args, *_killer("SIGUSR1")], expect_rc=143, env={**slurm, **KILLER_ENV})
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert not (run_dir / "checkpoints" / "preempted.ckpt").exists()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "job requeued" in stopped.stderr.strip().splitlines()[-1]
    assert not (run_dir / "adapter").exists()
    # SLURM reruns the same script: Lightning resumes from hpc_ckpt_1.ckpt by itself.
    train_py(args, env=slurm)
    restored = f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}"
    assert restored in (run_dir / "train.log").read_text()
    _assert_same_adapter(uninterrupted(), run_dir)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # no second requeue


@pytest.mark.slow
def test_submitit_signal_checkpoints_then_submitit_requeues_and_the_job_continues(
    tiny_model_dir, uninterrupted, tmp_path
):
    sweep = tmp_path / "sweep"
    # timeout_min=60: the signal comes early, so submitit counts a preemption, not a timeout.
    train_py(
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=60",
         *_budget(tiny_model_dir), *_killer("SIGUSR2"), "resume=auto", f"hydra.sweep.dir={sweep}"],
        env=KILLER_ENV, timeout=600,
    )  # fmt: skip
    job = sweep / "0"
    assert (job / "checkpoints" / "preempted.ckpt").is_file()
    # submitit's log of the job: its handler ran after the checkpoint, requeued the job (the
    # local executor's requeue is exit status 144), and the executor started it again.
    (submitit_log,) = sweep.glob(".submitit/*/*_0_log.out")
    text = submitit_log.read_text()
    saved = text.index(f"SIGUSR2: checkpoint saved to {job / 'checkpoints' / 'preempted.ckpt'}")
    caught = text.index("this job is preempted", saved)
    requeued = text.index("Requeued job", caught)
    assert text.count("Starting with JobEnvironment") == 2
    assert f"Resuming from {job / 'checkpoints' / 'preempted.ckpt'}" in text[requeued:]
    _assert_same_adapter(uninterrupted(), job)


def test_slurm_launcher_config_requeues_jobs_that_reach_the_time_limit():
    launcher = compose_train(["hydra/launcher=slurm"]).hydra.launcher
    # submitit's signal comes signal_delay_s before the limit; with max_num_timeout=0 a timed
    # out job would not be requeued (submitit raises UncompletedJobError instead).
    assert launcher.max_num_timeout >= 1
    assert launcher.signal_delay_s >= 60


def test_submitit_signal_is_handled_at_the_step_boundary_and_handed_back_after_fit(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls: list[tuple[int, bool]] = []
    preemption = Preemption(tmp_path)

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        calls.append((signum, (tmp_path / "preempted.ckpt").is_file()))

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
            # The signal before the preemption callback's step-end check: it stops this step.
            callbacks=[SignalAtStep(2, "SIGUSR2"), preemption],
        )  # fmt: skip
        with pytest.raises(SIGTERMException):
            trainer.fit(MLPModule())
        assert calls == []  # not run mid-step
        assert trainer.global_step == 2 and preemption.saved == tmp_path / "preempted.ckpt"
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # restored when fit ended
        assert (preemption.launcher, preemption.signal_name) == (SUBMITIT, "SIGUSR2")
        preemption.end_job()
        assert calls == [(signal.SIGUSR2, True)]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_stops_fit_at_the_step_boundary_and_runs_the_handler_installed_before_fit(
    tmp_path,
):
    calls: list[int] = []

    def earlier_handler(signum, frame):  # e.g. submitit's, which logs and bypasses SIGTERM
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, earlier_handler)
    try:
        preemption = Preemption(tmp_path)
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[SignalAtStep(2), preemption],
        )  # fmt: skip
        with pytest.raises(SIGTERMException):
            trainer.fit(MLPModule())
        assert trainer.global_step == 2 and preemption.saved == tmp_path / "preempted.ckpt"
        assert (preemption.launcher, preemption.signal_name) == (None, "SIGTERM")
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is earlier_handler  # restored when fit ended
    finally:
        signal.signal(signal.SIGTERM, previous)


class SignalInFirstValidation(pl.Callback):
    """Sends this process SIGTERM when the first epoch's validation starts."""

    def on_validation_start(self, trainer: pl.Trainer, *args) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_epoch_end_validation_stops_after_that_epoch(tmp_path):
    preemption = Preemption(tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[SignalInFirstValidation(), preemption],
    )  # fmt: skip
    with pytest.raises(SIGTERMException):
        trainer.fit(MLPModule())  # 4 steps per epoch
    assert trainer.global_step == 4 and preemption.saved == tmp_path / "preempted.ckpt"


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


def test_resume_auto_picks_a_distributed_checkpoint_folder_by_its_metadata_file(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "last.ckpt").mkdir(parents=True)
    (folder / "preempted.ckpt").touch()
    time.sleep(0.01)
    assert resume_checkpoint(None, "auto", tmp_path) == str(folder / "preempted.ckpt")
    (folder / "last.ckpt" / "meta.pt").touch()  # a folder without it is no checkpoint yet
    assert resume_checkpoint(None, "auto", tmp_path) == str(folder / "last.ckpt")


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


def _shuffled_loader_module() -> pl.LightningDataModule:
    """A datamodule whose train loader shuffles 8 items with a seeded sampler generator."""
    module = pl.LightningDataModule()

    def train_dataloader():
        generator = torch.Generator().manual_seed(3)
        return DataLoader(
            list(range(8)), batch_size=2, sampler=RandomSampler(range(8), generator=generator)
        )

    module.train_dataloader = train_dataloader
    return module


def test_a_loader_resumed_mid_second_epoch_continues_that_epochs_order(tmp_path):
    datamodule = _shuffled_loader_module()
    Preemption(tmp_path).attach(datamodule)
    loader = datamodule.train_dataloader()
    first_epoch = [b.tolist() for b in loader]
    batches = iter(loader)
    second_epoch = [next(batches).tolist()]
    loader.batches_done = 1  # what Preemption counts after each training step
    state = loader.state_dict()
    second_epoch += [b.tolist() for b in batches]
    assert second_epoch != first_epoch  # a new order each epoch: the sampler's generator moved

    rebuilt = _shuffled_loader_module()
    Preemption(tmp_path).attach(rebuilt)
    resumed = rebuilt.train_dataloader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == second_epoch[1:]
