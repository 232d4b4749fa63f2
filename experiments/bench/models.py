"""The models the benchmarks run: the real MiniLM-L6 and a BERT-base-shaped random model.

Every builder is deterministic (seeded), so two calls return bit-identical weights: the
variants of a benchmark (bare base, ours, PEFT, full fine-tuning) each get their own copy of
the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers.utils import logging as hf_logging

from experiments.bench.common import minilm_dir

SEED = 0
#: The two models of the train-step and inference benchmarks, by key.
MODEL_NAMES = {
    "minilm": "all-MiniLM-L6-v2 (real weights: 6 layers, hidden 384, 12 heads)",
    "bert_base": "BERT-base shape, random init (BertConfig defaults: 12 layers, hidden 768, "
    "12 heads, MLP 3072, vocab 30522), seeded",
}


def load_minilm(num_labels: int | None = 2) -> nn.Module:
    """Pretrained MiniLM-L6, float32: with a fresh ``num_labels``-way head (seeded init) as
    ``BertForSequenceClassification``, or the bare encoder (``BertModel``) for None."""
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report, every load
    torch.manual_seed(SEED)
    if num_labels is None:
        model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=num_labels, local_files_only=True
        )
    return model.float()


def bert_base_config(tiny: bool = False, num_labels: int = 2) -> Any:
    """``BertConfig()`` defaults (BERT-base: 110M parameters); ``tiny`` for smoke runs."""
    if tiny:
        return BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=1000,
            num_labels=num_labels,
        )
    return BertConfig(num_labels=num_labels)


def build_bert_base(num_labels: int | None = 2, tiny: bool = False) -> nn.Module:
    """A BERT-base-shaped model with seeded random weights: ``BertForSequenceClassification``
    with a ``num_labels``-way head, or the bare ``BertModel`` for None."""
    torch.manual_seed(SEED)
    config = bert_base_config(tiny, num_labels or 2)
    if num_labels is None:
        return BertModel(config)
    return BertForSequenceClassification(config)


def load_model(key: str, num_labels: int | None = 2, tiny: bool = False) -> nn.Module:
    """``minilm`` (``tiny`` ignored: the real weights are small) or ``bert_base``."""
    if key == "minilm":
        return load_minilm(num_labels)
    if key == "bert_base":
        return build_bert_base(num_labels, tiny)
    raise ValueError(f"unknown model {key!r}: expected one of {sorted(MODEL_NAMES)}")


def random_batch(
    model: nn.Module, batch: int, seq_len: int, labels: bool = True
) -> dict[str, torch.Tensor]:
    """Random token ids (seeded), an all-ones attention mask and random binary labels."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return out
