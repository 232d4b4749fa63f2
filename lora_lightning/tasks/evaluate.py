"""Evaluate a saved adapter on a labelled TSV (``label<TAB>sentence``, SST-2 format).

    python -m lora_lightning.tasks.evaluate outputs/<date>/<time>/adapter --data my_split.tsv

The adapter (PEFT format, ours or PEFT's) is loaded onto the base model with
:func:`lora_lightning.load_adapter`; accuracy, macro F1 and loss are printed and, with
``--json``, written to a file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl

from lora_lightning import load_adapter


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
    from lora_lightning.tasks import SST2DataModule, TextClassifier

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    classifier = TextClassifier(model_name_or_path=model_name_or_path, num_labels=num_labels)
    load_adapter(classifier.model, adapter_dir)
    datamodule = SST2DataModule(
        tokenizer=model_name_or_path,
        test_file=data,
        eval_batch_size=batch_size,
        max_length=max_length,
    )
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False
    )
    (metrics,) = trainer.test(classifier, datamodule=datamodule, verbose=False)
    return {key.removeprefix("test/"): float(value) for key, value in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lightning.tasks.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("--data", help="labelled TSV or TSV.gz; default: vendored SST-2 dev")
    parser.add_argument("--model", help="base model directory; default: the bundled MiniLM")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    metrics = evaluate(
        args.adapter,
        args.data,
        model_name_or_path=args.model,
        num_labels=args.num_labels,
        batch_size=args.batch_size,
        max_length=args.max_length,
        accelerator=args.accelerator,
    )
    print(json.dumps({"adapter": args.adapter, "data": args.data or "sst2-dev", **metrics}))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
