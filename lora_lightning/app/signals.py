"""Resume and preemption: which checkpoint a job continues from, and what SIGTERM does.

Owns: :func:`resume_checkpoint` (``ckpt_path=`` or ``resume=auto``) and :class:`Preemption`, a
Lightning callback that, when Lightning reports SIGTERM (what schedulers send before killing a
job), saves ``checkpoints/preempted.ckpt`` so that the job can exit non-zero and a rerun
continues exactly where it stopped. Exactness needs two things Lightning leaves to the user: the
global RNG state (dropout masks) is saved with the checkpoint and restored when training
resumes, and the training dataloader skips the batches of the interrupted epoch that were
already trained on. Lightning's own SLURM requeue handler (SIGUSR1 under SLURM) writes
``hpc_ckpt_<n>.ckpt``, which ``resume=auto`` picks up too.

Must not import W&B, Hydra or the default task.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

#: Written on SIGTERM, in the run's checkpoint folder.
PREEMPTED_NAME = "preempted.ckpt"


def checkpoint_dir(output_dir: str | Path) -> Path:
    """The run's checkpoint folder (the one ``callbacks/default.yaml`` writes to)."""
    return Path(output_dir) / "checkpoints"


def resume_checkpoint(
    ckpt_path: str | None, resume: str | None, output_dir: str | Path
) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, or with ``resume="auto"`` the newest of the
    run folder's ``checkpoints/last.ckpt``, ``checkpoints/preempted.ckpt`` and SLURM's
    ``hpc_ckpt_*.ckpt``, files or distributed checkpoint folders (``trainer=fsdp``); None when
    there is none: the job starts fresh."""
    if ckpt_path is not None or resume != "auto":
        return ckpt_path
    folder = checkpoint_dir(output_dir)
    found = [folder / "last.ckpt", folder / PREEMPTED_NAME, *Path(output_dir).glob("hpc_ckpt_*")]
    # A distributed (FSDP2) checkpoint is a folder, rewritten in place: its meta.pt, written
    # last by every save, dates it.
    written = {path: path / "meta.pt" if path.is_dir() else path for path in found}
    found = [path for path, stamp in written.items() if stamp.is_file()]
    if not found:
        log.info(f"resume=auto: no checkpoint in {output_dir} yet, starting fresh")
        return None
    return str(max(found, key=lambda path: written[path].stat().st_mtime_ns))


class _ResumableLoader(DataLoader):
    """A DataLoader that skips, on its next iteration, the batches already trained on.

    ``batches_done`` (batches of the current epoch whose training step finished) is kept by
    :class:`Preemption`, which saves it with the checkpoint and sets ``_skip`` from it on resume.
    Lightning also sees the loader as stateful, so it does not warn about mid-epoch resumes.
    """

    batches_done = 0
    _skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done if self.batches_done < len(self) else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state.get("batches_done", 0)

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self.batches_done = skip
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        yield from batches


class Preemption(pl.Callback):
    """Saves a checkpoint when Lightning reports SIGTERM; on resume, restores the RNG state and
    skips the interrupted epoch's batches already trained on.

    Call :meth:`attach` on the datamodule before training.

    Args:
        dirpath: where ``preempted.ckpt`` is written (the run's checkpoint folder).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._skip_on_resume = 0
        self._trainer: pl.Trainer | None = None

    def attach(self, datamodule: pl.LightningDataModule) -> None:
        """Make ``datamodule.train_dataloader()`` resumable (same batches, same order).

        The loader also gets its own generator for the workers' base seed: a plain DataLoader
        draws it from the global RNG, which a new epoch's iterator must not consume differently
        in a resumed run than in an uninterrupted one.
        """
        original = datamodule.train_dataloader

        def train_dataloader() -> Any:
            loader = original()
            if type(loader) is DataLoader:
                if loader.generator is None:
                    loader.generator = torch.Generator().manual_seed(torch.initial_seed())
                loader.__class__ = _ResumableLoader
                # Lightning restores callbacks before it first asks for the loader.
                loader._skip, self._skip_on_resume = self._skip_on_resume, 0
            return loader

        object.__setattr__(datamodule, "train_dataloader", train_dataloader)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        for loader in _train_loaders(trainer):
            loader.batches_done = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        # Taken when the checkpoint is written: between two training steps, where the
        # uninterrupted run continues with exactly this RNG state.
        done = [loader.state_dict()["batches_done"] for loader in _train_loaders(self._trainer)]
        return {"rng": rng_state(), "batches_done": max(done, default=0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")
        self._skip_on_resume = state_dict.get("batches_done", 0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the sanity check and the train iterator's creation, which consume the RNG in
        # the resumed run only.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.dirpath / PREEMPTED_NAME
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank 0 writes
        self.saved = path
        log.info(f"SIGTERM: checkpoint saved to {path}")


def _train_loaders(trainer: pl.Trainer | None) -> list[_ResumableLoader]:
    loaders = trainer.train_dataloader if trainer is not None else None
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [loader for loader in loaders if isinstance(loader, _ResumableLoader)]


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, Python, NumPy) in types a weights-only load accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))
