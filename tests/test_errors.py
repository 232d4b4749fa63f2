"""Errors are for people: they name the field, module or file, the bad value, what is allowed.

Covers invalid config values, targets that match nothing, unsupported module types, state
errors, and adapter files that are missing, unsafe, of another kind or of the wrong shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from models import mlp, randomize_adapters, tiny_bert, tiny_config, tiny_gpt2
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    LoRAStateError,
    UnsupportedModuleError,
    inject_lora,
    load_adapter,
    save_adapter,
)

# --- configuration values -------------------------------------------------------------------

# (keyword arguments, text naming field and bad value, text saying what is allowed)
INVALID = [
    ({"r": 0}, "lora.r=0", "integer >= 1"),
    ({"r": -3}, "lora.r=-3", "integer >= 1"),
    ({"r": 2.5}, "lora.r=2.5", "integer >= 1"),
    ({"r": True}, "lora.r=True", "integer >= 1"),
    ({"alpha": 0}, "lora.alpha=0", "number > 0"),
    ({"alpha": -1.0}, "lora.alpha=-1.0", "number > 0"),
    ({"alpha": math.nan}, "lora.alpha=nan", "number > 0"),
    ({"alpha": "16"}, "lora.alpha='16'", "number > 0"),
    ({"dropout": 1.0}, "lora.dropout=1.0", "[0, 1)"),
    ({"dropout": -0.1}, "lora.dropout=-0.1", "[0, 1)"),
    ({"seed": -1}, "lora.seed=-1", "integer >= 0"),
    ({"dtype": "fp32"}, "lora.dtype='fp32'", "float32, float16, bfloat16, float64, auto"),
    ({"init": "xavier"}, "lora.init='xavier'", "kaiming, gaussian"),
    ({"bias": "some"}, "lora.bias='some'", "none, lora_only, all"),
    ({"use_rslora": "yes"}, "lora.use_rslora='yes'", "true or false"),
    ({"target_modules": []}, "lora.target_modules=[]", "at least one regex"),
    ({"target_modules": [3]}, "lora.target_modules entry 3", "regex string"),
    ({"target_modules": ["(query"]}, "lora.target_modules regex '(query'", "regular expression"),
    ({"exclude_modules": ["[a"]}, "lora.exclude_modules regex '[a'", "regular expression"),
    ({"modules_to_save": ["*head"]}, "lora.modules_to_save regex '*head'", "regular expression"),
    ({"rank_pattern": {".*q": -1}}, "lora.rank_pattern['.*q']=-1", "integer >= 0"),
    ({"rank_pattern": {"(q": 2}}, "lora.rank_pattern regex '(q'", "regular expression"),
    ({"rank_pattern": [1, 2]}, "lora.rank_pattern=[1, 2]", "mapping of regex -> number"),
    ({"alpha_pattern": {".*q": 0}}, "lora.alpha_pattern['.*q']=0", "number > 0"),
]


@pytest.mark.parametrize(("kwargs", "names_value", "allowed"), INVALID, ids=lambda v: repr(v))
def test_invalid_config_value_error_names_field_value_and_what_is_allowed(
    kwargs, names_value, allowed
):
    with pytest.raises(LoRAConfigError) as raised:
        LoRAConfig(**kwargs)
    assert names_value in str(raised.value)
    assert allowed in str(raised.value)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        LoRAConfig(r=0)


def test_unknown_config_field_error_names_it_and_lists_valid_fields():
    with pytest.raises(LoRAConfigError) as raised:
        LoRAConfig.from_dict({"rr": 8})
    message = str(raised.value)
    assert "['rr']" in message
    assert all(f"'{name}'" in message for name in ("r", "alpha", "target_modules"))


# --- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "pattern", "close", "example"),
    [
        (tiny_bert, "qeury", "query", "bert.encoder.layer.0.attention.self.query"),
        (tiny_bert, r".*\.qurey", "query", "bert.encoder.layer.0.attention.self.query"),
        (tiny_gpt2, "c_atn", "c_attn", "transformer.h.0.attn.c_attn"),
        (tiny_bert, "classifer", "classifier", "classifier"),
    ],
)
def test_targets_matching_nothing_suggest_the_close_names_once_with_an_example(
    build, pattern, close, example
):
    with pytest.raises(LoRAConfigError) as raised:
        inject_lora(build(), LoRAConfig(target_modules=[pattern]))
    message = str(raised.value)
    assert "lora.target_modules" in message and repr(pattern) in message
    assert "matched no module" in message
    assert f"did you mean {close!r} (e.g. {example})" in message
    assert len(message) < 400


def test_targets_matching_nothing_close_list_the_layer_names_when_nothing_is_close():
    with pytest.raises(LoRAConfigError) as raised:
        inject_lora(tiny_bert(), LoRAConfig(target_modules=["attn"]))
    message = str(raised.value)
    assert "no name is close" in message and "'query', 'key', 'value'" in message
    assert "pooler.dense" not in message


def test_modules_to_save_matching_nothing_is_an_error_naming_the_field():
    with pytest.raises(LoRAConfigError) as raised:
        inject_lora(tiny_bert(), LoRAConfig(modules_to_save=["clasifier"]))
    message = str(raised.value)
    assert "lora.modules_to_save" in message and "'clasifier'" in message
    assert "'classifier'" in message


def test_target_fn_selecting_nothing_is_an_error():
    with pytest.raises(LoRAConfigError, match="target_fn selected no module"):
        inject_lora(mlp(), target_fn=lambda name, module: False)


def test_target_matching_nothing_leaves_the_model_unchanged():
    model = tiny_bert()
    keys = list(model.state_dict())
    with pytest.raises(LoRAConfigError):
        inject_lora(model, LoRAConfig(target_modules=["nothing"]))
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_target_error_names_the_module_and_its_type():
    with pytest.raises(UnsupportedModuleError) as raised:
        inject_lora(tiny_bert(), LoRAConfig(target_modules=[r".*attention\.output\.LayerNorm"]))
    message = str(raised.value)
    assert "'bert.encoder.layer.0.attention.output.LayerNorm'" in message
    assert "LayerNorm" in message and "nn.Linear" in message and "Embedding" in message


def test_unsupported_target_is_a_type_error():
    with pytest.raises(TypeError):
        inject_lora(nn.Sequential(nn.ReLU()), LoRAConfig(target_modules=["0"]))


def test_unsupported_target_among_supported_ones_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedModuleError):
        inject_lora(model, LoRAConfig(target_modules=["0", "1"]))
    assert list(model.state_dict()) == keys
    assert not model[0]._forward_hooks


def test_grouped_convolution_is_refused_naming_groups():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        inject_lora(model, LoRAConfig(target_modules=["0"]))


def test_injecting_a_different_config_into_an_adapted_model_is_refused():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4))
    with pytest.raises(LoRAStateError, match="unload_lora"):
        inject_lora(model, LoRAConfig(r=2))


def test_every_error_type_is_a_lora_error():
    for error in (LoRAConfigError, UnsupportedModuleError, AdapterFileError, LoRAStateError):
        assert issubclass(error, LoRAError)


# --- adapter files --------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """An adapter of tiny_bert (query/key/value, r=4) in ``tmp_path / "adapter"``."""
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4))
    randomize_adapters(model)
    return save_adapter(model, tmp_path / "adapter")


def load_error(directory: Path, model: nn.Module | None = None) -> str:
    with pytest.raises(AdapterFileError) as raised:
        load_adapter(model if model is not None else tiny_bert(), directory)
    return str(raised.value)


def test_missing_adapter_directory_is_named(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "does not exist" in message


def test_missing_config_file_is_named(saved):
    (saved / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in load_error(saved)


def test_missing_weights_file_is_named(saved):
    (saved / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in load_error(saved)


def test_pickle_only_adapter_bin_is_refused_without_unpickling(saved, monkeypatch):
    weights = saved / "adapter_model.safetensors"
    torch.save(safetensors.torch.load_file(str(weights)), saved / "adapter_model.bin")
    weights.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the .bin file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    message = load_error(saved)
    assert "adapter_model.bin" in message and "pickle" in message
    assert "adapter_model.safetensors" in message  # says what to provide instead


def test_non_lora_adapter_is_refused_naming_its_peft_type(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "IA3"}))
    message = load_error(saved)
    assert "'IA3'" in message and "'LORA'" in message


def test_invalid_json_config_is_named(saved):
    (saved / "adapter_config.json").write_text("{not json")
    assert "is not valid JSON" in load_error(saved)


def test_invalid_rank_in_adapter_config_names_the_field(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 0}))
    message = load_error(saved)
    assert "r=0" in message and "integer >= 1" in message


def test_unreadable_weights_file_is_named(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert "not a readable safetensors file" in load_error(saved)


def _wider_bert() -> BertForSequenceClassification:
    """A BERT of hidden size 32: every adapter saved from the width-16 tiny BERT misfits."""
    return BertForSequenceClassification(tiny_config(BertConfig, hidden_size=32, num_labels=3))


def test_wrong_shapes_list_every_mismatch_at_once(saved):
    wider = _wider_bert().eval()
    message = load_error(saved, wider)
    assert "12 problem(s)" in message
    for i in (0, 1):
        for proj in ("query", "key", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{i}.attention.self.{proj}"
            assert (
                f"{prefix}.lora_A.weight: shape (4, 16) in file, model expects (4, 32)" in message
            )
            assert (
                f"{prefix}.lora_B.weight: shape (16, 4) in file, model expects (32, 4)" in message
            )


def test_wrong_shapes_leave_the_model_without_adapters(saved):
    model = _wider_bert()
    keys = list(model.state_dict())
    load_error(saved, model)
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())


def test_missing_tensor_is_listed(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    key = "base_model.model.bert.encoder.layer.1.attention.self.key.lora_B.weight"
    del tensors[key]
    safetensors.torch.save_file(tensors, str(weights))
    assert f"missing {key}" in load_error(saved)


def test_dtype_mismatch_with_existing_adapters_is_listed(saved):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, dtype="bfloat16"))
    assert "dtype torch.float32 in file, model expects torch.bfloat16" in load_error(saved, model)


def test_adapter_for_modules_the_model_lacks_names_them(saved):
    message = load_error(saved, mlp())
    assert "targets modules the model does not have" in message
    assert "bert.encoder.layer.0.attention.self.key" in message


def test_adapter_not_matching_existing_adapters_lists_the_difference(saved):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, target_modules=[r".*\.(query|key)"]))
    message = load_error(saved, model)
    assert "in the file but not adapted in the model" in message
    assert "bert.encoder.layer.0.attention.self.value" in message


def test_adapter_with_another_scaling_than_existing_adapters_is_refused(saved):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, alpha=4))  # the file has lora_alpha 16: scaling 4, not 1
    message = load_error(saved, model)
    assert "another scaling" in message
    assert "bert.encoder.layer.0.attention.self.query (model 1, file 4)" in message


def test_adapter_keys_without_peft_prefix_are_refused(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    safetensors.torch.save_file(
        {k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(weights)
    )
    assert "keys must start with 'base_model.model.'" in load_error(saved)


def test_adapter_file_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        load_adapter(mlp(), tmp_path / "nowhere")
