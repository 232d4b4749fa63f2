"""Subprocess driver for test_crash_safety.py (CPU only, tiny model, seconds per run).

Three commands:

``python tests/crash_driver.py kill ROOT --trials N --seed S``
    Imports Lightning once, then forks one child per training run (a fork costs
    milliseconds; a fresh interpreter importing Lightning costs ~10 s on 2 shared cores).
    ``ROOT/reference`` is an uninterrupted run. For every trial ``ROOT/trial<i>`` a child
    trains, is killed with SIGKILL after a seeded random delay, the run folder is copied to
    ``ROOT/trial<i>_killed`` (what a crash leaves on disk), and a second child resumes from
    ``ckpt/last.ckpt`` (from scratch if no checkpoint exists yet) to completion.
    ``ROOT/report.json`` lists every trial: delay, whether the child was still running when
    killed, and the checkpoint it resumed from.

``python tests/crash_driver.py save-kills ROOT``
    Needs only torch and the core library. For each scenario (a new adapter folder, an
    adapter overwritten, ``last.ckpt`` overwritten as the LoRA CheckpointIO writes it), a
    child process is killed (``os._exit``: no cleanup runs) at the 1st, 2nd, ... point of the
    save: before and after every rename, fsync and folder removal, and halfway through every
    file write, until a child gets through the whole save. ``ROOT/<scenario>-<point>`` keeps
    what each kill left; ``ROOT/old``, ``ROOT/new`` (and ``.ckpt``) are the two versions.

``python tests/crash_driver.py ddp ROOT --fail-rank R --fail-step K``
    A 2-process CPU DDP fit (``strategy="ddp"``: Lightning re-launches this script for rank
    1) in which rank ``R`` raises ``RuntimeError("injected failure ...")`` at global step K.

Every run trains :class:`TinyModule` with :class:`LoRACallback` and
``ModelCheckpoint(every_n_train_steps=1, save_last=True)``; a batch is a function of the
global step only, so a resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Lightning is imported lazily (``save-kills`` needs only torch and the core library).

STEPS = 40
LORA = {"r": 2, "alpha": 4.0, "target_modules": [r"net\.[02]"], "modules_to_save": [r"net\.4"]}


def tiny_net() -> nn.Sequential:
    """The seeded MLP every run starts from (``net.0``, ``net.2``, ``net.4`` are Linear)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


class TinyNet(nn.Module):
    """``tiny_net()`` as ``.net``: the module paths of the adapters the runs export."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a global step: a resumed run replays exactly the data it would have seen."""
    generator = torch.Generator().manual_seed(1000 + step * world + rank)
    return torch.randn(8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator)


@functools.cache
def tiny_module_class() -> type:
    import lightning.pytorch as pl

    class TinyModule(pl.LightningModule):
        """TinyNet trained with Adam + a per-step StepLR; can raise at a given rank and step."""

        def __init__(
            self,
            steps: int = STEPS,
            sleep: float = 0.0,
            fail_rank: int | None = None,
            fail_step: int | None = None,
        ) -> None:
            super().__init__()
            self.net = tiny_net()
            self.steps = steps
            self.sleep = sleep
            self.fail_rank = fail_rank
            self.fail_step = fail_step

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, _: Any, batch_idx: int) -> torch.Tensor:
            rank, world = self.global_rank, self.trainer.world_size
            if self.global_step == self.fail_step and rank == self.fail_rank:
                raise RuntimeError(f"injected failure on rank {rank} at step {self.global_step}")
            x, y = batch(self.global_step, rank, world)
            if self.sleep:
                time.sleep(self.sleep)  # so that random kill points land mid-run
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.zeros(self.steps, 1)), batch_size=1)

    return TinyModule


def make_trainer(run_dir: Path, steps: int, extra_callbacks: tuple = (), **kwargs: Any) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lora_lightning import LoRACallback

    callbacks = [
        LoRACallback(adapter_dir=run_dir / "adapter", **LORA),
        ModelCheckpoint(dirpath=run_dir / "ckpt", every_n_train_steps=1, save_last=True),
        *extra_callbacks,
    ]
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        "default_root_dir": str(run_dir),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def train(run_dir: Path, steps: int, sleep: float, ckpt_path: Path | None = None) -> None:
    module = tiny_module_class()(steps, sleep)
    make_trainer(run_dir, steps).fit(module, ckpt_path=ckpt_path)


# ------------------------------------------------------------------------------ kill trials
def _fork(run_dir: Path, steps: int, sleep: float, ckpt_path: Path | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # child: train, then leave without running the parent's exit handlers
        code = 0
        try:
            torch.set_num_threads(1)
            train(run_dir, steps, sleep, ckpt_path)
        except BaseException:  # noqa: BLE001 - report anything, exit non-zero
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    """Exit code of a child, or ``-signal`` if a signal ended it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


def kill_trials(root: Path, trials: int, seed: int, steps: int, sleep: float) -> None:
    torch.set_num_threads(1)  # before any op: no thread pool exists when we fork
    root.mkdir(parents=True, exist_ok=True)
    # Import what the children need once, here: a forked child then starts in milliseconds.
    make_trainer(root / "warm-up", steps)
    tiny_module_class()(steps, sleep)
    shutil.rmtree(root / "warm-up", ignore_errors=True)
    started = time.perf_counter()
    code = _wait(_fork(root / "reference", steps, sleep))
    duration = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"reference run failed with exit code {code}")
    rng = random.Random(seed)
    report: dict[str, Any] = {"reference_seconds": round(duration, 3), "trials": []}
    for index in range(trials):
        run_dir = root / f"trial{index}"
        delay = rng.uniform(0.0, duration)
        pid = _fork(run_dir, steps, sleep)
        time.sleep(delay)
        running = os.waitpid(pid, os.WNOHANG) == (0, 0)
        if running:  # a finished child was reaped just now: there is nothing left to kill
            os.kill(pid, signal.SIGKILL)
        code = _wait(pid) if running else None
        if run_dir.exists():
            shutil.copytree(run_dir, root / f"trial{index}_killed", symlinks=True)
        last = run_dir / "ckpt" / "last.ckpt"
        resume_from = last if last.exists() else None
        step = _step_of(last) if resume_from else 0
        resume_code = _wait(_fork(run_dir, steps, sleep, resume_from))
        report["trials"].append(
            {
                "trial": index,
                "delay_s": round(delay, 3),
                "killed_while_running": running and code == -signal.SIGKILL,
                "resumed_from": str(resume_from) if resume_from else None,
                "resumed_at_step": step,
                "resume_exit_code": resume_code,
            }
        )
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------ kill points of a save
KILLED = 137  # the exit status a SIGKILL gives a child of a shell


def adapted_tiny_net(seed: int) -> nn.Module:
    """TinyNet with LoRA (the runs' config) and seeded non-zero adapter values."""
    from lora_lightning import LoRAConfig, inject_lora

    model = TinyNet()
    inject_lora(model, LoRAConfig(**LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _arm(kill_at: int) -> None:
    """Die (``os._exit``: no ``finally`` runs, as under SIGKILL) at the ``kill_at``-th point.

    Points: before and after every rename, fsync and folder removal, and in the middle of
    every weights or checkpoint write (the file is cut to half its bytes, then the process
    dies).
    """
    import lora_lightning.core.files as adapter

    counter = iter(range(1_000_000))

    def point() -> None:
        if next(counter) == kill_at:
            os._exit(KILLED)

    def around(function: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            point()
            result = function(*args, **kwargs)
            point()
            return result

        return wrapped

    def cut_in_half(function: Any) -> Any:
        def wrapped(obj: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            result = function(obj, path, *args, **kwargs)
            if next(counter) == kill_at:
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                os._exit(KILLED)
            return result

        return wrapped

    os.replace = around(os.replace)
    os.fsync = around(os.fsync)
    shutil.rmtree = around(shutil.rmtree)
    adapter.save_file = cut_in_half(adapter.save_file)
    torch.save = cut_in_half(torch.save)


def save_kills(root: Path) -> None:
    """Kill a save at each of its points; leave one folder per (scenario, point)."""
    from lora_lightning import save_adapter
    from lora_lightning.core.files import atomic_write_file as _atomic_write

    torch.set_num_threads(1)
    old, new = adapted_tiny_net(1), adapted_tiny_net(2)
    save_adapter(old, root / "old")
    save_adapter(new, root / "new")
    checkpoints = {
        name: {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "step": step}
        for name, model, step in (("old", old, 1), ("new", new, 2))
    }
    torch.save(checkpoints["old"], root / "old.ckpt")
    torch.save(checkpoints["new"], root / "new.ckpt")

    def adapter_new(folder: Path) -> None:
        save_adapter(new, folder / "adapter")

    def adapter_overwrite(folder: Path) -> None:
        save_adapter(new, folder / "adapter")

    def checkpoint_overwrite(folder: Path) -> None:
        # What the LoRA CheckpointIO does for a local path (lightning.checkpoint_io.AdapterExportingIO).
        _atomic_write(folder / "last.ckpt", lambda tmp: torch.save(checkpoints["new"], tmp))

    scenarios = {
        "adapter-new": (adapter_new, lambda folder: None),
        "adapter-overwrite": (adapter_overwrite, lambda f: shutil.copytree(root / "old", f / "adapter")),
        "checkpoint-overwrite": (checkpoint_overwrite, lambda f: shutil.copy(root / "old.ckpt", f / "last.ckpt")),
    }  # fmt: skip
    report = []
    for scenario, (save, prepare) in scenarios.items():
        for kill_at in range(1000):
            folder = root / f"{scenario}-{kill_at}"
            folder.mkdir()
            prepare(folder)
            pid = os.fork()
            if pid == 0:
                try:
                    _arm(kill_at)
                    save(folder)
                finally:
                    os._exit(0)
            code = _wait(pid)
            report.append({"scenario": scenario, "kill_at": kill_at, "folder": folder.name,
                           "killed": code == KILLED})  # fmt: skip
            if code != KILLED:
                break
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")


# -------------------------------------------------------------------------------------- DDP
def ddp_fault(root: Path, fail_rank: int, fail_step: int) -> None:
    trainer = make_trainer(
        root, steps=STEPS, devices=2, strategy="ddp", use_distributed_sampler=True
    )
    trainer.fit(tiny_module_class()(STEPS, fail_rank=fail_rank, fail_step=fail_step))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kill")
    kill.add_argument("root", type=Path)
    kill.add_argument("--trials", type=int, default=10)
    kill.add_argument("--seed", type=int, default=0)
    kill.add_argument("--steps", type=int, default=STEPS)
    kill.add_argument("--sleep", type=float, default=0.02)
    ddp = commands.add_parser("ddp")
    ddp.add_argument("root", type=Path)
    ddp.add_argument("--fail-rank", type=int, required=True)
    ddp.add_argument("--fail-step", type=int, required=True)
    kills = commands.add_parser("save-kills")
    kills.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    if args.command == "kill":
        kill_trials(args.root, args.trials, args.seed, args.steps, args.sleep)
    elif args.command == "save-kills":
        save_kills(args.root)
    else:
        ddp_fault(args.root, args.fail_rank, args.fail_step)


if __name__ == "__main__":
    main()
