"""The variant registry (``core.variants``): the core asks it, so a variant lives in one place.

DoRA's maths is ``tests/test_dora.py``'s; here: that plan, state, files and multi-adapter
operations take what they know of a variant from the registry, and refuse what they cannot
carry instead of dropping it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRAConfigError,
    LoRAStateError,
    combine_adapters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    plan_lora,
    save_adapter,
)
from lora_lightning.core import variants
from lora_lightning.core.dora import MAGNITUDE
from lora_lightning.core.state import adapter_parameter_names


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()


DORA = LoRAConfig(r=2, target_modules=["0", "2"], use_dora=True)


def test_dora_is_the_registered_variant_of_use_dora():
    variant = variants.VARIANTS["dora"]
    assert variants.enabled_variant(DORA) is variant
    assert variants.enabled_variant(LoRAConfig(target_modules=["0"])) is None
    assert variant.tensors == (MAGNITUDE,)


def test_the_plan_lists_the_tensors_the_variant_declares():
    specs = plan_lora(_mlp(), DORA).adapter_tensors()
    assert specs[f"0.{MAGNITUDE}"] == ((5,), torch.float32)
    assert specs[f"2.{MAGNITUDE}"] == ((4,), torch.float32)


def test_adapted_layers_name_their_own_tensors_including_the_variants():
    model = _mlp()
    inject_lora(model, DORA)
    assert adapter_parameter_names(model) == set(lora_state_dict(model))


def test_a_parameter_that_only_looks_like_an_adapter_tensor_is_not_one():
    model = _mlp()
    model.lora_magnitude_vector = nn.Parameter(torch.ones(3))  # not from any variant
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert "lora_magnitude_vector" not in adapter_parameter_names(model)
    assert "lora_magnitude_vector" not in lora_state_dict(model)


def test_an_unknown_variant_name_in_a_plan_is_refused_naming_the_known_ones():
    with pytest.raises(LoRAStateError, match=r"'sparse' is not registered.*\['dora'\]"):
        variants.variant_named("sparse")


def test_two_enabled_variants_are_refused(monkeypatch):
    twin = dataclasses.make_dataclass("Twin", [])()
    twin.name, twin.config_field = "twin", "use_rslora"
    twin.enabled = lambda config: config.use_rslora
    monkeypatch.setitem(variants.VARIANTS, "twin", twin)
    with pytest.raises(LoRAConfigError, match="use_dora=true, lora.use_rslora=true together"):
        plan_lora(_mlp(), dataclasses.replace(DORA, use_rslora=True))


def test_combining_variant_adapters_is_refused_with_the_variants_reason(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        trained = _mlp()
        inject_lora(trained, dataclasses.replace(DORA, seed=seed))
        save_adapter(trained, tmp_path / name)
    model = _mlp()
    load_adapter(model, tmp_path / "a", name="a")
    load_adapter(model, tmp_path / "b", name="b")
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    reason = re.escape(variants.VARIANTS["dora"].combine_refusal)
    with pytest.raises(LoRAStateError, match=f"'a' {reason}.*'b' {reason}"):
        combine_adapters(model, {"a": 1.0, "b": 1.0}, "mix")
    after = lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_written_file_carries_every_variants_flag(tmp_path):
    model = _mlp()
    inject_lora(model, DORA)
    save_adapter(model, tmp_path / "dora")
    written = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert {field: written[field] for field in variants.peft_fields()} == {"use_dora": True}


def test_every_flag_the_config_marks_as_a_variant_is_a_registered_variants_and_back():
    from lora_lightning.core.config import variant_flags

    assert variant_flags() == ("use_dora",)
    assert set(variant_flags()) == set(variants.config_fields())


def test_a_variant_flag_no_registered_variant_claims_is_refused_not_dropped(monkeypatch):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(variants, "VARIANTS", {})
    with pytest.raises(LoRAConfigError, match=r"lora.use_dora=true names a LoRA variant that is"):
        inject_lora(model, DORA)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init": "pissa"}, r"lora.init='pissa' with lora.use_dora=true is not supported"),
        ({"init": "olora"}, r"lora.init='olora' with lora.use_dora=true is not supported"),
        ({"quantize_base": "int8"}, r"quantize_base='int8' with lora.use_dora=true is not"),
    ],
)
def test_a_variant_flag_refuses_what_needs_another_base_by_name(fields, message):
    with pytest.raises(LoRAConfigError, match=message):
        LoRAConfig(target_modules=["0"], use_dora=True, **fields)
    config = LoRAConfig(target_modules=["0"], use_dora=True)
    for key, value in fields.items():
        setattr(config, key, value)  # mutated after construction: caught on the next use
    with pytest.raises(LoRAConfigError, match=message):
        plan_lora(_mlp(), config)
