"""save_adapter / load_adapter: PEFT-format directories, round trips, atomicity (SPEC section 6).

Loading into PEFT and from PEFT is in test_peft_parity.py; file errors in test_errors.py.
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from models import (
    assert_unchanged,
    conv_embed_net,
    conv_inputs,
    logits,
    mlp,
    mlp_inputs,
    randomize_adapters,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    token_ids,
)
from torch import nn

import lora_lightning.core.files
from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAStateError,
    UnsupportedModuleError,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

FAMILIES = {
    "bert_linear": (tiny_bert, token_ids, LoRAConfig(r=4, modules_to_save=["classifier"])),
    "gpt2_conv1d": (tiny_gpt2, token_ids, LoRAConfig(r=4, target_modules=[r".*\.c_attn"])),
    "conv2d_and_embedding": (
        conv_embed_net,
        conv_inputs,
        LoRAConfig(r=2, alpha=3, target_modules=["conv", "embed"]),
    ),
}


def adapted(family: str, config: LoRAConfig | None = None, seed: int = 0) -> nn.Module:
    build, _, default = FAMILIES[family]
    model = build()
    inject_lora(model, config or default)
    randomize_adapters(model, seed=seed)
    with torch.no_grad():  # a "trained" head, so modules_to_save round trips mean something
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    return model


def read_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "adapter_model.safetensors"))


# --- what is written ------------------------------------------------------------------------


def test_save_writes_exactly_the_two_peft_files(tmp_path):
    save_adapter(adapted("bert_linear"), tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_save_creates_missing_parent_directories_and_returns_the_directory(tmp_path):
    target = tmp_path / "a" / "b" / "adapter"
    assert save_adapter(adapted("bert_linear"), target) == target
    assert (target / "adapter_model.safetensors").is_file()


def test_saved_config_has_peft_fields(tmp_path):
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"])
    save_adapter(adapted("bert_linear", config), tmp_path)
    saved = read_config(tmp_path)
    assert saved["peft_type"] == "LORA"
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.1)
    assert saved["target_modules"] == sorted(
        f"bert.encoder.layer.{i}.attention.self.{p}"
        for i in (0, 1)
        for p in ("query", "key", "value")
    )
    assert saved["modules_to_save"] == ["classifier"]
    assert (saved["use_rslora"], saved["bias"], saved["fan_in_fan_out"]) == (False, "none", False)
    assert (saved["rank_pattern"], saved["alpha_pattern"]) == ({}, {})
    assert saved["init_lora_weights"] is True


def test_saved_config_sets_fan_in_fan_out_for_gpt2_conv1d(tmp_path):
    save_adapter(adapted("gpt2_conv1d"), tmp_path)
    assert read_config(tmp_path)["fan_in_fan_out"] is True


def test_saved_config_records_gaussian_init(tmp_path):
    config = LoRAConfig(init="gaussian", modules_to_save=["classifier"])
    save_adapter(adapted("bert_linear", config), tmp_path)
    assert read_config(tmp_path)["init_lora_weights"] == "gaussian"


def test_saved_config_records_per_module_ranks_and_alphas(tmp_path):
    config = LoRAConfig(
        r=4,
        alpha=8,
        rank_pattern={r".*layer\.1\.attention\.self\.query": 2},
        alpha_pattern={r".*layer\.0\.attention\.self\.key": 3},
    )
    save_adapter(adapted("bert_linear", config), tmp_path)
    saved = read_config(tmp_path)
    assert saved["rank_pattern"] == {r"bert\.encoder\.layer\.1\.attention\.self\.query": 2}
    assert saved["alpha_pattern"] == {r"bert\.encoder\.layer\.0\.attention\.self\.key": 3}


def test_saved_linear_tensors_use_peft_keys_and_shapes(tmp_path):
    save_adapter(adapted("bert_linear"), tmp_path)
    tensors = read_tensors(tmp_path)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert tensors[f"{prefix}.lora_A.weight"].shape == (4, 16)
    assert tensors[f"{prefix}.lora_B.weight"].shape == (16, 4)
    assert len([k for k in tensors if ".lora_" in k]) == 12


def test_saved_modules_to_save_use_their_plain_peft_keys(tmp_path):
    model = adapted("bert_linear")
    save_adapter(model, tmp_path)
    tensors = read_tensors(tmp_path)
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight)
    assert "base_model.model.classifier.bias" in tensors


def test_saved_conv_and_embedding_tensors_use_peft_keys_and_shapes(tmp_path):
    save_adapter(adapted("conv2d_and_embedding"), tmp_path)
    shapes = {k: tuple(v.shape) for k, v in read_tensors(tmp_path).items()}
    assert shapes == {
        "base_model.model.conv.lora_A.weight": (2, 3, 3, 3),
        "base_model.model.conv.lora_B.weight": (5, 2, 1, 1),
        "base_model.model.embed.lora_embedding_A": (2, 20),
        "base_model.model.embed.lora_embedding_B": (6, 2),
    }


def test_saved_adapter_holds_no_frozen_base_weight(tmp_path):
    save_adapter(adapted("gpt2_conv1d"), tmp_path)
    assert all(".lora_" in key for key in read_tensors(tmp_path))


def test_save_keeps_the_adapter_dtype(tmp_path):
    config = LoRAConfig(dtype="bfloat16", modules_to_save=["classifier"])
    save_adapter(adapted("bert_linear", config), tmp_path)
    tensors = read_tensors(tmp_path)
    assert {t.dtype for k, t in tensors.items() if ".lora_" in k} == {torch.bfloat16}


def test_save_uses_the_given_state_dict_instead_of_live_parameters(tmp_path):
    model = mlp()
    inject_lora(model, LoRAConfig(target_modules=["layers.0"]))
    state = {k: torch.full_like(v, 0.5) for k, v in lora_state_dict(model).items()}
    save_adapter(model, tmp_path, state_dict=state)
    assert torch.all(read_tensors(tmp_path)["base_model.model.layers.0.lora_A.weight"] == 0.5)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]), "shape (3, 6) to save"),
        (lambda t: t.double(), "dtype torch.float64 to save"),
        (lambda t: torch.full_like(t, float("nan")), "holds NaN or Inf values"),
        (lambda t: torch.empty_like(t, device="meta"), "on the meta device"),
        (lambda t: t.tolist(), "a list, not a tensor"),
    ],
    ids=["wrong-shape", "wrong-dtype", "nan", "meta", "not-a-tensor"],
)
def test_a_bad_state_dict_is_refused_before_any_byte_is_written(tmp_path, edit, named):
    model = mlp()
    inject_lora(model, LoRAConfig(r=2, target_modules=["layers.0"]))
    save_adapter(model, tmp_path / "adapter")
    before = _folder_bytes(tmp_path / "adapter")
    state = dict(lora_state_dict(model))
    key = "layers.0.lora_A.weight"
    state[key] = edit(state[key])
    with pytest.raises(AdapterFileError, match="nothing was written") as raised:
        save_adapter(model, tmp_path / "adapter", state_dict=state)
    assert f"{key}: {named}" in str(raised.value)
    assert _folder_bytes(tmp_path / "adapter") == before


def test_compiled_model_saves_keys_without_orig_mod(tmp_path):
    model = adapted("bert_linear")
    compiled = torch.compile(model)  # not run: only the wrapper's names matter here
    save_adapter(compiled, tmp_path)
    keys = list(read_tensors(tmp_path))
    assert keys and not [k for k in keys if "_orig_mod" in k]
    assert not [m for m in read_config(tmp_path)["target_modules"] if "_orig_mod" in m]


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_into_a_fresh_base_with_the_same_outputs(family, tmp_path):
    build, inputs, _ = FAMILIES[family]
    model = adapted(family)
    save_adapter(model, tmp_path)
    fresh = build()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, inputs()), logits(model, inputs()))


def test_load_returns_the_adapted_module_names(tmp_path):
    save_adapter(adapted("conv2d_and_embedding"), tmp_path)
    assert load_adapter(conv_embed_net(), tmp_path) == ["embed", "conv"]


def test_round_trip_keeps_per_module_ranks_alphas_and_rslora(tmp_path):
    config = LoRAConfig(
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={r".*layer\.1\..*": 2},
        alpha_pattern={r".*\.value": 5},
        modules_to_save=["classifier"],
    )
    model = adapted("bert_linear", config)
    save_adapter(model, tmp_path)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, token_ids()), logits(model, token_ids()))


def test_round_trip_keeps_the_adapter_dtype(tmp_path):
    save_adapter(adapted("bert_linear", LoRAConfig(dtype="bfloat16")), tmp_path)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert fresh.bert.encoder.layer[0].attention.self.query.lora_A.weight.dtype == torch.bfloat16


def test_loaded_adapter_is_trainable_and_base_is_frozen(tmp_path):
    save_adapter(adapted("bert_linear"), tmp_path)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(fresh))
    assert {"classifier.weight", "classifier.bias"} <= trainable


def test_load_into_a_model_injected_with_the_same_targets_overwrites_values(tmp_path):
    model = adapted("gpt2_conv1d", seed=1)
    save_adapter(model, tmp_path)
    other = adapted("gpt2_conv1d", seed=2)
    keys = set(other.state_dict())
    load_adapter(other, tmp_path)
    assert set(other.state_dict()) == keys
    assert torch.equal(logits(other, token_ids()), logits(model, token_ids()))


def test_load_into_a_compiled_wrapper_adapts_the_wrapped_model(tmp_path):
    model = adapted("bert_linear")
    save_adapter(model, tmp_path)
    fresh = tiny_bert()
    load_adapter(torch.compile(fresh), tmp_path)
    assert torch.equal(logits(fresh, token_ids()), logits(model, token_ids()))


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = adapted("bert_linear")
    save_adapter(model, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("load_adapter unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, token_ids()), logits(model, token_ids()))


# --- state errors and atomicity -------------------------------------------------------------


def test_save_while_merged_raises_lora_state_error(tmp_path):
    model = adapted("bert_linear")
    merge_lora(model)
    with pytest.raises(LoRAStateError, match="unmerge_lora"):
        save_adapter(model, tmp_path)


def test_save_while_merged_writes_nothing(tmp_path):
    model = adapted("bert_linear")
    merge_lora(model)
    with pytest.raises(LoRAStateError):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_without_adapters_raises_lora_state_error(tmp_path):
    with pytest.raises(LoRAStateError, match="inject_lora"):
        save_adapter(mlp(), tmp_path)


def test_load_into_a_merged_model_raises_lora_state_error(tmp_path):
    model = adapted("bert_linear")
    save_adapter(model, tmp_path)
    merge_lora(model)
    with pytest.raises(LoRAStateError, match="unmerge_lora"):
        load_adapter(model, tmp_path)


def test_saving_again_replaces_the_previous_adapter(tmp_path):
    save_adapter(adapted("bert_linear", seed=1), tmp_path)
    newer = adapted("bert_linear", seed=2)
    save_adapter(newer, tmp_path)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, token_ids()), logits(newer, token_ids()))


def test_failed_save_leaves_the_previous_adapter_intact_and_no_partial_file(tmp_path, monkeypatch):
    old = mlp()
    inject_lora(old, LoRAConfig(r=2, target_modules=[r"layers\.\d"]))
    randomize_adapters(old, seed=1)
    save_adapter(old, tmp_path)
    old_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save_file = safetensors.torch.save_file

    def save_file_then_disk_full(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # half-written when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(lora_lightning.core.files, "save_file", save_file_then_disk_full)
    new = mlp()
    inject_lora(new, LoRAConfig(r=4, target_modules=[r"layers\.\d"]))
    randomize_adapters(new, seed=2)
    with pytest.raises(OSError) as raised:
        save_adapter(new, tmp_path)
    assert raised.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old_bytes
    fresh = mlp()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(mlp_inputs()), old(mlp_inputs()))


def test_failed_save_into_a_new_directory_leaves_no_adapter_file(tmp_path, monkeypatch):
    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(lora_lightning.core.files, "save_file", disk_full)
    with pytest.raises(OSError):
        save_adapter(adapted("bert_linear"), tmp_path / "adapter")
    # The directory never appears (files go to a hidden sibling, renamed only when complete),
    # and the hidden temporary is cleaned up.
    assert not (tmp_path / "adapter").exists()
    assert list(tmp_path.iterdir()) == []


def _with_modules_to_save(directory: Path, entries: list[str]) -> None:
    path = directory / "adapter_config.json"
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "modules_to_save": entries}))


def test_a_modules_to_save_entry_the_model_lacks_is_refused_by_name(tmp_path):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=2, modules_to_save=["classifier"]))
    save_adapter(model, tmp_path)
    _with_modules_to_save(tmp_path, ["classifier", "sentiment_head"])
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match=r"modules_to_save \['sentiment_head'\]"):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_peft_task_heads_the_model_lacks_are_not_refused(tmp_path):
    model = tiny_bert()  # PEFT's SEQ_CLS models list both classifier and score
    inject_lora(model, LoRAConfig(r=2, modules_to_save=["classifier"]))
    save_adapter(model, tmp_path)
    _with_modules_to_save(tmp_path, ["classifier", "score"])
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)


class _OneModuleTwoNames(nn.Module):
    """``second`` is ``first``: one Linear reachable under two names, called twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 6)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("target", ["first", "second"])
def test_a_module_under_two_names_is_refused_by_name_under_either_name(target):
    model = _OneModuleTwoNames()
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=r"'first' is also held as \['second'\]"):
        inject_lora(model, LoRAConfig(r=2, target_modules=[target]))
    assert_unchanged(model, before)


def test_saving_an_adapter_held_under_two_names_is_refused_before_writing(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    model.alias = model[0]  # aliased after injection
    with pytest.raises(LoRAStateError, match="one tensor under several names"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
