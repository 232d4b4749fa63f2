"""Adapters cross between this library and Hugging Face PEFT with identical outputs (SPEC 6).

Both directions on tiny models built from transformers configs: a BERT classifier (Linear
query/key/value, classifier in modules_to_save), a GPT-2 LM (Conv1D ``c_attn``) and a small
net with a Conv2d and an Embedding. Adapters hold random values (at init B = 0, which would
make any comparison pass); models are in eval mode.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from models import (
    assert_close_relative,
    conv_embed_net,
    conv_inputs,
    logits,
    randomize_adapters,
    tiny_bert,
    tiny_gpt2,
    token_ids,
)
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, load_adapter, save_adapter, unload_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

# family -> (builder, inputs, our config, the equivalent PEFT LoraConfig keyword arguments)
FAMILIES = {
    "bert_linear": (
        tiny_bert,
        token_ids,
        LoRAConfig(r=4, alpha=8, modules_to_save=["classifier"]),
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "key", "value"],
            "modules_to_save": ["classifier"],
        },
    ),
    "gpt2_conv1d": (
        tiny_gpt2,
        token_ids,
        LoRAConfig(r=4, alpha=8, target_modules=[r".*\.c_attn"]),
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    ),
    "conv2d_and_embedding": (
        conv_embed_net,
        conv_inputs,
        LoRAConfig(r=2, alpha=6, target_modules=["conv", "embed"]),
        {"r": 2, "lora_alpha": 6, "target_modules": ["conv", "embed"]},
    ),
}


@torch.no_grad()
def train_heads(model: nn.Module) -> None:
    """Change every classifier parameter (ours, or PEFT's modules_to_save copy)."""
    generator = torch.Generator().manual_seed(7)
    for name, param in sorted(model.named_parameters()):
        if "classifier" in name and "original_module" not in name:
            param.add_(torch.randn(param.shape, generator=generator))


def ours(family: str, config: LoRAConfig | None = None) -> nn.Module:
    build, _, default, _ = FAMILIES[family]
    model = build()
    inject_lora(model, config or default)
    randomize_adapters(model)
    train_heads(model)
    return model


def theirs(family: str, **overrides) -> nn.Module:
    build, _, _, kwargs = FAMILIES[family]
    model = peft.get_peft_model(build(), peft.LoraConfig(**{**kwargs, **overrides}))
    randomize_adapters(model)
    train_heads(model)
    return model.eval()


def assert_changed_by_adapter(family: str, adapted_out: torch.Tensor) -> None:
    build, inputs, _, _ = FAMILIES[family]
    assert (adapted_out - logits(build(), inputs())).abs().max() > 1e-3


# --- ours -> PEFT ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_saved_here_loads_in_peft_with_the_same_outputs(family, tmp_path):
    build, inputs, _, _ = FAMILIES[family]
    model = ours(family)
    expected = logits(model, inputs())
    assert_changed_by_adapter(family, expected)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert_close_relative(logits(loaded, inputs()), expected, rtol=1e-6)


def test_per_module_ranks_alphas_and_rslora_saved_here_load_in_peft(tmp_path):
    config = LoRAConfig(
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={r".*layer\.1\..*": 2},
        alpha_pattern={r".*\.value": 5},
        modules_to_save=["classifier"],
    )
    model = ours("bert_linear", config)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    assert_close_relative(logits(loaded, token_ids()), logits(model, token_ids()), rtol=1e-6)


def test_peft_adapts_exactly_the_modules_adapted_here(tmp_path):
    model = ours("bert_linear", LoRAConfig(target_modules=[r".*layer\.0\.attention\.self\.key"]))
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    peft_targets = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in loaded.named_modules()
        if name.endswith(".lora_A")
    }
    assert peft_targets == {"bert.encoder.layer.0.attention.self.key"}


# --- PEFT -> ours ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_saved_by_peft_loads_here_with_the_same_outputs(family, tmp_path):
    build, inputs, _, _ = FAMILIES[family]
    reference = theirs(family)
    expected = logits(reference, inputs())
    assert_changed_by_adapter(family, expected)
    reference.save_pretrained(str(tmp_path))
    model = build()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, inputs()), expected, rtol=1e-6)


def test_peft_rank_alpha_patterns_and_rslora_load_here(tmp_path):
    reference = theirs(
        "bert_linear",
        use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3},
    )
    reference.save_pretrained(str(tmp_path))
    model = tiny_bert()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, token_ids()), logits(reference, token_ids()), rtol=1e-6)


def test_peft_sequence_classification_adapter_loads_here(tmp_path):
    # task_type SEQ_CLS makes PEFT add its default heads ("classifier", "score") to save.
    build, inputs, _, kwargs = FAMILIES["bert_linear"]
    config = peft.LoraConfig(task_type="SEQ_CLS", **{**kwargs, "modules_to_save": None})
    reference = peft.get_peft_model(build(), config)
    randomize_adapters(reference)
    train_heads(reference)
    reference.eval().save_pretrained(str(tmp_path))
    assert_changed_by_adapter("bert_linear", logits(reference, inputs()))
    assert (
        "classifier"
        in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    )
    model = build()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, inputs()), logits(reference, inputs()), rtol=1e-6)


def test_peft_adapter_round_trips_through_here_back_to_peft(tmp_path):
    reference = theirs("gpt2_conv1d")
    reference.save_pretrained(str(tmp_path / "peft"))
    model = tiny_gpt2()
    load_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
    assert_close_relative(logits(again, token_ids()), logits(reference, token_ids()), rtol=1e-6)


# --- merged weights -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_weights_equal_peft_merge_and_unload(family, tmp_path):
    build, _, _, _ = FAMILIES[family]
    model = ours(family)
    save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(), str(tmp_path)).merge_and_unload()
    merged = unload_lora(model, merge=True).state_dict()
    expected = reference.state_dict()
    assert list(merged) == list(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
