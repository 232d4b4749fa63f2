"""Plan, validate, then apply (issue: core redesign): every failing ``inject_lora`` or
``load_adapter`` leaves the model exactly as it was, and the plan is a pure function."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import assert_unchanged, mlp, randomize_adapters, snapshot, tiny_bert, tiny_gpt2
from torch import nn

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    LoRAStateError,
    UnsupportedModuleError,
    apply_plan,
    inject_lora,
    load_adapter,
    merge_lora,
    plan_lora,
    save_adapter,
    unload_lora,
)
from lora_lightning.core import adapted_layers, config_of
from lora_lightning.core import inject as inject_module
from lora_lightning.core.plan import TiedWeightWarning


# ------------------------------------------------------------------------------ snapshots
def mixed_model() -> nn.Module:
    """Linear layers, a LayerNorm LoRA cannot adapt, and a head, some in train mode."""
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3))
    model[2].train(False)
    return model


# ------------------------------------------------------------------- the plan is pure
def test_plan_describes_every_target_and_leaves_the_model_untouched():
    model = tiny_bert()
    before = snapshot(model)
    plan = plan_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["classifier"]))
    assert_unchanged(model, before)
    assert len(plan.targets) == 6 and not plan.already_applied
    query = plan.targets[0]
    assert (query.kind, query.r, query.alpha, query.scaling) == ("linear", 4, 8.0, 2.0)
    assert (query.shape_a, query.shape_b) == ((4, 16), (16, 4))
    assert plan.modules_to_save == ("classifier",)
    assert "classifier.weight" in plan.trainable_tensors(model)
    assert "r=4" in plan.summary()


def test_apply_plan_adapts_exactly_the_planned_targets():
    model = tiny_bert()
    plan = plan_lora(model, LoRAConfig(r=2))
    assert apply_plan(model, plan) == plan.names
    assert [name for name, _, _ in adapted_layers(model)] == plan.names
    assert plan_lora(model, LoRAConfig(r=2)).already_applied


def test_a_stale_plan_is_refused():
    model = tiny_bert()
    plan = plan_lora(model, LoRAConfig(r=2))
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(LoRAStateError, match="no longer fits"):
        apply_plan(model, plan)


# ------------------------------------------------- failing injections change nothing
BAD_CONFIGS = [
    pytest.param(dict(target_modules=["0", "nothing_here"]), LoRAConfigError, id="entry-matches-nothing"),
    pytest.param(dict(target_modules=["0"], modules_to_save=["no_head"]), LoRAConfigError, id="save-matches-nothing"),
    pytest.param(dict(target_modules=["0", "1"]), UnsupportedModuleError, id="unsupported-layernorm"),
    pytest.param(dict(target_modules=["0"], rank_pattern={"0": 0}), LoRAConfigError, id="all-rank-zero"),
    pytest.param(dict(target_modules=["3"], modules_to_save=["3"]), LoRAConfigError, id="target-inside-saved"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "error"), BAD_CONFIGS)
def test_failing_inject_leaves_the_model_exactly_as_before(fields, error):
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(error):
        inject_lora(model, LoRAConfig(**fields))
    assert_unchanged(model, before)


def test_a_retry_after_a_failed_inject_uses_the_new_rank():
    model = mixed_model()
    with pytest.raises(LoRAConfigError):
        inject_lora(model, LoRAConfig(r=8, target_modules=["0"], modules_to_save=["nope"]))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert model[0].lora_A.weight.shape[0] == 2


def test_an_error_while_applying_is_rolled_back(monkeypatch):
    model = tiny_bert()
    before = snapshot(model)
    calls = []
    real_attach = inject_module.attach

    def attach_then_fail(module, name, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_attach(module, name, **kwargs)

    monkeypatch.setattr(inject_module, "attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        inject_lora(model, LoRAConfig(modules_to_save=["classifier"]))
    assert_unchanged(model, before)


@st.composite
def bad_configs(draw):
    """Configs with at least one fault: an entry matching nothing, an unsupported target, a
    modules_to_save entry matching nothing, or a field mutated to an invalid value."""
    targets = draw(st.lists(st.sampled_from(["0", "2", "3", r"\d"]), min_size=1, max_size=3))
    fault = draw(st.sampled_from(["missing", "layernorm", "saved", "mutated", "rank0"]))
    config = LoRAConfig(r=draw(st.integers(1, 4)), target_modules=list(targets))
    if fault == "missing":
        config.target_modules.append(draw(st.sampled_from(["q_proj", r".*\.query", "4"])))
    elif fault == "layernorm":
        config.target_modules.append("1")
    elif fault == "saved":
        config.modules_to_save = [draw(st.sampled_from(["head", r"cls.*"]))]
    elif fault == "rank0":
        config.rank_pattern = {".*": 0}
    else:
        field, value = draw(
            st.sampled_from([("r", -1), ("r", 0), ("dropout", 2.0), ("alpha", float("nan")),
                             ("dtype", "float8"), ("bias", "some"), ("target_modules", [b"0"])])
        )  # fmt: skip
        setattr(config, field, value)
    return config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=bad_configs())
def test_property_no_failing_inject_changes_the_model(config):
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(LoRAError):
        inject_lora(model, config)
    assert_unchanged(model, before)


# ------------------------------------------------- failing loads change nothing
def _saved(tmp_path, model, config) -> str:
    inject_lora(model, config)
    randomize_adapters(model)
    return str(save_adapter(model, tmp_path / "adapter"))


def test_load_of_a_file_targeting_an_unsupported_layer_changes_nothing_and_names_the_file(
    tmp_path,
):
    source = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    directory = _saved(tmp_path, source, LoRAConfig(r=2, target_modules=["0", "1"]))
    model = mixed_model()  # module "1" is a LayerNorm here
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as raised:
        load_adapter(model, directory)
    assert directory in str(raised.value) and "LayerNorm" in str(raised.value)
    assert_unchanged(model, before)


def test_a_linear_that_its_parent_reads_directly_is_refused_not_silently_inert():
    """nn.MultiheadAttention computes with ``out_proj.weight`` itself and never calls
    ``out_proj``: an adapter there would never run (its outputs were unchanged by it)."""
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    before = snapshot(model)
    for targets in (["out_proj"], [r".*(out_proj|linear1)"]):
        with pytest.raises(UnsupportedModuleError, match=r"'self_attn\.out_proj' is inside an nn"):
            inject_lora(model, LoRAConfig(r=2, target_modules=targets))
        assert_unchanged(model, before)
    assert inject_lora(model, LoRAConfig(r=2, target_modules=["linear1", "linear2"])) == [
        "linear1",
        "linear2",
    ]


def test_load_with_a_wrong_shape_changes_nothing(tmp_path):
    directory = _saved(
        tmp_path, mlp(sizes=(6, 10, 8, 4)), LoRAConfig(r=2, target_modules=["layers.0"])
    )
    model = mlp(sizes=(6, 12, 8, 4))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="shape"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_load_into_a_meta_model_is_refused_not_dropped(tmp_path):
    directory = _saved(tmp_path, mlp(), LoRAConfig(r=2, target_modules=["layers.0"]))
    with torch.device("meta"):
        model = mlp()
    before_keys = list(model.state_dict())
    with pytest.raises(AdapterFileError, match="meta device"):
        load_adapter(model, directory)
    assert list(model.state_dict()) == before_keys and not list(adapted_layers(model))


def test_load_into_a_model_adapted_with_other_modules_changes_nothing(tmp_path):
    directory = _saved(tmp_path, mlp(), LoRAConfig(r=2, target_modules=["layers.0"]))
    model = mlp()
    inject_lora(model, LoRAConfig(r=2, target_modules=["layers.1"]))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="not adapted in the model"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


# ------------------------------------------------------ one owner of the LoRA state
def test_the_config_is_stored_once_and_shared_by_every_layer():
    model = tiny_bert()
    config = LoRAConfig(dropout=0.1)
    inject_lora(model, config)
    owners = {id(layer.owner) for _, _, layer in adapted_layers(model)}
    assert len(owners) == 1 and config_of(model) is config


class AdaptsItsOwnNetwork(nn.Module):
    """A module that injects LoRA into its inner network in ``__init__`` (r=4, layers.0)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        inject_lora(self.net, LoRAConfig(r=4, target_modules=["layers.0"]))


def test_an_inner_network_adapted_with_another_config_is_refused_from_outside():
    outer = AdaptsItsOwnNetwork()
    before = snapshot(outer)
    with pytest.raises(LoRAStateError, match=r"r: 4 -> 2"):
        inject_lora(outer, LoRAConfig(r=2, target_modules=["layers.0"]))
    assert_unchanged(outer, before)


def test_same_config_from_outside_is_idempotent():
    outer = AdaptsItsOwnNetwork()
    assert inject_lora(outer, LoRAConfig(r=4, target_modules=["layers.0"])) == ["net.layers.0"]


# ------------------------------------------------------------------ validate at use
def test_a_config_mutated_after_construction_is_caught_at_use():
    model = mlp()
    config = LoRAConfig(target_modules=["layers.0"])
    config.r = -1
    with pytest.raises(LoRAConfigError, match=r"lora\.r=-1"):
        inject_lora(model, config)
    config.r, config.dropout = 2, 2.0
    with pytest.raises(LoRAConfigError, match=r"lora\.dropout=2\.0"):
        plan_lora(model, config)


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    config = LoRAConfig(r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1),
                        rank_pattern={"x": np.int32(2)})  # fmt: skip
    assert (config.r, config.alpha, config.rank_pattern["x"]) == (4, 8.0, 2)
    assert type(config.r) is int and type(config.alpha) is float
    assert config.to_dict()["r"] == 4


@pytest.mark.parametrize("value", [b"query", [b"query"], 3, {"query": 1}])
def test_non_string_targets_are_refused_by_name(value):
    with pytest.raises(LoRAConfigError, match="target_modules"):
        LoRAConfig(target_modules=value)


def test_legacy_fuse_shared_input_maps_to_the_two_fields_it_stood_for():
    assert (LoRAConfig(fuse_shared_input=False).group_shared_input,
            LoRAConfig(fuse_shared_input=False).dropout_masks) == (False, "torch")  # fmt: skip
    legacy = LoRAConfig.from_dict({**LoRAConfig().to_dict(), "fuse_shared_input": True})
    assert legacy == LoRAConfig() and "fuse_shared_input" not in legacy.to_dict()


# --------------------------------------------------------------------- merge safety
def test_targeting_a_tied_weight_warns_like_peft():
    with pytest.warns(TiedWeightWarning, match="wte"):
        inject_lora(tiny_gpt2(), LoRAConfig(target_modules=["lm_head"]))


@pytest.mark.filterwarnings("ignore::lora_lightning.core.plan.TiedWeightWarning")
def test_merging_a_tied_weight_is_refused_and_changes_nothing():
    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(target_modules=["lm_head"]))
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="tied"):
        merge_lora(model)
    assert_unchanged(model, before)
    with pytest.raises(LoRAStateError, match="tied"):
        unload_lora(copy.deepcopy(model), merge=True)
