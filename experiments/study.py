"""What the quality studies (``experiments/sst2_quality``, ``experiments/llm_sft``) share: the
machine a study ran on, its rows written as JSON and CSV, and the PEFT-baseline entry point
(the app's job with ``peft.get_peft_model`` in place of lora_lightning)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine(quick: bool, **extra: Any) -> dict[str, Any]:
    """The machine and time of a study's report (``quick``: a smoke run's numbers)."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        **extra,
        "python": platform.python_version(),
        "versions": package_versions(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
    }


def package_versions() -> dict[str, str]:
    """The installed versions of what a study's numbers depend on (missing ones left out)."""
    names = ("torch", "transformers", "peft", "lightning", "tokenizers", "gguf")
    return {name: version for name in names if (version := installed_version(name))}


def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None if it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_rows(rows: list[dict], machine_info: dict[str, Any], out: Path) -> None:
    """``results.json`` (machine + rows) and ``results.csv`` (one line a row) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine_info, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as handle:
        # Every row's fields, in first-seen order: rows recorded by an older runner may lack
        # a field a newer one adds (left empty there).
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peft_main(peft_lora: dict[str, Any]) -> Callable[[], Any]:
    """``python train.py``'s Hydra entry point with ``peft.get_peft_model(model,
    LoraConfig(**peft_lora))`` put on the task's Hugging Face model before training (run it with
    ``'~lora'``, so that our callback is not there too)."""
    import hydra
    import lightning.pytorch as pl
    from omegaconf import DictConfig

    from lora_lightning.app import CONF_DIR, register_configs, run

    def use_peft(module: pl.LightningModule) -> None:
        from peft import LoraConfig, get_peft_model

        module.model = get_peft_model(module.model, LoraConfig(**peft_lora))

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
    def main(cfg: DictConfig) -> float | None:
        return run(cfg, prepare_model=use_peft)

    return main
