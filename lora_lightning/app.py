"""The Hydra application behind ``python train.py``: config in, trained adapter out.

Everything is built from the composed config with ``_target_`` instantiation; the only LoRA
wiring is here: the ``lora`` group (a validated :class:`LoRAConfig`) becomes a
:class:`LoRACallback`. Deleting the group (``python train.py '~lora'``) trains the same task
with full fine-tuning, which the experiments use as the baseline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lightning import LoRACallback, LoRAConfig, count_parameters

#: Configs of a source checkout (``pip install -e .``), used by the console script.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """Register :class:`LoRAConfig` as ``lora/schema`` so the ``lora`` group is type-checked."""
    ConfigStore.instance().store(group="lora", name="schema", node=LoRAConfig)


def run(
    cfg: DictConfig, prepare_model: Callable[[pl.LightningModule], Any] | None = None
) -> float | None:
    """Train and evaluate one job; return ``cfg.optimized_metric`` for sweepers.

    ``prepare_model(model)``, if given, runs on the instantiated model before training (the
    experiments use it to put Hugging Face PEFT in place of this project, as a baseline).

    Writes, in the job's output folder: the adapter (``adapter/``), checkpoints with their
    adapters, logger files, and ``results.json`` (metrics, counts, adapter path, wall time).
    """
    started = time.perf_counter()
    environment = dict(os.environ)
    os.environ.setdefault("WANDB_MODE", "offline")  # never require an account or network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _prepare_ddp_relaunch_in_multirun()
    _fill_run_names(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    if prepare_model is not None:
        prepare_model(model)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    lora_callback = None
    if cfg.get("lora") is not None:
        lora = OmegaConf.to_container(cfg.lora, resolve=True)
        lora_callback = LoRACallback(config=lora, **cfg.get("lora_export", {}))
        callbacks.insert(0, lora_callback)
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule)
        metrics = _floats(trainer.callback_metrics)
        if cfg.get("test", True):
            trainer.test(model, datamodule=datamodule)
            metrics.update(_floats(trainer.callback_metrics))
        counts = count_parameters(model)
        adapter_dir = lora_callback.last_adapter_dir if lora_callback else None
        summary = {
            "metrics": metrics,
            "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "adapter_bytes": _bytes_in(adapter_dir) if adapter_dir else None,
            "parameters": {**asdict(counts), "trainable_percent": counts.trainable_percent},
            "wall_time_s": round(time.perf_counter() - started, 1),
            "output_dir": cfg.paths.output_dir,
            "overrides": list(HydraConfig.get().overrides.task),
        }
        if trainer.is_global_zero:
            Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.paths.output_dir) / "results.json").write_text(
                json.dumps(summary, indent=2) + "\n"
            )
        _print_summary(summary)
    finally:
        _finish_wandb()
        _reset_distributed(environment)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def _fill_run_names(cfg: DictConfig) -> None:
    """W&B run name from the job's overrides; one group per multirun sweep."""
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    with open_dict(cfg):
        if cfg.paths.get("run_name") is None:
            cfg.paths.run_name = "-".join([cfg.task_name, *overrides])[:128]
        if cfg.paths.get("group") is None:
            sweep = Path(hydra_cfg.sweep.dir).parts[-2:]
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            cfg.paths.group = "-".join([cfg.task_name, *sweep]) if multirun else cfg.task_name


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
    return {key: float(value) for key, value in metrics.items()}


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"  {k:<12} {v:.4f}" for k, v in sorted(summary["metrics"].items())]
    lines.append(f"  adapter      {summary['adapter_dir']}")
    lines.append(f"  results      {summary['output_dir']}/results.json")
    lines.append(f"  wall time    {summary['wall_time_s']} s")
    rank_zero_info("Finished\n" + "\n".join(lines))


def _finish_wandb() -> None:
    # One W&B run per job: without finish() the next job of a sweep would reuse this run.
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console-script entry point (``lora-lightning-train``), same as ``python train.py``."""
    return run(cfg)
