"""One job of ``python train.py``: config in, trained adapter out.

Owns :func:`run` (check, build, fit, test, report) and :func:`main` (the Hydra entry point of
``train.py`` and the ``lora-lightning-train`` console script). Everything is built from the
composed config with ``_target_`` instantiation; the only LoRA wiring is here: the ``lora``
group (a validated :class:`LoRAConfig`) and ``lora_export`` become a :class:`LoRACallback`.
Deleting the group (``python train.py '~lora'``) trains the same task with full fine-tuning,
which the experiments use as the baseline. Imports the library's public API only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lightning import LoRACallback, RNGStateCallback, count_parameters
from lora_lightning.app import checks, console, signals, tracking
from lora_lightning.app.config import CONF_DIR, register_configs
from lora_lightning.app.errors import PREEMPTED_EXIT, Preempted, report
from lora_lightning.app.final_step import FinalStep

log = logging.getLogger("lora_lightning.app")


def run(
    cfg: DictConfig, prepare_model: Callable[[pl.LightningModule], Any] | None = None
) -> float | None:
    """Train and evaluate one job; return ``cfg.optimized_metric`` for sweepers.

    Every config value that can be checked cheaply is checked before the model loads: LoRA and
    export fields, resume settings, data files, then the trainer, the logger and the datamodule
    are built (their constructors check their arguments), and the model last.
    ``prepare_model(model)``, if given, runs on the model before training (the experiments use it
    to put Hugging Face PEFT in place of this project, as a baseline).

    Writes, in the job's output folder: the adapter (``adapter/``), checkpoints with their
    adapters, ``train.log``, logger files, and ``results.json`` (metrics, counts, adapter path,
    wall time).

    Raises:
        ConfigError, LoRAError: a bad config value (``main`` prints it as one line).
        Preempted: SIGTERM or SLURM's requeue signal stopped training after a checkpoint was
            saved (``checkpoints/preempted.ckpt``, ``hpc_ckpt_<n>.ckpt``). Under submitit its
            signal ends the job as submitit does instead (requeue and exit, or
            ``UncompletedJobError``), after the checkpoint.
    """
    started = time.perf_counter()
    environment = dict(os.environ)
    os.environ.setdefault("WANDB_MODE", "offline")  # never require an account or network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.route_dependency_logs()
    _prepare_ddp_relaunch_in_multirun()
    _fill_run_names(cfg)
    exit_code = 1
    stopped: Preempted | None = None
    try:
        job = _build(cfg, prepare_model)
        ckpt_path = signals.resume_checkpoint(
            cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir
        )
        if cfg.get("train", True):
            _fit(job, ckpt_path)
        metrics = _floats(job.trainer.callback_metrics)
        if cfg.get("test", True):
            test_ckpt = None if cfg.get("train", True) else ckpt_path
            job.trainer.test(
                job.model, datamodule=job.datamodule, ckpt_path=test_ckpt, verbose=False
            )
            metrics.update(_floats(job.trainer.callback_metrics))
        summary = _results(cfg, job, metrics, started)
        artifact = _log_artifact(cfg, job.lora)
        wandb_dir = tracking.offline_run_dir()
        exit_code = 0
    except Preempted as error:
        exit_code, stopped = PREEMPTED_EXIT, error
    finally:
        tracking.finish_run(exit_code)
        _reset_distributed(environment)
    if stopped is not None:
        job.preemption.end_job()  # submitit requeues or fails the job its own way
        raise stopped
    if job.trainer.is_global_zero:
        # Printed after W&B finished, so that it is the last thing on the terminal.
        lora = job.lora.config.to_dict() if job.lora is not None else None
        log.info(console.final_block(summary, lora, wandb_dir, artifact))
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


class _Job(NamedTuple):
    trainer: pl.Trainer
    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    lora: LoRACallback | None
    preemption: signals.Preemption


def _build(cfg: DictConfig, prepare_model: Callable[[pl.LightningModule], Any] | None) -> _Job:
    """Check the config and build the job, cheapest first and the model last."""
    checks.check_known_keys(cfg)
    lora_callback = checks.lora_callback(cfg)
    checks.check_resume(cfg)
    checks.check_files(cfg, "data")
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    preemption = signals.Preemption(signals.checkpoint_dir(cfg.paths.output_dir))
    # FinalStep: a run stopped between two validations or mid-epoch is validated at its last
    # step, and its checkpoints resume there.
    callbacks = [preemption, FinalStep(), *_instantiate_all(cfg, "callbacks")]
    # The RNG states for an exact resume: LoRACallback saves them; full fine-tuning ('~lora')
    # gets the same callback on its own.
    callbacks.insert(0, lora_callback if lora_callback is not None else RNGStateCallback())
    loggers = _instantiate_all(cfg, "logger")
    tracking.drop_unset_anonymous(loggers)
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = checks.instantiate(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    checks.warn_if_cpu_oversubscribed(trainer)
    datamodule = checks.instantiate(cfg, "data")
    preemption.attach(datamodule)
    model = checks.instantiate(cfg, "model")
    if prepare_model is not None:
        prepare_model(model)
    checks.check_targets(model, lora_callback)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    return _Job(trainer, datamodule, model, lora_callback, preemption)


def _fit(job: _Job, ckpt_path: str | None) -> None:
    """``trainer.fit``; "time is up" (a checkpoint was saved) becomes :class:`Preempted`."""
    if ckpt_path is not None:
        log.info(f"Resuming from {ckpt_path}")
    try:
        job.trainer.fit(job.model, datamodule=job.datamodule, ckpt_path=ckpt_path)
        _save_final_last(job.trainer)
    except SIGTERMException:
        # The event itself ("SIGTERM: checkpoint saved to ...") is logged by the Preemption
        # callback; the last line is what to do next.
        requeued = "job requeued; " if job.preemption.launcher == signals.LIGHTNING_SLURM else ""
        raise Preempted(
            f"{requeued}rerun the same command with resume=auto (and the same hydra.run.dir) "
            f"or ckpt_path={job.preemption.saved} to continue"
        ) from None


def _save_final_last(trainer: pl.Trainer) -> None:
    """Make ``last.ckpt`` the run's final step. ModelCheckpoint writes it after a validation
    (or at an epoch end); :class:`FinalStep` has the last step validated, but where Lightning
    validates nothing (``limit_val_batches=0``, an epoch ``check_val_every_n_epoch`` skips) a
    run stopped by ``trainer.max_steps`` would end with an older ``last.ckpt``, and "train a bit
    longer" with ``resume=auto`` would repeat steps. Every rank calls it (saving is
    collective); rank zero writes."""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
            continue
        if callback.dirpath is None or getattr(callback, "_last_global_step_saved", None) == (
            trainer.global_step
        ):
            continue
        name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        path = callback.last_model_path or os.path.join(callback.dirpath, name)
        callback.last_model_path = path  # before saving: it is part of the saved state
        trainer.save_checkpoint(path)


def _results(
    cfg: DictConfig, job: _Job, metrics: dict[str, float], started: float
) -> dict[str, Any]:
    """What ``results.json`` holds (and the sweep summary reads); written by global rank zero."""
    counts = count_parameters(job.model)
    adapter_dir = job.lora.last_adapter_dir if job.lora is not None else None
    summary = {
        "metrics": metrics,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "adapter_bytes": _bytes_in(adapter_dir) if adapter_dir else None,
        "parameters": {**asdict(counts), "trainable_percent": counts.trainable_percent},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "output_dir": cfg.paths.output_dir,
        "overrides": list(HydraConfig.get().overrides.task),
    }
    if job.trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _log_artifact(cfg: DictConfig, lora_callback: LoRACallback | None) -> str | None:
    if lora_callback is None or lora_callback.last_adapter_dir is None:
        return None
    if not cfg.get("lora_export", {}).get("log_artifact", True):
        return None
    return tracking.log_adapter_artifact(
        lora_callback.last_adapter_dir, metadata=lora_callback.config.to_dict()
    )


def _instantiate_all(cfg: DictConfig, group: str) -> list[Any]:
    nodes = cfg.get(group)
    if not nodes:
        return []
    return [
        checks.instantiate(cfg, f"{group}.{name}")
        for name, node in nodes.items()
        if node and "_target_" in node
    ]


def _fill_run_names(cfg: DictConfig) -> None:
    """W&B run name from the job's overrides; one group per multirun sweep; the W&B run id
    from the output folder (so a resumed job continues its run)."""
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    with open_dict(cfg):
        if cfg.paths.get("run_name") is None:
            cfg.paths.run_name = "-".join([cfg.task_name, *overrides])[:128]
        if cfg.paths.get("group") is None:
            sweep = Path(hydra_cfg.sweep.dir).parts[-2:]
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            cfg.paths.group = "-".join([cfg.task_name, *sweep]) if multirun else cfg.task_name
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None and wandb.get("_target_", "").endswith("WandbLogger"):
            # One W&B run per output folder: a job rerun in the same folder (resume=auto)
            # continues its run instead of opening a second one.
            if wandb.get("id") is None:
                folder = str(Path(cfg.paths.output_dir).resolve())
                wandb.id = "lora-" + hashlib.sha1(folder.encode()).hexdigest()[:16]
            if wandb.get("resume") is None:
                wandb.resume = "allow"


def _prepare_ddp_relaunch_in_multirun() -> None:
    """Make Lightning's DDP re-launch run *this* sweep job, not the whole sweep again.

    For ``strategy=ddp`` Lightning starts ranks > 0 as ``sys.argv`` plus
    ``hydra.run.dir=<HydraConfig run.dir>``. Inside a multirun job ``sys.argv`` still holds
    ``-m`` and the sweep (``lora.r=1,2,4``) and ``run.dir`` is not the job's folder, so the
    extra ranks would start a sweep of their own (Lightning issue 11300). Point both at the
    job: its own overrides, and its output folder as the run folder.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    flags = [
        a
        for a in sys.argv[1:]
        if a not in ("-m", "--multirun") and ("=" not in a or a.startswith("-"))
    ]
    sys.argv = [sys.argv[0], *flags, *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    with open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    OmegaConf.set_readonly(hydra_cfg, True)


def _reset_distributed(environment: dict[str, str]) -> None:
    """Leave no DDP state behind for the next job of a multirun in this process.

    Lightning's launcher exports ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``... and keeps
    the process group: the next job would then believe its ranks were started externally and
    talk to the previous job's (finished) processes.
    """
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def _bytes_in(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    # Without the learning rates LearningRateMonitor adds (lr-AdamW...): they are not results.
    return {key: float(value) for key, value in metrics.items() if not key.startswith("lr-")}


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python train.py`` and the ``lora-lightning-train`` console script.

    A config error, a library error or a missing optional dependency ends the job with one line
    on stderr and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback); a job stopped by
    SIGTERM or SLURM's requeue signal exits with 143 after saving a checkpoint (see
    :mod:`lora_lightning.app.signals`; submitit's signal ends the job as submitit does).
    """
    try:
        return run(cfg)
    except Exception as error:  # noqa: BLE001 - report() re-raises what is not the user's
        report(error)
