"""merge_lora / unmerge_lora / unload_lora (SPEC sections 3 and 8)."""

from __future__ import annotations

import pytest
import torch
from models import (
    assert_close_relative,
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

from lora_lightning import (
    LoRAConfig,
    LoRAStateError,
    inject_lora,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

FAMILIES = {
    "bert_linear": (tiny_bert, token_ids, LoRAConfig(r=4)),
    "gpt2_conv1d": (tiny_gpt2, token_ids, LoRAConfig(r=4, target_modules=[r".*\.c_attn"])),
    "conv2d_and_embedding": (
        conv_embed_net,
        conv_inputs,
        LoRAConfig(r=2, target_modules=["conv", "embed"]),
    ),
}


def adapted(family: str, seed: int = 0) -> tuple[nn.Module, object]:
    """A model of ``family`` with random (non-trivial) adapters, and its inputs."""
    build, inputs, config = FAMILIES[family]
    model = build(seed=seed)
    inject_lora(model, config)
    randomize_adapters(model)
    return model, inputs()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_and_unmerged_outputs_agree_in_float32(family):
    model, inputs = adapted(family)
    unmerged = logits(model, inputs)
    merge_lora(model)
    assert_close_relative(logits(model, inputs), unmerged, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_adapters_change_the_output(family):
    # Guards the parity tests: with trivial adapters every comparison would pass.
    build, inputs, _ = FAMILIES[family]
    model, x = adapted(family)
    assert (logits(model, x) - logits(build(), x)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_then_unmerge_restores_base_weights(family):
    model, _ = adapted(family)
    before = base_weights(model)
    merge_lora(model)
    unmerge_lora(model)
    after = base_weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_merge_adds_scaled_b_times_a_to_the_weight():
    model = mlp()
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=["layers.0"]))
    randomize_adapters(model)
    layer = model.layers[0]
    expected = layer.weight + 3.0 * layer.lora_B.weight @ layer.lora_A.weight
    merge_lora(model)
    torch.testing.assert_close(layer.weight, expected)


def test_merged_adapters_stop_contributing_to_the_output():
    model = mlp()
    inject_lora(model, LoRAConfig(target_modules=["layers.0"]))
    randomize_adapters(model)
    merge_lora(model)
    x = mlp_inputs()
    merged = model(x)
    with torch.no_grad():
        model.layers[0].lora_B.weight.mul_(100)
    assert torch.equal(model(x), merged)


def test_merge_does_not_bake_in_dropout():
    model = mlp()
    inject_lora(model, LoRAConfig(dropout=0.5, target_modules=[r"layers\.\d"]))
    randomize_adapters(model)
    x = mlp_inputs()
    unmerged = model.eval()(x)
    model.train()  # merging in training mode must not sample a dropout mask into W
    merge_lora(model)
    assert_close_relative(model.eval()(x), unmerged)


def test_merge_into_bf16_base_rounds_once_from_a_float32_sum():
    model = mlp(sizes=(64, 64)).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=8, alpha=16, dtype="bfloat16", target_modules=["layers.0"]))
    randomize_adapters(model, scale=0.05)
    layer = model.layers[0]
    delta = 2.0 * layer.lora_B.weight.float() @ layer.lora_A.weight.float()
    reference = (layer.weight.float() + delta).to(torch.bfloat16)
    merge_lora(model)
    assert torch.equal(layer.weight, reference)


def test_merge_in_float64_keeps_float64_precision():
    model = mlp().double()
    inject_lora(model, LoRAConfig(dtype="auto", target_modules=[r"layers\.\d"]))
    randomize_adapters(model)
    x = mlp_inputs().double()
    unmerged = model(x)
    before = base_weights(model)
    merge_lora(model)
    assert_close_relative(model(x), unmerged, rtol=1e-12)
    unmerge_lora(model)
    after = base_weights(model)
    assert all((after[k] - before[k]).abs().max() < 1e-14 for k in before)


def test_merging_twice_raises_lora_state_error():
    model, _ = adapted("bert_linear")
    merge_lora(model)
    with pytest.raises(LoRAStateError, match="already merged"):
        merge_lora(model)


def test_unmerge_when_not_merged_raises_lora_state_error():
    model, _ = adapted("bert_linear")
    with pytest.raises(LoRAStateError, match="not merged"):
        unmerge_lora(model)


def test_merge_without_adapters_raises_lora_state_error():
    with pytest.raises(LoRAStateError, match="no LoRA adapters"):
        merge_lora(mlp())


def test_training_a_merged_model_raises():
    model, _ = adapted("bert_linear")
    merge_lora(model)
    model.train()
    with pytest.raises(LoRAStateError, match="unmerge_lora"):
        model(**token_ids())


def test_merged_model_runs_in_train_mode_without_grad():
    model, inputs = adapted("bert_linear")
    merge_lora(model)
    model.train()
    with torch.no_grad():
        model(**inputs)


def test_unmerged_model_trains_again_after_unmerge():
    model, inputs = adapted("bert_linear")
    merge_lora(model)
    unmerge_lora(model)
    model.train()
    model(**inputs).logits.sum().backward()
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.lora_B.weight.grad is not None


# --- unload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_unload_leaves_exactly_the_base_state_dict_keys(family, merge):
    build = FAMILIES[family][0]
    model, _ = adapted(family)
    plain = unload_lora(model, merge=merge)
    assert list(plain.state_dict()) == list(build().state_dict())


def test_unload_removes_every_hook_and_lora_attribute():
    model, _ = adapted("conv2d_and_embedding")
    unload_lora(model)
    for module in model.modules():
        assert not module._forward_hooks
        assert not [k for k in vars(module) if "lora" in k.lower()]
        assert not [k for k in module._modules if "lora" in k]


def test_unload_with_merge_keeps_the_adapted_outputs():
    model, inputs = adapted("gpt2_conv1d")
    expected = logits(model, inputs)
    unload_lora(model, merge=True)
    assert_close_relative(logits(model, inputs), expected)


def test_unload_without_merge_restores_the_base_outputs():
    build, _, _ = FAMILIES["bert_linear"]
    model, inputs = adapted("bert_linear")
    unload_lora(model, merge=False)
    assert torch.equal(logits(model, inputs), logits(build(), inputs))


def test_unload_of_a_merged_model_without_merge_unmerges_first():
    build, _, _ = FAMILIES["conv2d_and_embedding"]
    model, inputs = adapted("conv2d_and_embedding")
    merge_lora(model)
    unload_lora(model, merge=False)
    assert_close_relative(logits(model, inputs), logits(build(), inputs))


def test_unload_keeps_trained_modules_to_save():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    trained = model.classifier.weight.clone()
    unload_lora(model)
    assert torch.equal(model.classifier.weight, trained)


def test_unloaded_model_accepts_a_new_injection_with_another_config():
    model, _ = adapted("bert_linear")
    unload_lora(model)
    names = inject_lora(model, LoRAConfig(r=2, target_modules=[r".*\.value"]))
    assert names == [
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.value",
    ]  # noqa: E501
