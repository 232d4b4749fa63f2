"""inject_lora: what gets adapted, how adapters start, what trains (SPEC sections 3 and 4)."""

from __future__ import annotations

import pytest
import torch
from models import (
    conv_embed_net,
    conv_inputs,
    logits,
    mlp,
    mlp_inputs,
    randomize_adapters,
    tiny_bert,
    tiny_gpt2,
    token_ids,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning import (
    LoRAConfig,
    LoRAConfigError,
    count_parameters,
    inject_lora,
    lora_state_dict,
)
from lora_lightning.core.state import adapted_layers, layer_state

QKV = [
    f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value")
]
ALL_MLP = LoRAConfig(r=2, alpha=4, target_modules=[r"layers\.\d"])

# (builder, inputs, config) for each supported layer family on a real-looking model.
FAMILIES = {
    "linear": (tiny_bert, token_ids, LoRAConfig(r=4)),
    "gpt2_conv1d": (tiny_gpt2, token_ids, LoRAConfig(r=4, target_modules=[r".*\.c_attn"])),
    "conv2d_and_embedding": (
        conv_embed_net,
        conv_inputs,
        LoRAConfig(r=2, target_modules=["conv", "embed"]),
    ),
}


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}


# --- which modules are adapted ------------------------------------------------------------


def test_default_config_adapts_bert_query_key_value_in_model_order():
    assert inject_lora(tiny_bert()) == QKV


def test_second_inject_with_same_config_adds_nothing_and_returns_same_names():
    model = tiny_bert()
    first = inject_lora(model, LoRAConfig(r=4))
    keys, values = set(model.state_dict()), lora_tensors(model)
    second = inject_lora(model, LoRAConfig(r=4))
    assert second == first
    assert set(model.state_dict()) == keys
    assert all(torch.equal(values[k], v) for k, v in lora_tensors(model).items())


def test_second_inject_registers_no_second_forward_hook():
    model = tiny_bert()
    inject_lora(model)
    inject_lora(model)
    query = model.bert.encoder.layer[0].attention.self.query
    assert len(query._forward_hooks) == 1


def test_exclude_modules_are_never_adapted():
    config = LoRAConfig(exclude_modules=[r".*layer\.0\..*"])
    assert inject_lora(tiny_bert(), config) == QKV[3:]


def test_rank_pattern_zero_skips_the_module():
    model = tiny_bert()
    names = inject_lora(model, LoRAConfig(rank_pattern={r".*\.key": 0}))
    assert names == [n for n in QKV if not n.endswith("key")]
    assert not hasattr(model.bert.encoder.layer[0].attention.self.key, "lora_A")


def test_rank_pattern_sets_the_rank_of_matching_modules():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, rank_pattern={r".*layer\.1\..*": 2}))
    layers = model.bert.encoder.layer
    assert layers[0].attention.self.query.lora_A.weight.shape == (4, 16)
    assert layers[1].attention.self.query.lora_A.weight.shape == (2, 16)
    assert layers[1].attention.self.query.lora_B.weight.shape == (16, 2)


def test_target_fn_replaces_target_regexes():
    model = tiny_bert()
    names = inject_lora(model, target_fn=lambda name, m: name.endswith("output.dense"))
    assert names == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def test_modules_inside_modules_to_save_are_not_adapted():
    model = mlp()
    names = inject_lora(
        model, LoRAConfig(target_modules=[r"layers\.\d"], modules_to_save=["layers.1"])
    )
    assert names == ["layers.0", "layers.2"]


# --- adapter shapes and initialisation ------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape_a", "shape_b"),
    [
        (nn.Linear(5, 7), (3, 5), (7, 3)),
        (Conv1D(7, 5), (3, 5), (7, 3)),
        (nn.Conv1d(5, 7, 2), (3, 5, 2), (7, 3, 1)),
        (nn.Conv2d(5, 7, (3, 2)), (3, 5, 3, 2), (7, 3, 1, 1)),
        (nn.Conv3d(5, 7, 2), (3, 5, 2, 2, 2), (7, 3, 1, 1, 1)),
        (nn.Embedding(11, 7), (3, 11), (7, 3)),
    ],
    ids=["linear", "gpt2_conv1d", "conv1d", "conv2d", "conv3d", "embedding"],
)
def test_adapter_matrices_have_peft_shapes(layer, shape_a, shape_b):
    model = nn.Sequential(layer)
    inject_lora(model, LoRAConfig(r=3, target_modules=["0"]))
    assert tuple(layer.lora_A.weight.shape) == shape_a
    assert tuple(layer.lora_B.weight.shape) == shape_b


def test_kaiming_init_draws_a_within_the_fan_in_bound_and_zeros_b():
    model = nn.Sequential(nn.Linear(64, 32))
    inject_lora(model, LoRAConfig(r=8, target_modules=["0"]))
    a, b = model[0].lora_A.weight, model[0].lora_B.weight
    assert a.abs().max() <= 1 / 64**0.5 and a.abs().max() > 0.5 / 64**0.5
    assert torch.count_nonzero(b) == 0


def test_gaussian_init_draws_a_with_std_one_over_r():
    model = nn.Sequential(nn.Linear(500, 4))
    inject_lora(model, LoRAConfig(r=4, init="gaussian", target_modules=["0"]))
    assert model[0].lora_A.weight.std().item() == pytest.approx(0.25, rel=0.05)


def test_embedding_adapter_starts_with_zero_a_and_random_b_like_peft():
    model = nn.Sequential(nn.Embedding(10, 6))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert torch.count_nonzero(model[0].lora_A.weight) == 0
    assert torch.count_nonzero(model[0].lora_B.weight) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_unchanged_at_init(family):
    build, inputs, config = FAMILIES[family]
    model = build()
    expected = logits(model, inputs())
    inject_lora(model, config)
    assert torch.equal(logits(model, inputs()), expected)


def test_same_seed_gives_identical_adapters_on_two_injections():
    first, second = tiny_bert(seed=0), tiny_bert(seed=1)  # base weights do not matter
    inject_lora(first, LoRAConfig(seed=7))
    inject_lora(second, LoRAConfig(seed=7))
    a, b = lora_tensors(first), lora_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_different_seeds_give_different_adapters():
    first, second = tiny_bert(), tiny_bert()
    inject_lora(first, LoRAConfig(seed=0))
    inject_lora(second, LoRAConfig(seed=1))
    key = f"{QKV[0]}.lora_A.weight"
    assert not torch.equal(first.state_dict()[key], second.state_dict()[key])


def test_init_of_a_module_does_not_depend_on_what_else_is_targeted():
    only_value, everything = tiny_bert(), tiny_bert()
    inject_lora(only_value, LoRAConfig(target_modules=[r".*\.value"]))
    inject_lora(everything, LoRAConfig(target_modules=[r".*\.(query|key|value|dense)"]))
    key = f"{QKV[2]}.lora_A.weight"
    assert torch.equal(only_value.state_dict()[key], everything.state_dict()[key])


def test_init_does_not_consume_the_global_random_stream():
    model = tiny_bert()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    inject_lora(model)
    assert torch.equal(torch.rand(3), expected)


# --- the forward computation ----------------------------------------------------------------


def test_adapted_linear_computes_base_plus_scaled_low_rank_term():
    model = mlp()
    x = mlp_inputs()
    base = model.layers[0](x)
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=["layers.0"]))
    randomize_adapters(model)
    layer = model.layers[0]
    expected = base + 3.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_alpha_pattern_sets_the_scaling_of_matching_modules():
    model = mlp()
    x = mlp_inputs()
    base = model.layers[0](x)
    config = LoRAConfig(r=2, alpha=6, alpha_pattern={r"layers\.0": 1}, target_modules=["layers.0"])
    inject_lora(model, config)
    randomize_adapters(model)
    layer = model.layers[0]
    expected = base + 0.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_lora(model, LoRAConfig(r=4, alpha=6, use_rslora=True, target_modules=["0"]))
    assert layer_state(model[0]).scaling == pytest.approx(3.0)


def test_zero_dropout_creates_no_dropout_module():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(dropout=0.0))
    assert not [n for n, _ in model.named_modules() if "lora_dropout" in n]


def test_dropout_probability_is_held_once_by_the_config():
    model = tiny_bert()
    config = LoRAConfig(dropout=0.25)
    inject_lora(model, config)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora" in n]
    layers = [layer for _, _, layer in adapted_layers(model)]
    assert len(layers) == len(QKV) and all(layer.dropout == 0.25 for layer in layers)


def test_dropout_is_random_in_training_and_off_in_eval():
    model = mlp()
    inject_lora(model, LoRAConfig(dropout=0.5, target_modules=["layers.0"]))
    randomize_adapters(model)
    x = mlp_inputs()
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(model(x), first)
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("base_dtype", "adapter_dtype"),
    [(torch.float32, "bfloat16"), (torch.bfloat16, "float32"), (torch.float32, "float16")],
)
def test_mixed_dtype_adapter_runs_and_returns_the_layer_output_dtype(base_dtype, adapter_dtype):
    model = mlp().to(base_dtype)
    x = mlp_inputs().to(base_dtype)
    base = model(x)
    inject_lora(model, LoRAConfig(dtype=adapter_dtype, target_modules=[r"layers\.\d"]))
    randomize_adapters(model)
    out = model(x)
    assert model.layers[0].lora_A.weight.dtype == getattr(torch, adapter_dtype)
    assert out.dtype == base_dtype
    assert not torch.equal(out, base)


def test_bf16_embedding_adapter_on_fp32_base_returns_fp32():
    model = conv_embed_net()
    inject_lora(model, LoRAConfig(dtype="bfloat16", target_modules=["embed", "conv"]))
    randomize_adapters(model)
    assert model.embed(conv_inputs()["ids"]).dtype == torch.float32
    assert model.conv(conv_inputs()["image"]).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_auto_dtype_follows_the_base_weight(dtype):
    model = mlp().to(dtype)
    inject_lora(model, LoRAConfig(dtype="auto", target_modules=["layers.0"]))
    assert model.layers[0].lora_A.weight.dtype == dtype
    assert model.layers[0].lora_B.weight.dtype == dtype


def test_inject_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert count_parameters(model).adapter == 6 * 4 * (16 + 16)


# --- state-dict key contract ----------------------------------------------------------------


def test_injection_renames_no_existing_state_dict_key():
    plain, model = tiny_bert(), tiny_bert()
    inject_lora(model)
    before, after = plain.state_dict(), model.state_dict()
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapters_appear_at_module_path_lora_a_and_lora_b_weight():
    plain, model = tiny_bert(), tiny_bert()
    inject_lora(model)
    added = set(model.state_dict()) - set(plain.state_dict())
    assert added == {f"{n}.lora_{ab}.weight" for n in QKV for ab in "AB"}


def test_base_checkpoint_still_loads_strictly_by_the_same_keys():
    model = tiny_bert(seed=0)
    inject_lora(model)
    other = tiny_bert(seed=1).state_dict()
    missing, unexpected = model.load_state_dict(other, strict=False)
    assert unexpected == []
    assert set(missing) == {f"{n}.lora_{ab}.weight" for n in QKV for ab in "AB"}


# --- what trains ----------------------------------------------------------------------------


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_adapter_matrices_require_grad_by_default():
    model = tiny_bert()
    inject_lora(model)
    assert trainable(model) == {f"{n}.lora_{ab}.weight" for n in QKV for ab in "AB"}


@pytest.mark.parametrize(
    ("bias", "biases"),
    [
        ("none", set()),
        ("lora_only", {"layers.0.bias", "layers.1.bias"}),
        ("all", {"layers.0.bias", "layers.1.bias", "layers.2.bias"}),
    ],
)
def test_bias_mode_selects_which_biases_train(bias, biases):
    model = mlp()
    inject_lora(model, LoRAConfig(bias=bias, target_modules=["layers.0", "layers.1"]))
    assert {n for n in trainable(model) if n.endswith("bias")} == biases


def test_lora_only_biases_are_in_lora_state_dict():
    model = mlp()
    inject_lora(model, LoRAConfig(bias="lora_only", target_modules=["layers.0"]))
    assert "layers.0.bias" in lora_state_dict(model)


def test_modules_to_save_train_in_full():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(modules_to_save=["classifier"]))
    assert {"classifier.weight", "classifier.bias"} <= trainable(model)


def test_lora_state_dict_holds_adapters_and_modules_to_save_only():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(modules_to_save=["classifier"]))
    expected = {f"{n}.lora_{ab}.weight" for n in QKV for ab in "AB"}
    assert set(lora_state_dict(model)) == expected | {"classifier.weight", "classifier.bias"}


def test_lora_state_dict_shares_storage_with_the_model():
    model = mlp()
    inject_lora(model, ALL_MLP)
    tensor = lora_state_dict(model)["layers.0.lora_A.weight"]
    assert tensor.data_ptr() == model.layers[0].lora_A.weight.data_ptr()
    assert not tensor.requires_grad


def test_backward_reaches_adapters_and_not_the_frozen_base():
    model = mlp().train()
    inject_lora(model, ALL_MLP)
    model(mlp_inputs()).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n in grads if "lora_B" in n)
    assert all(grads[n] is None for n in grads if "lora_" not in n)


def test_count_parameters_counts_trainable_total_and_adapter():
    model = mlp(sizes=(6, 10, 8, 4))  # 70 + 88 + 36 = 194 base parameters
    inject_lora(model, LoRAConfig(r=2, target_modules=["layers.0", "layers.1"]))
    counts = count_parameters(model)
    adapter = 2 * (6 + 10) + 2 * (10 + 8)
    assert (counts.trainable, counts.total, counts.adapter) == (adapter, 194 + adapter, adapter)
    assert counts.adapted_modules == 2


def test_count_parameters_includes_modules_to_save_in_trainable_only():
    model = mlp(sizes=(6, 10, 8, 4))
    config = LoRAConfig(r=2, target_modules=["layers.0", "layers.1"], modules_to_save=["layers.2"])
    inject_lora(model, config)
    counts = count_parameters(model)
    assert (counts.trainable, counts.adapter) == (68 + 36, 68)


def test_adapter_dropout_follows_the_mode_of_a_model_in_eval():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    inject_lora(model, LoRAConfig(target_modules=["0"], dropout=0.5))
    randomize_adapters(model)
    x = torch.randn(64, 4)
    assert torch.equal(model(x), model(x))  # eval: no dropout
    model.train()
    assert not torch.equal(model(x), model(x))  # train: a new mask each call


def test_targets_all_removed_by_rank_zero_or_modules_to_save_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(LoRAConfigError, match=r"no module is left to adapt.*rank_pattern"):
        inject_lora(model, LoRAConfig(target_modules=["0", "1"], rank_pattern={".*": 0}))
    with pytest.raises(LoRAConfigError, match=r"modules_to_save"):
        inject_lora(model, LoRAConfig(target_modules=["1"], modules_to_save=["1"]))
    assert not any("lora_" in name for name, _ in model.named_parameters())
