"""Resume and preemption: which checkpoint a job continues from, and what "time is up" does.

Owns: :func:`resume_checkpoint` (``ckpt_path=`` or ``resume=auto``) and :class:`Preemption`, a
Lightning callback through which every way a cluster says "time is up" takes one path: the
job finishes the current training step, writes a checkpoint there, and ends as its launcher
expects. The signals:

- SIGTERM (any scheduler before it kills a job; SLURM at the time limit or on ``scancel``):
  ``checkpoints/preempted.ckpt``, then the app exits with status 143.
- SLURM's requeue signal under Lightning's ``SLURMEnvironment`` (SIGUSR1, asked for with
  ``sbatch --signal=USR1@90``): Lightning's own handler runs at the step boundary instead of
  mid-step: it writes ``hpc_ckpt_<n>.ckpt`` in the run folder and requeues the job
  (``scontrol requeue``); the app then exits with status 143.
- submitit's signal (USR2, or ``SUBMITIT_PREEMPT_SIGNAL``; ``hydra/launcher=slurm`` and
  ``submitit_local``): ``checkpoints/preempted.ckpt``, then submitit's own handler ends the job
  (:meth:`Preemption.end_job`): it requeues it (SLURM: exit status 255; the local executor
  restarts a task that exits 144) or, after ``max_num_timeout`` timeouts, raises submitit's
  ``UncompletedJobError``.

A launcher's signal is taken over only when that launcher installed a handler for it in this
process.

With several processes (DDP, FSDP2) the signal may reach one rank (a scheduler's ``kill`` of
the launching process), or every rank at different moments (SLURM, torchrun): the processes
must still stop at the same step and write the checkpoint together, since saving is a
collective. Lightning's own SIGTERM handler cannot promise that (2.6: it calls
``dist.broadcast`` inside the handler, once per signal a rank receives, wherever that rank was
interrupted, and each rank leaves the loop on its own flag; one rank then waits in a collective
the others never make). So :class:`Preemption` replaces it for the duration of ``fit``: a
handler only records the request, and at every training step's (and epoch's) end the ranks
all-reduce (max) what they recorded; the first such point where any rank has one is where all
of them stop.

Exactness needs two things Lightning leaves to the user: the global RNG states (dropout
masks), saved and restored per rank by ``LoRACallback`` (``RNGStateCallback`` for a run without
LoRA), and a training dataloader that skips the batches of the interrupted epoch already
trained on, which this module provides.
``resume=auto`` picks the newest checkpoint of the run folder, whichever signal wrote it.

Must not import W&B, Hydra, submitit or the default task.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

#: Written on SIGTERM and submitit's signal, in the run's checkpoint folder.
PREEMPTED_NAME = "preempted.ckpt"
#: Lightning's SLURM requeue handler runs here; its checkpoint is ``hpc_ckpt_<n>.ckpt``.
LIGHTNING_SLURM = "Lightning's SLURM requeue"
#: submitit's handler runs after the checkpoint is written (:meth:`Preemption.end_job`).
SUBMITIT = "submitit"
#: Who can ask to stop (None: SIGTERM), as the ranks encode it to agree: request ``i + 1``.
#: When ranks were asked by different ones the highest wins: a launcher's signal also says how
#: the job must end, SIGTERM only that it must.
_ASKERS: tuple[str | None, ...] = (None, LIGHTNING_SLURM, SUBMITIT)


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
    Lightning also sees the loader as stateful, so it does not warn about mid-epoch resumes,
    and saves and restores this state itself.

    The state also holds the states of the loader's random generators (its own, for the
    workers' seeds, and its sampler's: a ``RandomSampler(generator=...)`` draws each epoch's
    order from it) as they were when the interrupted epoch began, or as they are now between
    epochs: a loader rebuilt on resume starts its generators from their seeds, so without them
    an epoch after the first would be read in the first epoch's order.
    """

    batches_done = 0
    _skip = 0
    # Generator states when the current epoch's iteration began; to restore at the next one.
    _epoch_start: list[torch.Tensor] | None = None
    _restore: list[torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        mid_epoch = 0 < self.batches_done < len(self)
        states = self._epoch_start if mid_epoch else None
        if states is None:
            states = [generator.get_state() for generator in self._generators()]
        return {"batches_done": self.batches_done if mid_epoch else 0, "generators": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skip = state.get("batches_done", 0)
        self._restore = state.get("generators")

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        restore, self._restore = self._restore, None
        generators = self._generators()
        if restore is not None and len(restore) == len(generators):
            for generator, saved in zip(generators, restore, strict=True):
                generator.set_state(saved)
        elif restore is not None:
            log.warning(
                f"resume: the checkpoint holds {len(restore)} train-loader random generator "
                f"state(s), this loader has {len(generators)}; its order starts from its seeds"
            )
        self._epoch_start = [generator.get_state() for generator in generators]
        self.batches_done = skip
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        yield from batches

    def _generators(self) -> list[torch.Generator]:
        """The loader's generator and its sampler's, each once, in that order."""
        found: list[torch.Generator] = []
        for generator in (self.generator, getattr(self.sampler, "generator", None)):
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found


class Preemption(pl.Callback):
    """Stops training at the step boundary when time is up (SIGTERM, SLURM's requeue signal
    under Lightning, submitit's signal) and writes the checkpoint there; on resume, skips the
    interrupted epoch's batches already trained on (the RNG states are the LoRA callback's, or
    ``RNGStateCallback``'s without LoRA).

    With several processes every rank stops at the same step, whichever ranks got the signal
    and when: the signal handlers only record it, and the ranks agree at each training step's
    end (an all-reduce of one integer; none with one process).

    Call :meth:`attach` on the datamodule before training, and :meth:`end_job` after ``fit``
    raised ``SIGTERMException``.

    Args:
        dirpath: where ``preempted.ckpt`` is written (the run's checkpoint folder).

    Attributes:
        saved: the checkpoint written when time was up (None before).
        launcher: who asked to stop: None (SIGTERM), :data:`LIGHTNING_SLURM` or :data:`SUBMITIT`.
        signal_name: the signal that asked (``"SIGTERM"`` unless a launcher's).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self.launcher: str | None = None
        self.signal_name = "SIGTERM"
        # The launchers' own handlers of their signals: launcher -> (signal, handler).
        self._taken_over: dict[str, tuple[int, Callable[[int, FrameType | None], Any]]] = {}
        # Each launcher's signal (whether or not its handler is in this process), for names.
        self._launcher_signals: dict[str, int] = {}
        # What this rank was asked (0: nothing; i + 1: _ASKERS[i]), written by the handlers.
        self._asked = 0
        # The SIGTERM handler of this process before fit (Lightning's handler chained it too).
        self._sigterm_before_fit: Any = None
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
        self._agree_to_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during the epoch's last validation: Lightning stops after the epoch.
        self._agree_to_stop(trainer)

    def state_dict(self) -> dict[str, Any]:
        done = [loader.state_dict()["batches_done"] for loader in _train_loaders(self._trainer)]
        return {"batches_done": max(done, default=0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skip_on_resume = state_dict.get("batches_done", 0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":
            self._asked = 0
            # Lightning installs its own handlers later in fit (and restores this one after).
            self._sigterm_before_fit = signal.getsignal(signal.SIGTERM)

    # Lightning has installed its handlers by the first of these two (and restores the earlier
    # ones, ours gone, when fit ends); the sanity check runs before training starts.
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over_signals(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over_signals(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.launcher == LIGHTNING_SLURM:
            signum, handler = self._taken_over[LIGHTNING_SLURM]
            handler(signum, None)  # hpc_ckpt_<n>.ckpt and scontrol requeue, now at the boundary
            written = Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
            self.saved = max(written, key=lambda path: path.stat().st_mtime_ns, default=None)
        else:
            path = self.dirpath / PREEMPTED_NAME
            # Every rank takes part; rank 0 writes.
            trainer.save_checkpoint(path, weights_only=False)
            self.saved = path
        log.info(f"{self.signal_name}: checkpoint saved to {self.saved}")

    def end_job(self) -> None:
        """End the job as the launcher that asked to stop expects; return if that is the app's
        to do (SIGTERM, Lightning's requeue: exit status 143).

        For submitit this runs submitit's own handler, now that the checkpoint is written: it
        requeues the job and exits, or raises ``UncompletedJobError`` when the job timed out
        more often than ``max_num_timeout`` allows (or cannot be requeued).
        """
        # (A rank Lightning started itself has no submitit handler: it just exits.)
        if self.launcher == SUBMITIT and SUBMITIT in self._taken_over:
            signum, handler = self._taken_over[SUBMITIT]
            log.info(f"{signal.Signals(signum).name}: handing the job back to submitit")
            handler(signum, None)

    def _take_over_signals(self, trainer: pl.Trainer) -> None:
        """Install :meth:`_on_sigterm` in place of Lightning's SIGTERM handler, and route each
        launcher's "time is up" signal through :meth:`_time_is_up`, keeping the launcher's
        handler to run at the step boundary (a handler runs between any two Python bytecodes:
        a checkpoint written there can be half a step). Once per fit."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python installs signal handlers from the main thread only
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            return  # already done in this fit
        candidates: dict[str, int] = {}
        if os.environ.get("SUBMITIT_EXECUTOR"):  # set by submitit in the jobs it runs
            # submitit reads the same variable (JobEnvironment.USR_SIG).
            name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
            candidates[SUBMITIT] = getattr(signal, f"SIG{name}")
        if SLURMEnvironment.detect():
            environment = getattr(trainer.strategy, "cluster_environment", None)
            requeue = signal.SIGUSR1  # SLURMEnvironment's default (single-device strategies too)
            if isinstance(environment, SLURMEnvironment) and environment.requeue_signal:
                requeue = environment.requeue_signal
            # Lightning installs no handler of its own on a signal submitit already handles.
            if requeue not in candidates.values():
                candidates[LIGHTNING_SLURM] = requeue
        self._launcher_signals = candidates
        self._taken_over = {}
        for launcher, signum in candidates.items():
            handler = signal.getsignal(signum)
            if callable(handler):
                self._taken_over[launcher] = (signum, handler)
                signal.signal(signum, self._time_is_up)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM during fit: record it for the step boundary (no collective here: a handler
        runs wherever this rank happened to be), then run the handler this process had before
        fit, as Lightning's handler did."""
        self._record(None)
        if callable(self._sigterm_before_fit):
            self._sigterm_before_fit(signum, frame)

    def _time_is_up(self, signum: int, frame: FrameType | None) -> None:
        """A launcher's signal: stop after this step as on SIGTERM, remembering who asked."""
        self._record(next(k for k, (s, _) in self._taken_over.items() if s == signum))

    def _record(self, launcher: str | None) -> None:
        request = _ASKERS.index(launcher) + 1
        if request > self._asked:
            self._asked = request
            named = f" ({launcher})" if launcher else ""
            log.info(f"{self._signal_of(launcher)}{named}: stopping after this step")

    def _agree_to_stop(self, trainer: pl.Trainer) -> None:
        """At each training step's (and epoch's) end, on every rank: when any rank was asked to
        stop, all of them stop after this step, for the launcher with the highest request (so
        every rank writes the same checkpoint and ends the same way). A signal during a
        validation inside an epoch waits for the next step's end; one after the last epoch's
        end is not acted on (the job finishes, and after ``fit`` SIGTERM has its earlier
        handler again).

        Stopping is Lightning's: its loops raise ``SIGTERMException`` after the step when its
        SIGTERM flag is set, the flag its own handler would have set; here it is set on every
        rank at the same step. Under several processes this is a collective, so every rank
        calls it at every step; with one it costs nothing.
        """
        asked = self._asked
        if trainer.world_size > 1:
            request = torch.tensor(asked, device=trainer.strategy.root_device)
            asked = int(trainer.strategy.reduce(request, reduce_op="max").item())
        if asked and not trainer.received_sigterm:
            self.launcher = _ASKERS[asked - 1]
            self.signal_name = self._signal_of(self.launcher)
            trainer._signal_connector.received_sigterm = True
            if not trainer.received_sigterm:  # a Lightning release that keeps it elsewhere
                raise RuntimeError(
                    f"lightning {pl.__version__}: Trainer.received_sigterm is not read from "
                    "trainer._signal_connector.received_sigterm, so the preemption callback "
                    "cannot stop training; lora_lightning.app.signals needs updating"
                )

    def _signal_of(self, launcher: str | None) -> str:
        signum = self._launcher_signals.get(launcher) if launcher else None
        return signal.Signals(signum).name if signum is not None else "SIGTERM"


def _train_loaders(trainer: pl.Trainer | None) -> list[_ResumableLoader]:
    loaders = trainer.train_dataloader if trainer is not None else None
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [loader for loader in loaders if isinstance(loader, _ResumableLoader)]
