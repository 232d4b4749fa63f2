"""What the terminal shows, and what ``<output_dir>/train.log`` keeps.

Owns: routing Lightning's and transformers' loggers (and Python warnings) through the handlers
Hydra configures from ``conf/hydra/job_logging/app.yaml`` (console + ``train.log``), the filter
that keeps known dependency noise off the console (``train.log`` still gets it), the training
progress bar (:class:`ProgressBar`), and the final block printed last. Must not import W&B, Hydra
or the default task.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("lora_lightning.app")

#: Console lines that carry no information for this application's users (kept in train.log).
NOISE = (
    re.compile(r"💡 Tip: "),  # Lightning advertising its cloud products
    re.compile(r"Loading `train_dataloader` to estimate number of stepping batches"),
    re.compile(r"`Trainer\(val_check_interval=1\.0\)` was configured"),
    re.compile(r"isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning on torch >= 2.10
    # torchao (the quant extra), imported by transformers whenever it loads a model: its GPU
    # kernels built for another torch, and its enums registered the way torch 2.13 deprecates.
    re.compile(r"Failed to load .*torchao.*Could not load this library"),
    re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    re.compile(r"Detected no triton"),  # torchao on a machine without Triton (CPU)
    # Lightning's accelerator census (the final block and train.log say what ran) and its
    # warning on every resume that the run's own checkpoint folder holds checkpoints.
    re.compile(r"^(GPU|TPU|HPU|IPU) available: "),
    re.compile(r"Checkpoint directory .* exists and is not empty"),
)


class ConsoleNoiseFilter(logging.Filter):
    """Drops the records matching :data:`NOISE` from the console (never edits a record: the
    same record reaches ``train.log`` afterwards)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in NOISE)


class ConsoleFormatter(logging.Formatter):
    """The console's formatter: the message alone, with transformers' load report (``<Model>
    LOAD REPORT`` and a table of new or unused weights) shortened to its first line; the full
    report is formatted into ``train.log`` by the file handler's own formatter."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name.startswith("transformers") and "LOAD REPORT" in message:
            first = re.sub(r"\x1b\[[0-9;]*m", "", message).strip().splitlines()[0]
            return f"{first.strip()} (full report in train.log)"
        return message


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, which also labels the epoch a job resumes in the middle of.

    Lightning does not call ``on_train_epoch_start`` for an epoch restored mid-way from a
    checkpoint, and that hook is where the bar gets its length and its ``Epoch N`` label: a
    resumed job's bar read ``Training: 6/?`` until the next epoch. Here the bar gets both when
    training starts, for that epoch only (the next epochs start as usual).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        loop = trainer.fit_loop
        if not (loop.restarted_mid_epoch or loop.restarted_on_epoch_end):
            return
        total = self.total_train_batches
        bar = self.train_progress_bar
        bar.reset(total=total if math.isfinite(total) else None)
        bar.initial = 0
        bar.set_description(f"Epoch {trainer.current_epoch}")


def route_dependency_logs() -> None:
    """Send Lightning's, torch's, transformers' and Python's warnings through Hydra's log
    handlers (so the console filter applies and ``train.log`` gets them).

    Lightning and torch give their loggers a handler of their own and stop propagation when
    imported before logging is configured (always, here), which left ``train.log`` empty.
    """
    # torch's loggers, too: torch gives its root logger a stderr handler of its own.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
    os.environ.setdefault("WANDB_QUIET", "true")  # W&B's banner and run summary off the console
    # ...and its remaining "wandb: ..." lines (offline mode, the deprecated anonymous setting,
    # where the run went): the final block says where the run is and how to sync it.
    os.environ.setdefault("WANDB_SILENT", "true")
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()  # "Loading weights" bars, on every model load


def final_block(
    summary: dict[str, Any],
    lora: dict[str, Any] | None,
    wandb_dir: str | None,
    artifact: str | None,
) -> str:
    """The last lines of a job: LoRA counts, metrics, where everything was written, wall time."""
    counts = summary["parameters"]
    lines = []
    if lora is not None:
        lines.append(
            f"  LoRA         r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']}, "
            f"{counts['adapted_modules']} adapted modules"
        )
    lines.append(
        f"  trainable    {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({counts['trainable_percent']:.2f}%)"
    )
    lines += [f"  {key:<12} {value:.4f}" for key, value in sorted(summary["metrics"].items())]
    lines.append(f"  adapter      {summary['adapter_dir']}")
    lines.append(f"  results      {summary['output_dir']}/results.json")
    if wandb_dir is not None:
        lines.append(f"  W&B offline  wandb sync {wandb_dir}")
    if artifact is not None:
        lines.append(f"  artifact     {artifact} (W&B, type model)")
    lines.append(f"  wall time    {summary['wall_time_s']} s")
    return "Finished\n" + "\n".join(lines)
