"""Evaluate saved adapters on a labelled TSV (``label<TAB>sentence``, SST-2 format).

    lora-lightning-eval outputs/<date>/<time>/adapter --data my_split.tsv
    lora-lightning-eval run1/adapter run2/adapter run3/adapter
    python -m lora_lightning.app.evaluate ...      # the same

Part of the application (it wires the default task to LoRA; the task itself knows nothing of
LoRA). The console gets what the training app's gets: dependency noise filtered, one line per
user error (``HYDRA_FULL_ERROR=1`` shows the traceback), and only the result rows on stdout.

Each adapter (PEFT format, ours or PEFT's) is loaded onto the base model with
:func:`lora_lightning.load_adapter`; with several directories the base model is built once,
every adapter is loaded by name and made active in turn
(:func:`lora_lightning.set_active_adapter`). One JSON row per adapter (accuracy, macro F1,
loss, with the adapter and data it was computed on) is printed; ``--json`` writes the same
rows to a file (one directory: its row; several: the list of rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import OmegaConf

from lora_lightning import load_adapter, set_active_adapter
from lora_lightning.app.config import CONF_DIR
from lora_lightning.app.console import ConsoleFormatter, ConsoleNoiseFilter, route_dependency_logs
from lora_lightning.app.errors import report


def evaluate(
    adapter_dir: str | Path,
    data: str | Path | None = None,
    *,
    model_name_or_path: str | None = None,
    num_labels: int = 2,
    batch_size: int = 128,
    max_length: int = 64,
    accelerator: str = "auto",
) -> dict[str, float]:
    """Accuracy, F1 and loss of base model + adapter on ``data`` (default: vendored SST-2 dev).

    Raises:
        AdapterFileError: if the adapter directory is missing, unreadable or does not fit.
        ValueError: if the TSV is malformed (the message names the file and line).
    """
    (metrics,) = evaluate_many(
        [adapter_dir],
        data,
        model_name_or_path=model_name_or_path,
        num_labels=num_labels,
        batch_size=batch_size,
        max_length=max_length,
        accelerator=accelerator,
    )
    return metrics


def evaluate_many(
    adapter_dirs: list[str | Path],
    data: str | Path | None = None,
    *,
    model_name_or_path: str | None = None,
    num_labels: int = 2,
    batch_size: int = 128,
    max_length: int = 64,
    accelerator: str = "auto",
) -> list[dict[str, float]]:
    """:func:`evaluate` for several adapters on one base model, built and tokenised once.

    Every adapter is checked and loaded (by name, its index) before the first is scored, so a
    bad directory fails fast. Returns the metrics of each adapter, in order.

    Raises:
        AdapterFileError: if an adapter directory is missing, unreadable or does not fit.
        ValueError: if the TSV is malformed (the message names the file and line).
    """
    # The default task through its config (conf/model, conf/data), as the training app.
    TextClassifier = _default_class("model", "minilm")  # noqa: N806 - a class
    SST2DataModule = _default_class("data", "sst2")  # noqa: N806 - a class

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    classifier = TextClassifier(model_name_or_path=model_name_or_path, num_labels=num_labels)
    if len(adapter_dirs) == 1:
        load_adapter(classifier.model, adapter_dirs[0])  # the single-adapter path, unchanged
    else:
        for index, directory in enumerate(adapter_dirs):
            load_adapter(classifier.model, directory, name=str(index))
    datamodule = SST2DataModule(
        tokenizer=model_name_or_path,
        test_file=data,
        eval_batch_size=batch_size,
        max_length=max_length,
    )
    rows = []
    for index in range(len(adapter_dirs)):
        if len(adapter_dirs) > 1:
            set_active_adapter(classifier.model, str(index))
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        (metrics,) = trainer.test(classifier, datamodule=datamodule, verbose=False)
        rows.append({key.removeprefix("test/"): float(value) for key, value in metrics.items()})
    return rows


def _default_class(group: str, name: str) -> Any:
    """The class the default config of ``group`` builds (its ``_target_``)."""
    return hydra.utils.get_class(OmegaConf.load(CONF_DIR / group / f"{name}.yaml")._target_)


class _NoLoadReport(logging.Filter):
    """transformers' load report lists the new classifier head as MISSING; here the adapter
    restores it (``modules_to_save``), so the report only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("transformers") and "LOAD REPORT" in record.getMessage())


def _quiet_console() -> None:
    """Warnings and errors of dependencies to stderr through the app's noise filter; stdout
    holds only the result rows."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ConsoleNoiseFilter())
    handler.addFilter(_NoLoadReport())
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    root = logging.getLogger()
    if not root.handlers:  # the command line (in a process with logging set up: left as is)
        root.setLevel(logging.WARNING)
    root.addHandler(handler)
    route_dependency_logs()


def main(argv: list[str] | None = None) -> None:
    """``lora-lightning-eval``: score adapters, print one JSON row each (see the module doc)."""
    parser = argparse.ArgumentParser(
        prog="lora-lightning-eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "adapter", nargs="+", help="adapter directories (adapter_config.json + safetensors)"
    )
    parser.add_argument("--data", help="labelled TSV or TSV.gz; default: vendored SST-2 dev")
    parser.add_argument("--model", help="base model directory; default: the bundled MiniLM")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--json", help="also write the metrics to this JSON file (several adapters: all rows)"
    )
    args = parser.parse_args(argv)
    _quiet_console()
    try:
        metrics = evaluate_many(
            args.adapter,
            args.data,
            model_name_or_path=args.model,
            num_labels=args.num_labels,
            batch_size=args.batch_size,
            max_length=args.max_length,
            accelerator=args.accelerator,
        )
    except Exception as error:  # noqa: BLE001 - report() re-raises what is not the user's
        report(error)
    rows = [
        {"adapter": adapter, "data": args.data or "sst2-dev", **values}
        for adapter, values in zip(args.adapter, metrics, strict=True)
    ]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        written = rows[0] if len(rows) == 1 else rows
        Path(args.json).write_text(json.dumps(written, indent=2) + "\n")


if __name__ == "__main__":
    main()
