"""Instruction-tuning batches from JSONL files (alpaca or chat rows), for :class:`CausalLMTask`.

Training and validation batches are teacher-forced conversations with labels on the answers
only (see :mod:`lora_lightning.tasks.chat`); test batches are left-padded prompts with their
target answers, for evaluation by generation.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from lora_lightning.tasks.chat import (
    TRUNCATION,
    DataError,
    Encoded,
    Example,
    Truncation,
    check_chat_template,
    collate,
    encode,
    encode_prompt,
    pack,
    read_rows,
)
from lora_lightning.tasks.generation import left_pad
from lora_lightning.tasks.instruct_set import instruct_path
from lora_lightning.tasks.minilm import force_offline, import_transformers
from lora_lightning.tasks.sst2 import random_subset

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
SPLITS = ("train", "val", "test")


class _Items(Dataset[Any]):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def load_tokenizer(tokenizer: Any, chat_template: str | None = None) -> Any:
    """A tokenizer object from a folder (None: SmolLM2's), or `tokenizer` itself if an object.

    A tokenizer without a pad token gets its end-of-sequence token as pad (labels and attention
    masks, not pad ids, decide what is trained on and attended to). `chat_template` replaces
    the tokenizer's template when given.
    """
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from lora_lightning.tasks.smollm2 import smollm2_path

        force_offline()
        path = smollm2_path() if tokenizer is None else tokenizer
        tokenizer = import_transformers().AutoTokenizer.from_pretrained(
            str(path), local_files_only=True
        )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class InstructDataModule(LightningDataModule):
    """Batches for instruction tuning and evaluation by generation.

    Reads JSONL files whose rows are alpaca-style (`instruction`, optional `input`, `output`)
    or chat (`messages: [{role, content}]`, rendered with the tokenizer's chat template); an
    optional `family` field groups rows for per-family exact match. Defaults: the project's
    own task set (`lora_lightning/tasks/data/instruct/`, see :mod:`instruct_set`).

    Batches: training and validation give `input_ids`, `labels` (-100 off the answers) and
    `position_ids` `(batch, longest)`, plus `attention_mask` unless packed; test gives
    left-padded prompts (`input_ids`, `attention_mask`), `index` `(batch,)` and the python
    lists `answers`, `families` and `questions` (the last user message, for sample tables).

    Args:
        tokenizer: a tokenizer folder or object; None means SmolLM2-135M-Instruct's.
        train_file, val_file, test_file: JSONL files; None means the task set's splits.
        max_length: tokens per training example (and per packed row).
        truncation: what to do with a longer example: `error` (refuse, naming file and line),
            `drop` (skip it; the count is logged), or `truncate_prompt` (cut the oldest prompt
            tokens; an answer is never cut).
        packing: put several training examples in each row (positions restart per example so
            attention stops at example boundaries); validation is never packed.
        padding_side: `right` or `left`, for unpacked training and validation batches.
        batch_size: training batch size (rows). eval_batch_size: validation and test.
        train_limit, val_limit, test_limit: keep a seeded random subset of this many rows.
        seed: seeds the training subset and the training order.
        eval_seed: seeds the validation and test subsets, apart from `seed`, so that runs with
            different training seeds are scored on the same rows.
        chat_template: a Jinja template replacing the tokenizer's.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: a size or limit is not positive, or an option is not one of its values.
        DataError: a tokenizer without a chat template (and none given), or a bad data file.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        train_file: PathLike | None = None,
        val_file: PathLike | None = None,
        test_file: PathLike | None = None,
        max_length: int = 128,
        truncation: Truncation = "error",
        packing: bool = False,
        padding_side: Literal["left", "right"] = "right",
        batch_size: int = 8,
        eval_batch_size: int = 32,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        chat_template: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("train_limit", train_limit),
            ("val_limit", val_limit),
            ("test_limit", test_limit),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"InstructDataModule: {name} must be a positive integer, not {value!r}"
                )
        if truncation not in TRUNCATION:
            raise ValueError(
                f"InstructDataModule: truncation must be one of {', '.join(TRUNCATION)}, not "
                f"{truncation!r}"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(
                f"InstructDataModule: padding_side must be 'left' or 'right', not {padding_side!r}"
            )
        # As strings: a Path in the hyperparameters makes the checkpoint unloadable with
        # weights_only=True (pathlib is not an allowed global), which resuming uses.
        train_file, val_file, test_file = (
            None if f is None else os.fspath(f) for f in (train_file, val_file, test_file)
        )
        self.save_hyperparameters(ignore=["tokenizer"])
        self.files = {
            split: Path(given) if given is not None else instruct_path(split)
            for split, given in zip(SPLITS, (train_file, val_file, test_file), strict=True)
        }
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}
        self.max_length = max_length
        self.truncation = truncation
        self.packing = packing
        self.padding_side = padding_side
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.subset_seeds = {"train": seed, "val": eval_seed, "test": eval_seed}
        self.num_workers = num_workers
        self.tokenizer = load_tokenizer(tokenizer, chat_template)
        check_chat_template(self.tokenizer, "InstructDataModule")
        self.examples: dict[str, list[Example]] = {}
        self.datasets: dict[str, _Items] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize every split once (the base evaluation during fit needs the test
        split too); splits already done are kept.

        Raises:
            FileNotFoundError: a file does not exist.
            DataError: a malformed row (file and line named), a row too long for `max_length`
                under `truncation=error`, or a split left empty.
        """
        for split in SPLITS:
            if split in self.datasets:
                continue
            examples = read_rows(self.files[split])
            examples = random_subset(examples, self.limits[split], self.subset_seeds[split])
            self.examples[split] = examples
            self.datasets[split] = _Items(self._encode(split, examples))

    def _encode(self, split: str, examples: list[Example]) -> list[Any]:
        if split == "test":
            return [
                {
                    "index": i,
                    "prompt": encode_prompt(self.tokenizer, example, self.max_length),
                    "answer": example.answer,
                    "question": example.messages[-2]["content"]
                    if len(example.messages) > 1
                    else "",
                    "family": example.family,
                }
                for i, example in enumerate(examples)
            ]
        encoded = [encode(self.tokenizer, e, self.max_length, self.truncation) for e in examples]
        kept: list[Encoded] = [e for e in encoded if e is not None]
        if len(kept) < len(encoded):
            log.warning(
                f"{self.files[split]}: {len(encoded) - len(kept)} of {len(encoded)} rows are "
                f"longer than max_length={self.max_length} and were dropped (truncation=drop)"
            )
        if not kept:
            raise DataError(
                f"{self.files[split]}: no row fits max_length={self.max_length}; raise it"
            )
        if split == "train" and self.packing:
            # Pack in a seeded random order, so each row mixes families; fixed for the run.
            order = list(range(len(kept)))
            random.Random(self.seed).shuffle(order)
            return pack([kept[i] for i in order], self.max_length)
        return kept

    def _require(self, split: str) -> _Items:
        if split not in self.datasets:
            raise RuntimeError(
                f"InstructDataModule: the {split} split is not loaded; call setup() first "
                "(the Trainer does this for you)"
            )
        return self.datasets[split]

    def _collate(self, rows: list[Encoded]) -> dict[str, Any]:
        return collate(rows, self.tokenizer.pad_token_id, self.padding_side)

    def _collate_prompts(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = left_pad([i["prompt"] for i in items], self.tokenizer.pad_token_id)
        batch["index"] = torch.tensor([i["index"] for i in items], dtype=torch.long)
        batch["answers"] = [i["answer"] for i in items]
        batch["families"] = [i["family"] for i in items]
        batch["questions"] = [i["question"] for i in items]
        return batch

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training rows (packed rows when `packing`); the order depends on `seed`."""
        dataset = self._require("train")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed)),
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation conversations in file order, teacher-forced (loss and perplexity)."""
        dataset = self._require("val")
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader[Any]:
        """Test prompts, left-padded, in file order, with their answers (for generation)."""
        dataset = self._require("test")
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=self._collate_prompts,
            num_workers=self.num_workers,
        )
