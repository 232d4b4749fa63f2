"""A cache is a copy of state: no cached value outlives what it was computed from.

Every cache in ``lora_lightning`` must see in-place edits that bump no version counter
(``tensor.data.copy_(...)``, as other libraries do under ``torch.no_grad()``), or recompute.
"""

from __future__ import annotations

import copy

import peft
import torch
from models import assert_close_relative, logits, randomize_adapters, tiny_bert, token_ids
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, lora_state_dict
from lora_lightning.core.state import layer_state


def _peft_name(name: str) -> str:
    """Our ``<p>.lora_A.weight`` / ``<p>.lora_magnitude_vector`` -> PEFT's parameter name."""
    if name.endswith("lora_magnitude_vector"):
        return f"base_model.model.{name}.default.weight"
    return "base_model.model." + name.replace(".weight", ".default.weight")


def test_dora_follows_a_base_weight_edited_through_data_as_peft_does():
    ours = tiny_bert()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["query"]))
    randomize_adapters(ours, seed=3)
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True)
    ).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, tensor in lora_state_dict(ours).items():
            params[_peft_name(name)].copy_(tensor)
    logits(ours, token_ids())  # a forward before the edit, as in training
    edit = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    ours.bert.encoder.layer[0].attention.self.query.weight.data.copy_(edit)
    theirs.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight.data.copy_(
        edit
    )
    assert_close_relative(logits(ours, token_ids()), logits(theirs, token_ids()))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = ["query", "key", "value"]  # which projections a forward runs, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(getattr(self, name)(x) for name in self.calls)


def _fused_and_plain() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = _Attention()
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    inject_lora(fused, LoRAConfig(r=2, target_modules=["query", "key", "value"]))
    inject_lora(plain, LoRAConfig(r=2, target_modules=["query", "key", "value"],
                                  group_shared_input=False))  # fmt: skip
    randomize_adapters(fused, seed=1)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_shared_input_rows_do_not_outlive_the_parent_forward():
    fused, plain = _fused_and_plain()
    assert layer_state(fused.query).group is not None
    x = torch.randn(3, 8)
    fused.calls = ["query"]  # key and value are left pending with the rows of x
    fused(x)
    new_a = torch.randn_like(fused.key.lora_A.weight)
    for model in (fused, plain):  # e.g. an EMA callback swapping weights in through .data
        model.key.lora_A.weight.data.copy_(new_a)
        model.calls = ["key", "value"]
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)


def test_shared_input_rows_follow_an_adapter_replaced_between_calls():
    fused, plain = _fused_and_plain()
    x = torch.randn(3, 8)
    fused.query(x)  # called directly: rows for key and value wait in the group
    new_a = torch.randn_like(fused.key.lora_A.weight)
    for model in (fused, plain):
        model.key.lora_A.weight = nn.Parameter(new_a.clone())
    torch.testing.assert_close(fused.key(x), plain.key(x), rtol=1e-6, atol=1e-6)
