"""CPU FSDP2 driver for test_callback_fsdp.py: ``python tests/fsdp_driver.py OUT [PHASE]``.

Lightning's ``ModelParallelStrategy`` re-launches this script for rank 1, so every rank runs
``main``. A tiny Llama LightningModule (``LlamaModule``, sharded by ``shard_model`` in its
``configure_model``) with ``LoRACallback`` runs, in the same processes:

1. ``dist``: 4 steps, distributed checkpoints (folders) every 2 steps, ``merge_on_end``.
2. ``dist_resume``: a fresh module resumed from ``dist``'s step-2 folder, up to 4 steps.
3. ``file``: 4 steps, single-file checkpoints (``save_distributed_checkpoint=False``).
4. ``file_resume``: resumed from ``file``'s step-2 file, up to 4 steps.
5. ``from_single`` (when ``OUT/single.ckpt`` exists: a single-process checkpoint the test
   wrote): resumed from it, 1 more step.
6. ``from_one`` (when ``OUT/one_ckpt`` exists): ``one``'s step-2 folder, written by one
   process, resumed on two, 1 more step.
7. ``mismatch``: resuming ``dist``'s folder with another LoRA rank; rank zero records the
   error and the adapters, which must be unchanged (it ends the run: rank 1 is stopped).

The ``one`` and ``to_one`` phases run FSDP2 in one process (``ModelParallelStrategy`` on one
device), before and after the 2-process runs: ``one`` trains 2 steps writing a distributed
folder; ``to_one`` resumes ``dist``'s step-2 folder, 1 more step.

Each rank writes ``<run>_<moment>_rank<r>.pt`` (the gathered adapters, this rank's local
shards, the gathered optimizer state on rank zero, the global step, and at the end the
logits of a fixed input), at ``start`` (after any resume) and ``end``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from models import tiny_llama
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback
from lora_lightning.core.errors import CheckpointMismatchError
from lora_lightning.lightning import base_fingerprint
from lora_lightning.lightning.sharded import (
    full_tensors,
    is_dtensor,
    shard_model,
    trainable_state_dict,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEP2 = "epoch=0-step=2.ckpt"
PROBE_IDS = torch.arange(16).reshape(2, 8) % 64


def token_batches(n: int = 16, length: int = 8, seed: int = 0) -> TensorDataset:
    """``n`` random token rows (vocabulary 64), the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 64, (n, length), generator=generator))


class LlamaModule(pl.LightningModule):
    """Next-token loss on random tokens with a tiny Llama as ``self.model``; sharded by
    :func:`shard_model` in ``configure_model`` (a user-written one, as Lightning asks)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = tiny_llama(seed).train()

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # a single-process run stays whole
            shard_model(self, self.device_mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_batches(), batch_size=4, shuffle=False)


class Probe(pl.Callback):
    """Records this rank's view of the adapters and optimizer at train start and end."""

    def __init__(self, out: Path, run: str) -> None:
        self.out = out
        self.run = run

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule, moment: str) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        sharded = trainable_state_dict(module, full=False)
        record = {
            "lora": full_tensors(sharded),
            "local": {k: v.to_local().clone() for k, v in sharded.items()},
            "global_step": trainer.global_step,
            "optimizer": get_optimizer_state_dict(
                module,
                trainer.optimizers[0],
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            ),
        }
        if moment == "start":  # a collective on the sharded model: both ranks hash
            lora = next(c for c in trainer.callbacks if isinstance(c, LoRACallback))
            record["fingerprint"] = {"setup": lora.fingerprint, "sharded": base_fingerprint(module)}
            names = {id(p): n for n, p in module.named_parameters()}
            record["optimized"] = [
                names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]
            ]
            record["sharded"] = {n: is_dtensor(p) for n, p in module.named_parameters()}
        if moment == "end":
            module.eval()
            with torch.no_grad():
                record["logits"] = module.model(input_ids=PROBE_IDS).logits.clone()
        torch.save(record, self.out / f"{self.run}_{moment}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def run(
    out: Path,
    name: str,
    *,
    distributed: bool,
    steps: int = 4,
    ckpt_path: Path | None = None,
    r: int = 2,
    merge_on_end: bool = False,
    devices: int = 2,
) -> pl.Trainer:
    callback = LoRACallback(
        target_modules=TARGETS,
        r=r,
        adapter_dir=out / f"{name}_adapter",
        merge_on_end=merge_on_end,
    )
    checkpoint = ModelCheckpoint(dirpath=out / f"{name}_ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(
            data_parallel_size=devices,
            tensor_parallel_size=1,
            save_distributed_checkpoint=distributed,
        ),
        max_steps=steps,
        callbacks=[callback, Probe(out, name), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(LlamaModule(), ckpt_path=ckpt_path)
    return trainer


def main(out: Path) -> None:
    run(out, "dist", distributed=True, merge_on_end=True)
    run(out, "dist_resume", distributed=True, ckpt_path=out / "dist_ckpt" / STEP2)
    run(out, "file", distributed=False)
    run(out, "file_resume", distributed=False, ckpt_path=out / "file_ckpt" / STEP2)
    if (out / "single.ckpt").is_file():
        run(out, "from_single", distributed=True, steps=3, ckpt_path=out / "single.ckpt")
    if (out / "one_ckpt").is_dir():
        run(out, "from_one", distributed=True, steps=3, ckpt_path=out / "one_ckpt" / STEP2)
    try:
        run(
            out,
            "mismatch",
            distributed=True,
            r=4,
            ckpt_path=out / "dist_ckpt" / STEP2,
        )
    except CheckpointMismatchError as err:
        torch.save({"error": str(err)}, out / "mismatch_error.pt")


def one_process(out: Path, phase: str) -> None:
    if phase == "one":
        run(out, "one", distributed=True, steps=2, devices=1)
    else:
        folder = out / "dist_ckpt" / STEP2
        run(out, "to_one", distributed=True, steps=3, devices=1, ckpt_path=folder)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        one_process(Path(sys.argv[1]), sys.argv[2])
    else:
        main(Path(sys.argv[1]))
