"""2-process CPU DDP driver for test_callback_ddp.py: ``python tests/ddp_driver.py OUT``.

Lightning's ``ddp`` strategy re-launches this script for rank 1, so every rank runs
``main``. Two fits run in the same processes:

1. ``fit``: MLPModule for 2 epochs (2 batches per rank per epoch), a checkpoint every epoch.
2. ``resume``: a fresh MLPModule from the same seed, resumed from the epoch-0 checkpoint of
   run 1 (``trainer.fit(ckpt_path=...)``) up to the same 2 epochs.
3. ``dropout``: ResumableMLPModule with LoRA dropout 0.5, each rank's global RNG seeded
   differently (so the ranks draw different masks), a checkpoint every step (2 per epoch).
4. ``dropout_resume``: the same, resumed from run 3's mid-epoch checkpoint (epoch 1, step 3).

Each rank writes, per run, ``<run>_<moment>_rank<r>.pt`` (its ``lora_state_dict`` right after
setup, at train start and at train end, plus the global step; at train end also the first optimizer's state), and every call of
``LoRACallback.export`` leaves a marker file ``exports/<run>-rank<r>-<n>-<directory name>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MLP_TARGETS, MLPModule, ResumableMLPModule, lora_tensors, trainer

from lora_lightning import LoRACallback


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CountingLoRACallback(LoRACallback):
    """Leaves a marker file for every adapter export, naming the rank that wrote it."""

    def __init__(self, markers: Path, run: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.markers = markers
        self.run = run
        self.calls = 0

    def export(self, state_dict: Any, directory: Any) -> Path:
        self.calls += 1
        self.markers.mkdir(parents=True, exist_ok=True)
        name = f"{self.run}-rank{_rank()}-{self.calls}-{Path(directory).name}"
        (self.markers / name).touch()
        return super().export(state_dict, directory)


class Probe(pl.Callback):
    """Saves this rank's adapter tensors at setup (after LoRACallback), train start and end."""

    def __init__(self, out: Path, run: str) -> None:
        self.out = out
        self.run = run

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule, moment: str) -> None:
        record = {"lora": lora_tensors(module), "global_step": trainer.global_step}
        if moment == "end":
            record["optimizer"] = trainer.optimizers[0].state_dict()
        torch.save(record, self.out / f"{self.run}_{moment}_rank{trainer.global_rank}.pt")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._save(trainer, pl_module, "setup")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def fit(
    out: Path,
    name: str,
    module: pl.LightningModule,
    callback: LoRACallback,
    ckpt_path: Path | None = None,
    **checkpoint_options: Any,
) -> None:
    """2-process DDP fit for 2 epochs, probed, a checkpoint per ``checkpoint_options``."""
    checkpoint = ModelCheckpoint(dirpath=out / f"{name}_ckpt", save_top_k=-1, **checkpoint_options)
    ddp = trainer(
        out,
        [callback, Probe(out, name), checkpoint],
        devices=2,
        strategy="ddp",
        max_epochs=2,
        use_distributed_sampler=True,
    )
    ddp.fit(module, ckpt_path=ckpt_path)


def run(out: Path, name: str, ckpt_path: Path | None = None) -> None:
    callback = CountingLoRACallback(
        out / "exports", name, target_modules=MLP_TARGETS, r=2, adapter_dir=out / f"{name}_adapter"
    )
    fit(out, name, MLPModule(), callback, ckpt_path)


def run_with_dropout(out: Path, name: str, ckpt_path: Path | None = None) -> None:
    module = ResumableMLPModule()  # seeds the global RNG with its own seed: seed after it
    # Before the process group exists: rank 1 is the re-launched script, with LOCAL_RANK set.
    torch.manual_seed(1000 + int(os.environ.get("LOCAL_RANK", 0)))
    callback = LoRACallback(
        target_modules=MLP_TARGETS, r=2, dropout=0.5, adapter_dir=out / f"{name}_adapter"
    )
    fit(out, name, module, callback, ckpt_path, every_n_train_steps=1)


def main(out: Path) -> None:
    run(out, "fit")
    run(out, "resume", ckpt_path=out / "fit_ckpt" / "epoch=0-step=2.ckpt")
    run_with_dropout(out, "dropout")
    run_with_dropout(out, "dropout_resume", ckpt_path=out / "dropout_ckpt" / "epoch=1-step=3.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
