"""Exporting an adapter says what vLLM will refuse to serve (DoRA, trained biases,
modules_to_save other than the embeddings and lm_head), and nothing for a clean one."""

from __future__ import annotations

import warnings

import pytest
from llm_models import tiny_causal_lm
from models import tiny_bert

from lora_lightning import (
    LoRAConfig,
    ServingCompatibilityWarning,
    inject_lora,
    save_adapter,
    vllm_unsupported,
)

TARGETS = [".*q_proj", ".*v_proj"]


def adapted(**fields):
    model = tiny_causal_lm(tied=False)
    inject_lora(model, LoRAConfig(r=2, target_modules=TARGETS, **fields))
    return model


def test_a_plain_adapter_saves_without_a_serving_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ServingCompatibilityWarning)
        save_adapter(adapted(), tmp_path / "a")
    assert vllm_unsupported(adapted()) == []


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "trained biases"),
        ({"modules_to_save": [".*norm"]}, "modules_to_save"),
    ],
)
def test_a_feature_vllm_refuses_is_named_when_the_adapter_is_written(tmp_path, fields, named):
    model = adapted(**fields)
    with pytest.warns(ServingCompatibilityWarning, match=named):
        path = save_adapter(model, tmp_path / "a")
    assert (path / "adapter_model.safetensors").is_file()  # written all the same


def test_lm_head_in_modules_to_save_is_servable():
    assert vllm_unsupported(adapted(modules_to_save=["lm_head"])) == []


def test_a_classifier_is_not_held_to_a_generation_servers_rules(tmp_path):
    model = tiny_bert()
    inject_lora(
        model, LoRAConfig(r=2, target_modules=[".*query"], modules_to_save=[".*classifier"])
    )
    assert vllm_unsupported(model) == []
