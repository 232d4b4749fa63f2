"""Batched greedy generation and exact-match scoring, for judging a causal LM by its answers.

Prompts are left-padded (so every row's next token comes right after its prompt), decoded
greedily with the KV cache by `model.generate`, and the new tokens are decoded without special
tokens. An answer is right when it equals the target after stripping surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_lightning.tasks.minilm import import_transformers


@dataclass(frozen=True)
class Scored:
    """One generated answer and its verdict; `index` is the example's place in its split."""

    index: int
    family: str
    prompt: str
    prediction: str
    target: str

    @property
    def correct(self) -> bool:
        return self.prediction.strip() == self.target.strip()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """`input_ids` and `attention_mask` `(batch, longest)` with padding on the left."""
    longest = max(len(p) for p in prompts)
    ids = [[pad_id] * (longest - len(p)) + list(p) for p in prompts]
    mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int],
    synced: bool = False,
) -> Tensor:
    """Greedy continuation of a left-padded batch; returns only the new tokens `(batch, new)`.

    `synced=True` keeps every process decoding until all are done (Hugging Face's
    `synced_gpus`), which a sharded model (FSDP) needs: its forward is a collective.
    The model is put in eval mode for the call and its mode restored afterwards.
    """
    transformers = import_transformers()
    config = transformers.GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=synced,
        )
    finally:
        model.train(was_training)
    return out[:, input_ids.shape[1] :]


def decode_answers(tokenizer: Any, new_tokens: Tensor, eos_ids: Iterable[int]) -> list[str]:
    """Text of each row up to its first end-of-sequence token, special tokens dropped."""
    stops = set(eos_ids)
    answers = []
    for row in new_tokens.tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def exact_match(scored: Iterable[Scored], prefix: str) -> dict[str, float]:
    """`{prefix}exact_match` overall and `{prefix}exact_match/<family>` per family, in [0, 1].

    Each example counts once, by `index` (a repeated index, e.g. from padding a shard to
    an equal number of batches per process, is counted once).
    """
    unique = {s.index: s for s in scored}
    if not unique:
        return {}
    by_family: dict[str, list[bool]] = {}
    for s in unique.values():
        by_family.setdefault(s.family, []).append(s.correct)
    total = [c for values in by_family.values() for c in values]
    metrics = {f"{prefix}exact_match": sum(total) / len(total)}
    for family in sorted(by_family):
        values = by_family[family]
        metrics[f"{prefix}exact_match/{family}"] = sum(values) / len(values)
    return metrics
