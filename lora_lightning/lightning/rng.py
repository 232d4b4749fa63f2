"""The global random state of every rank, saved with a checkpoint and restored on resume.

Owns :class:`RNGStateCallback`: its ``state_dict`` holds the global RNG states (torch CPU, CUDA
where present, NumPy if importable, Python's ``random``) of every rank, and a resumed fit
restores each rank's own at ``on_train_start``. Dropout masks come from these generators, so
without them a resume with dropout > 0 trains on other masks than the uninterrupted run.
:class:`LoRACallback` is one (it subclasses this), so a plain ``Trainer`` with it resumes
exactly; a run without LoRA (full fine-tuning) can add ``RNGStateCallback()`` itself.

Per rank: saving is a collective (``all_gather_object``) that every rank reaches, as it reaches
``Trainer.save_checkpoint``; the checkpoint stores ``{"world_size": n, "states": [rank 0, ...,
rank n-1]}`` and each rank takes its own on resume. Resumed with another number of processes,
no state is restored and every rank keeps the one it has (a warning says so): the data each
rank sees differs then anyway, so the run cannot repeat the uninterrupted one.

Must not import: ``app/``, Hydra, W&B.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

RNG_KEY = "rng"


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, Python, NumPy), in types a weights-only
    ``torch.load`` accepts (NumPy's key array as an int64 tensor)."""
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
    """Restore what :func:`rng_state` returned (CUDA and NumPy where present here too)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))


def gather_rng_states() -> dict[str, Any]:
    """Every rank's :func:`rng_state`, indexed by global rank: ``{"world_size": n, "states":
    [...]}``. A collective when a process group is initialised: every rank must call it."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"world_size": 1, "states": [state]}
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return {"world_size": len(states), "states": states}


def restore_rng_states(saved: Any, rank: int, world_size: int) -> bool:
    """Set this process's RNG state to rank ``rank``'s in ``saved`` (what
    :func:`gather_rng_states` returned); True if restored.

    Nothing is restored (False, with a warning) when ``saved`` was written by another number
    of processes or is not in that form: the run then continues with its current state.
    """
    states = saved.get("states") if isinstance(saved, dict) else None
    if not isinstance(states, list) or saved.get("world_size") != len(states):
        rank_zero_warn(
            "the checkpoint's random state is malformed; the resumed run keeps its own random "
            "state, so dropout masks differ from an uninterrupted run's"
        )
        return False
    if len(states) != world_size:
        rank_zero_warn(
            f"the checkpoint holds the random state of {len(states)} process(es), this run has "
            f"{world_size}: no random state is restored, so dropout masks (and the data each "
            "rank sees) differ from an uninterrupted run's; resume with the same number of "
            "processes for an exact continuation"
        )
        return False
    set_rng_state(states[rank])
    return True


class RNGStateCallback(pl.Callback):
    """Saves every rank's global RNG states in the checkpoint and restores them on resume.

    Restored at ``on_train_start``: after the sanity check and the creation of the training
    iterator, which consume random numbers in the resumed run only, and before the first
    resumed step, so the run continues with exactly the state the checkpoint was taken with
    (between two training steps). The position in the data is Lightning's and the loader's
    (a loader with ``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._rng_to_restore: Any = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning calls this on every rank while dumping a checkpoint (weights-only saves
        # skip it: no resume from those).
        return {RNG_KEY: gather_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get(RNG_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_to_restore is not None:
            saved, self._rng_to_restore = self._rng_to_restore, None
            restore_rng_states(saved, trainer.global_rank, trainer.world_size)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A state loaded by validate/test(ckpt_path=) must not leak into a later fit.
        self._rng_to_restore = None


__all__ = ["RNGStateCallback", "gather_rng_states", "restore_rng_states", "rng_state"]
