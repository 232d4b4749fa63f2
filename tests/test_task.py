"""The default task: SST-2 files and reader, the DataModule, and the TextClassifier.

A tiny BERT (2 layers, width 32) with the real MiniLM tokenizer stands in for MiniLM, so these
tests need neither the network nor the 90 MB model; the one test that loads MiniLM is slow.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from models import save_tiny_classifier

from lora_lightning.tasks import (
    SST2DataModule,
    TextClassifier,
    linear_warmup_decay,
    minilm_path,
    read_labelled_tsv,
    sst2_path,
)

SENTENCES = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("dull", 0),
    ("the story is too predictable and the acting wooden , from start to finish", 0),
    ("one of the best films of the year", 1),
    ("bad", 0),
    ("it 's a charming and often affecting journey .", 1),
    ("an ugly , pointless , stupid movie", 0),
    ("fun", 1),
    ("the most repugnant adaptation of a classic text since roland joffé 's scarlet letter", 0),
    ("a masterpiece four years in the making", 1),
]


def write_tsv(path: Path, rows: list[tuple[str, int]], header: str = "label\tsentence") -> Path:
    text = header + "\n" + "".join(f"{label}\t{sentence}\n" for sentence, label in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT classifier saved with the MiniLM tokenizer."""
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "train_file": write_tsv(tmp_path / "train.tsv", SENTENCES),
        "val_file": write_tsv(tmp_path / "val.tsv.gz", SENTENCES[:6]),
        "test_file": write_tsv(tmp_path / "test.tsv", SENTENCES[4:]),
    }


def make_datamodule(tiny_model_dir: Path, data_files: dict[str, Path], **kwargs) -> SST2DataModule:
    options = {"batch_size": 4, "eval_batch_size": 4, **kwargs}
    datamodule = SST2DataModule(tokenizer=tiny_model_dir, **data_files, **options)
    datamodule.setup("fit")
    return datamodule


# Reading TSV files


@pytest.mark.parametrize("name", ["data.tsv", "data.tsv.gz"])
def test_read_labelled_tsv_returns_sentence_label_pairs_from_plain_or_gzip(
    tmp_path: Path, name: str
) -> None:
    path = write_tsv(tmp_path / name, SENTENCES[:3])
    assert read_labelled_tsv(path) == SENTENCES[:3]


def test_read_labelled_tsv_finds_columns_by_header_name(tmp_path: Path) -> None:
    path = tmp_path / "swapped.tsv"
    path.write_text("sentence\tlabel\nfine film\t1\n\nawful\t0\n", encoding="utf-8")
    assert read_labelled_tsv(path) == [("fine film", 1), ("awful", 0)]


def test_read_labelled_tsv_rejects_header_without_sentence_column(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "bad.tsv", SENTENCES[:2], header="label\ttext")
    with pytest.raises(ValueError, match=r"bad\.tsv:1: .*'sentence'"):
        read_labelled_tsv(path)


def test_read_labelled_tsv_rejects_label_other_than_0_or_1_naming_file_and_line(
    tmp_path: Path,
) -> None:
    path = write_tsv(tmp_path / "labels.tsv", [("good", 1), ("great", 2)])
    with pytest.raises(ValueError, match=r"labels\.tsv:3: label must be 0 or 1, found '2'"):
        read_labelled_tsv(path)


def test_read_labelled_tsv_rejects_line_with_wrong_number_of_fields(tmp_path: Path) -> None:
    path = tmp_path / "fields.tsv"
    path.write_text("label\tsentence\n1\tgood\n0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fields\.tsv:3: expected 2 tab-separated fields"):
        read_labelled_tsv(path)


# The vendored SST-2 files


@pytest.mark.parametrize(("split", "examples"), [("train", 67349), ("dev", 872)])
def test_vendored_sst2_split_has_the_glue_number_of_examples(split: str, examples: int) -> None:
    rows = read_labelled_tsv(sst2_path(split))
    assert len(rows) == examples
    assert {label for _, label in rows} == {0, 1}


def test_vendored_sst2_source_note_is_shipped() -> None:
    assert (sst2_path("dev").parent / "SOURCE.md").is_file()


def test_sst2_path_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="'validation'.*'train', 'dev'"):
        sst2_path("validation")


# SST2DataModule


def test_batches_are_padded_to_the_longest_sentence_in_each_batch(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    datamodule = make_datamodule(tiny_model_dir, data_files)
    widths = []
    for batch in datamodule.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["labels"].shape == (batch["input_ids"].size(0),)
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].size(1) == lengths.max()
        widths.append(batch["input_ids"].size(1))
    assert len(set(widths)) > 1


def test_sentences_are_truncated_to_max_length(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    datamodule = make_datamodule(tiny_model_dir, data_files, max_length=5)
    assert max(batch["input_ids"].size(1) for batch in datamodule.val_dataloader()) == 5


def test_same_seed_gives_identical_batches_across_two_setups(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    def epoch(seed: int) -> list[torch.Tensor]:
        datamodule = make_datamodule(tiny_model_dir, data_files, seed=seed)
        return [batch["input_ids"] for batch in datamodule.train_dataloader()]

    first, second, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == len(second)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_train_limit_keeps_a_seeded_subset_of_that_size(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    def subset(seed: int) -> list[list[int]]:
        datamodule = make_datamodule(tiny_model_dir, data_files, train_limit=3, seed=seed)
        return [item["input_ids"] for item in datamodule.datasets["train"]]

    assert len(subset(0)) == 3
    assert subset(0) == subset(0)
    assert subset(0) != subset(5)


def test_val_limit_subset_does_not_depend_on_the_training_seed(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    """Runs with different training seeds are scored on the same sentences; `eval_seed` picks
    them (with 3 of 6 validation sentences, seeds 0 and 5 draw different subsets)."""

    def val(**seeds: int) -> list[list[int]]:
        datamodule = make_datamodule(tiny_model_dir, data_files, val_limit=3, **seeds)
        return [item["input_ids"] for item in datamodule.datasets["val"]]

    assert val(seed=0) == val(seed=5)
    assert val(seed=0, eval_seed=5) != val(seed=0)


def test_non_positive_limit_is_rejected_when_the_datamodule_is_built(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    with pytest.raises(ValueError, match="train_limit must be a positive number"):
        SST2DataModule(tokenizer=tiny_model_dir, **data_files, train_limit=0)


def test_default_files_are_the_vendored_train_and_dev_splits(tiny_model_dir: Path) -> None:
    datamodule = SST2DataModule(tokenizer=tiny_model_dir)
    assert datamodule.files == {
        "train": sst2_path("train"),
        "val": sst2_path("dev"),
        "test": sst2_path("dev"),
    }


# TextClassifier


def test_forward_returns_one_logit_per_class_and_ignores_labels(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    batch = next(iter(make_datamodule(tiny_model_dir, data_files).val_dataloader()))
    classifier = TextClassifier(tiny_model_dir, num_labels=2).eval()
    logits = classifier(**batch)
    assert logits.shape == (batch["labels"].size(0), 2)
    assert logits.dtype == torch.float32


def test_pretrained_model_starts_in_training_mode_so_dropout_is_active(
    tiny_model_dir: Path,
) -> None:
    classifier = TextClassifier(tiny_model_dir)
    assert all(module.training for module in classifier.modules())


def test_gradient_checkpointing_still_trains_layers_after_frozen_embeddings(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    batch = next(iter(make_datamodule(tiny_model_dir, data_files).train_dataloader()))
    classifier = TextClassifier(tiny_model_dir, gradient_checkpointing=True)
    classifier.model.bert.embeddings.requires_grad_(False)
    torch.nn.functional.cross_entropy(classifier(**batch), batch["labels"]).backward()
    query = classifier.model.bert.encoder.layer[0].attention.self.query.weight
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_fast_dev_run_trains_validates_and_tests_the_tiny_model(
    tiny_model_dir: Path, data_files: dict[str, Path]
) -> None:
    datamodule = SST2DataModule(tokenizer=tiny_model_dir, **data_files, batch_size=4)
    classifier = TextClassifier(tiny_model_dir, lr=1e-3)
    before = classifier.model.classifier.weight.detach().clone()
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(classifier, datamodule=datamodule)
    assert not torch.equal(before, classifier.model.classifier.weight)
    assert {"train/loss", "val/loss", "val/acc", "val/f1"} <= set(trainer.logged_metrics)
    (results,) = trainer.test(classifier, datamodule=datamodule, verbose=False)
    assert set(results) == {"test/loss", "test/acc", "test/f1"}
    assert 0.0 <= results["test/acc"] <= 1.0


def test_learning_rate_warms_up_then_decays_linearly_to_zero() -> None:
    multipliers = [linear_warmup_decay(step, warmup_steps=2, total_steps=6) for step in range(7)]
    assert multipliers == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


# The pretrained MiniLM


def test_minilm_path_points_at_a_model_directory() -> None:
    assert (minilm_path() / "config.json").is_file()


@pytest.mark.slow
def test_real_minilm_loads_offline_in_float32_with_a_fresh_two_class_head() -> None:
    classifier = TextClassifier().eval()
    batch = SST2DataModule().tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**batch)
    assert logits.shape == (2, 2)
    assert all(p.dtype == torch.float32 for p in classifier.parameters())
    assert classifier.model.config.hidden_size == 384


def test_length_grouped_sampler_yields_every_index_once_per_epoch():
    from lora_lightning.tasks.sst2 import LengthGroupedSampler

    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=32, seed=3, mega_batches=4)
    assert sorted(sampler) == list(range(1000))


def test_length_grouped_sampler_is_seeded_per_epoch():
    from lora_lightning.tasks.sst2 import LengthGroupedSampler

    lengths = [(i * 37) % 50 + 1 for i in range(500)]
    a = LengthGroupedSampler(lengths, batch_size=16, seed=1)
    b = LengthGroupedSampler(lengths, batch_size=16, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_length_grouped_batches_pad_less_than_random_batches():
    from lora_lightning.tasks.sst2 import LengthGroupedSampler

    lengths = [
        int(v) for v in torch.randint(3, 64, (3200,), generator=torch.Generator().manual_seed(0))
    ]

    def mean_padded_width(order):
        return sum(max(lengths[i] for i in order[s : s + 32]) for s in range(0, 3200, 32)) / 100

    grouped = list(LengthGroupedSampler(lengths, batch_size=32, seed=0))
    shuffled = torch.randperm(3200, generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_padded_width(grouped) < 0.6 * mean_padded_width(shuffled)


# Resuming the task


class _StepRecorder(TextClassifier):
    """Records each training step's batch (input ids) and learning rate, and tells a
    resumable train loader how many batches of the epoch are done."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[list[int], float]] = []

    def training_step(self, batch, batch_idx):
        self.trainer.train_dataloader.batches_done = batch_idx + 1
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.steps.append((batch["input_ids"][:, 1].tolist(), lr))
        return super().training_step(batch, batch_idx)


def _resumable(datamodule: SST2DataModule) -> SST2DataModule:
    """The datamodule's train loader made resumable mid-epoch (Lightning restores its
    position through ``state_dict``/``load_state_dict``)."""
    from lightning_models import ResumableLoader

    original = datamodule.train_dataloader

    def train_dataloader():
        loader = original()
        loader.__class__ = ResumableLoader
        return loader

    object.__setattr__(datamodule, "train_dataloader", train_dataloader)
    return datamodule


def _fit(model_dir, data_files, root, ckpt_path=None, **trainer_options) -> _StepRecorder:
    # Strings, not paths: the checkpoint's hyperparameters must load with weights_only=True.
    files = {key: str(path) for key, path in data_files.items()}
    datamodule = _resumable(SST2DataModule(tokenizer=str(model_dir), **files, batch_size=4))
    classifier = _StepRecorder(str(model_dir), lr=1e-3, warmup_ratio=0.5)
    pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, limit_val_batches=0, **trainer_options,
    ).fit(classifier, datamodule=datamodule, ckpt_path=ckpt_path)  # fmt: skip
    return classifier


def test_a_resumed_fit_continues_the_interrupted_epoch_with_the_same_learning_rates(
    tiny_model_dir: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    """configure_optimizers must not build the train loader (estimated_stepping_batches
    does): built before Lightning restores the loop state, it would restart the epoch."""
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1
    )
    straight = _fit(tiny_model_dir, data_files, tmp_path, max_epochs=2, callbacks=[checkpoints])
    assert len(straight.steps) == 6  # 10 sentences in batches of 4: 3 per epoch
    mid_epoch = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    resumed = _fit(tiny_model_dir, data_files, tmp_path / "resumed", mid_epoch, max_epochs=2)
    assert resumed.steps == straight.steps[4:]


def test_the_first_step_uses_the_scheduled_learning_rate_without_warmup(
    tiny_model_dir: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    datamodule = SST2DataModule(tokenizer=tiny_model_dir, **data_files, batch_size=4)
    classifier = _StepRecorder(tiny_model_dir, lr=1e-3, warmup_ratio=0.0)
    pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=0, max_epochs=1,
    ).fit(classifier, datamodule=datamodule)  # fmt: skip
    rates = [lr for _, lr in classifier.steps]
    assert rates == pytest.approx([1e-3 * (3 - step) / 3 for step in range(3)])
