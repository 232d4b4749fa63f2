"""SST-2 sentiment data: the vendored files, a TSV reader and a LightningDataModule.

The vendored copy is GLUE SST-2 (see `data/sst2/SOURCE.md`): `train` (67,349 sentences) and
`dev` (872 sentences, used as the test set too because GLUE's test labels are hidden).
"""

from __future__ import annotations

import gzip
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from lora_lightning.tasks.minilm import import_transformers, resolve_pretrained

_DATA_DIR = Path(__file__).resolve().parent / "data" / "sst2"
SST2_SPLITS = ("train", "dev")
_LABELS = {"0": 0, "1": 1}

PathLike = str | os.PathLike[str]
Example = tuple[str, int]


def sst2_path(split: str) -> Path:
    """Return the path of a vendored SST-2 split (`"train"` or `"dev"`), a `.tsv.gz` file.

    Raises:
        ValueError: `split` is not one of `SST2_SPLITS`.
        FileNotFoundError: the file is missing from the installed package.
    """
    if split not in SST2_SPLITS:
        raise ValueError(f"Unknown SST-2 split {split!r}; valid splits are {SST2_SPLITS}")
    path = _DATA_DIR / f"{split}.tsv.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"The vendored SST-2 file {path} is missing; reinstall lora-lightning "
            "(the data files ship as package data)."
        )
    return path


def read_labelled_tsv(path: PathLike) -> list[Example]:
    """Read a tab-separated file of labelled sentences into `(sentence, label)` pairs.

    The first line is a header naming at least the columns `label` and `sentence` (in any
    order; other columns are ignored). Labels must be `0` or `1`. Blank lines are skipped.
    Files ending in `.gz` are decompressed on the fly. Fields are not quoted (GLUE style):
    a tab never occurs inside a sentence.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is empty, the header lacks `label` or `sentence`, a line has the
            wrong number of fields, or a label is not 0/1. The message names file and line.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    examples: list[Example] = []
    with opener(path, "rt", encoding="utf-8", newline="") as lines:
        header = next(lines, "").rstrip("\r\n").split("\t")
        missing = [column for column in ("label", "sentence") if column not in header]
        if missing:
            raise ValueError(
                f"{path}:1: the header must name the columns 'label' and 'sentence' "
                f"(tab-separated); missing {missing}, found {header}"
            )
        label_at, sentence_at = header.index("label"), header.index("sentence")
        for line_number, line in enumerate(lines, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}:{line_number}: expected {len(header)} tab-separated fields "
                    f"{header}, found {len(fields)}"
                )
            label = _LABELS.get(fields[label_at].strip())
            if label is None:
                raise ValueError(
                    f"{path}:{line_number}: label must be 0 or 1, found {fields[label_at]!r}"
                )
            examples.append((fields[sentence_at], label))
    return examples


def _check_limit(name: str, limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"{name} must be a positive number of examples or None, not {limit}")


def random_subset(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """Return `limit` examples drawn without replacement with a fixed seed, in file order.

    `limit=None`, or a limit at least the number of examples, returns all of them.

    Raises:
        ValueError: `limit` is less than 1.
    """
    _check_limit("limit", limit)
    if limit is None or limit >= len(examples):
        return list(examples)
    # A private Random: the subset must not depend on (or disturb) the global RNG state.
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


class _Encoded(Dataset[dict[str, Any]]):
    """Tokenised examples, each a dict `input_ids`, `attention_mask` (lists) and `labels` (int)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class SST2DataModule(LightningDataModule):
    """Binary sentiment classification batches from SST-2 (or any `label\\tsentence` TSV).

    Sentences are tokenised once in `setup()` (truncated to `max_length`, unpadded) and padded
    per batch to the longest sentence in it, so short batches stay cheap. Batches are dicts of
    tensors: `input_ids` and `attention_mask` of shape `(batch, longest)`, `labels` `(batch,)`.

    Args:
        tokenizer: a tokenizer directory or Hub name; None means the bundled MiniLM tokenizer.
            Loaded with `local_files_only=True` (no network).
        train_file, val_file, test_file: TSV or TSV.gz files read by `read_labelled_tsv`;
            None means the vendored SST-2 train, dev and dev split.
        max_length: tokens per sentence after truncation (special tokens included).
        batch_size: training batch size. eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes (kept alive across epochs when > 0).
        train_limit, val_limit: use a random subset of this many examples (seeded by `seed`
            and `eval_seed`); None uses all. The test set is never subsampled.
        seed: seeds the training subset and the training shuffle order.
        eval_seed: seeds the validation subset, apart from `seed`, so that runs with different
            training seeds are scored on the same sentences.
        group_by_length: draw training batches of similar sentence length
            (`LengthGroupedSampler`), which pads far less; evaluation batches always go
            longest first.

    Raises:
        ValueError: `max_length`, a batch size or a limit is not positive.
        ModuleNotFoundError: `tokenizer` is None and the MiniLM package is not installed.
    """

    def __init__(
        self,
        tokenizer: PathLike | None = None,
        train_file: PathLike | None = None,
        val_file: PathLike | None = None,
        test_file: PathLike | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        group_by_length: bool = True,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ValueError(f"SST2DataModule: {name} must be a positive integer, not {value}")
        _check_limit("SST2DataModule: train_limit", train_limit)
        _check_limit("SST2DataModule: val_limit", val_limit)
        self.save_hyperparameters()
        self.files = {
            "train": Path(train_file) if train_file is not None else sst2_path("train"),
            "val": Path(val_file) if val_file is not None else sst2_path("dev"),
            "test": Path(test_file) if test_file is not None else sst2_path("dev"),
        }
        self.limits = {"train": train_limit, "val": val_limit, "test": None}
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.subset_seeds = {"train": seed, "val": eval_seed, "test": eval_seed}
        self.group_by_length = group_by_length
        transformers = import_transformers()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            resolve_pretrained(tokenizer), use_fast=True, local_files_only=True
        )
        self.collate = transformers.DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        self.datasets: dict[str, _Encoded] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits `stage` needs; splits already done are kept.

        Raises:
            ValueError: a file is malformed (see `read_labelled_tsv`) or has no examples.
            FileNotFoundError: a file does not exist.
        """
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", ("train", "val", "test"))
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self._encode(split)

    def _encode(self, split: str) -> _Encoded:
        examples = read_labelled_tsv(self.files[split])
        if not examples:
            raise ValueError(f"{self.files[split]}: the {split} file has no examples")
        examples = random_subset(examples, self.limits[split], self.subset_seeds[split])
        # No token_type_ids: they are all zeros for single sentences, and some encoders
        # (DistilBERT, RoBERTa variants) reject or mishandle them.
        encoded = self.tokenizer(
            [sentence for sentence, _ in examples],
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=False,
        )
        return _Encoded(
            [
                {"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, (_, label) in zip(
                    encoded["input_ids"], encoded["attention_mask"], examples, strict=True
                )
            ]
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader[dict[str, Any]]:
        split, order = ("test", "predict") if split == "predict" else (split, split)
        if split not in self.datasets:
            raise RuntimeError(
                f"SST2DataModule: the {split} split is not loaded; call setup() first "
                "(the Trainer does this for you)"
            )
        dataset = self.datasets[split]
        lengths = [len(example["input_ids"]) for example in dataset]
        sampler: Sampler[int]
        if shuffle and self.group_by_length:
            sampler = LengthGroupedSampler(lengths, batch_size, seed=self.seed)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        else:
            # Longest first: batches of similar length pad less; metrics ignore the order.
            sampler = SequentialSampler(dataset) if order == "predict" else _LongestFirst(lengths)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled training batches; the order depends only on `seed` (and the epoch)."""
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation batches in file order."""
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test batches in file order."""
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """The test split in file order (labels included, the model ignores them)."""
        return self._loader("predict", self.eval_batch_size, shuffle=False)


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of ``batch_size`` indices has similar lengths.

    Shuffle, cut into mega-batches of ``batch_size * mega_batches`` examples, sort each by
    length, cut into batches and shuffle the batches (as ``group_by_length`` in transformers'
    Trainer does). Batches then pad to nearly their own length: SST-2 sentences average 13
    tokens but a random batch of 32 pads to about 40. The order depends only on ``seed`` and
    the epoch (Lightning calls ``set_epoch``), so runs and resumes are reproducible.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int = 0, mega_batches: int = 50
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start : start + self.mega], key=self.lengths.__getitem__)
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        full = [batch for batch in batches if len(batch) == self.batch_size]
        for index in torch.randperm(len(full), generator=generator).tolist():
            yield from full[index]
        # The one short batch goes last so every other batch stays aligned to one group.
        for batch in batches:
            if len(batch) < self.batch_size:
                yield from batch


class _LongestFirst(Sampler[int]):
    """Evaluation order by decreasing length (ties in file order)."""

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)
