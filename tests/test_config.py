"""LoRAConfig: defaults, derived values, normalisation and round trips (SPEC section 4).

Invalid values and their messages are in test_errors.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from lora_lightning import LoRAConfig


def test_defaults_match_the_spec_table():
    config = LoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.seed) == (8, 16, 0.0, 0)
    assert config.dtype == "float32"
    assert config.exclude_modules == [] and config.modules_to_save == []
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert config.use_rslora is False
    assert (config.init, config.bias) == ("kaiming", "none")


@pytest.mark.parametrize(
    "name",
    [
        "bert.encoder.layer.0.attention.self.query",
        "encoder.layer.3.attention.self.key",
        "value",
        "model.layers.0.self_attn.q_proj",
        "model.layers.11.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj",
    ],
)
def test_default_targets_match_attention_query_key_value_projections(name):
    assert any(re.fullmatch(p, name) for p in LoRAConfig().target_modules)


@pytest.mark.parametrize(
    "name",
    [
        "bert.encoder.layer.0.attention.output.dense",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.up_proj",
        "bert.encoder.layer.0.attention.self.query_norm",
    ],
)
def test_default_targets_do_not_match_other_projections(name):
    assert not any(re.fullmatch(p, name) for p in LoRAConfig().target_modules)


def test_scaling_is_alpha_over_r():
    assert LoRAConfig(r=4, alpha=8).scaling(4, 8.0) == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoRAConfig(r=16, alpha=8, use_rslora=True)
    assert config.scaling(16, 8.0) == pytest.approx(8 / math.sqrt(16))


def test_rank_for_uses_the_first_full_matching_rank_pattern():
    config = LoRAConfig(r=8, rank_pattern={r".*\.query": 2, r".*query": 3})
    assert config.rank_for("layer.0.query") == 2


def test_rank_for_falls_back_to_r_when_no_pattern_full_matches():
    config = LoRAConfig(r=8, rank_pattern={r"quer(y)": 2})
    assert config.rank_for("layer.0.query") == 8  # a regex full-matches, it does not search


def test_plain_names_match_as_name_suffixes_like_peft():
    config = LoRAConfig(r=8, rank_pattern={"query": 2, "layer.1.key": 3})
    assert config.rank_for("layer.0.query") == 2
    assert config.rank_for("query") == 2
    assert config.rank_for("layer.0.subquery") == 8  # a suffix after a dot, not any suffix
    assert config.rank_for("encoder.layer.1.key") == 3
    assert config.rank_for("encoder.layer.10.key") == 8


def test_alpha_for_uses_alpha_pattern_else_alpha():
    config = LoRAConfig(alpha=16, alpha_pattern={r".*\.value": 4})
    assert (config.alpha_for("layer.value"), config.alpha_for("layer.key")) == (4.0, 16.0)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float64", torch.float64),
        ("auto", None),
    ],
)
def test_torch_dtype_maps_names_to_dtypes_and_auto_to_none(name, dtype):
    assert LoRAConfig(dtype=name).torch_dtype is dtype


def test_a_single_target_string_becomes_a_one_item_list():
    assert LoRAConfig(target_modules=r".*\.query").target_modules == [r".*\.query"]


def test_omegaconf_containers_are_normalised_to_plain_list_and_dict():
    node = OmegaConf.create(
        {"target_modules": [".*query"], "rank_pattern": {".*query": 2}, "modules_to_save": []}
    )
    config = LoRAConfig(
        target_modules=node.target_modules,
        rank_pattern=node.rank_pattern,
        modules_to_save=node.modules_to_save,
    )
    assert type(config.target_modules) is list and type(config.rank_pattern) is dict
    assert config.rank_pattern == {".*query": 2}


def test_config_is_a_valid_omegaconf_structured_schema():
    schema = OmegaConf.structured(LoRAConfig)
    merged = OmegaConf.merge(schema, {"r": 4, "target_modules": [".*key"]})
    assert OmegaConf.to_object(merged) == LoRAConfig(r=4, target_modules=[".*key"])


def test_to_dict_is_json_serialisable_and_from_dict_round_trips():
    config = LoRAConfig(
        r=4, alpha=2.5, rank_pattern={"a": 0}, alpha_pattern={"b": 3.0}, modules_to_save=["c"]
    )
    restored = LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_configs_with_equal_fields_compare_equal():
    assert LoRAConfig(r=4, target_modules=["x"]) == LoRAConfig(r=4, target_modules=["x"])
    assert LoRAConfig(r=4) != LoRAConfig(r=2)
