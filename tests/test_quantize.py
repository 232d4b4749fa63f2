"""QLoRA: ``LoRAConfig.quantize_base`` stores the frozen base of adapted layers quantized.

The model is a 1-layer BERT of width 128, so each query/key/value weight holds 128 x 128 =
16384 values: one NF4 block group (64 x 256). Quantization error, measured on this model
with zero adapters (relative L2 error of the logits against the float base): nf4 5.2e-3,
int8 2.8e-4; the tests allow nf4 2e-2 and int8 2e-3 (:data:`OUTPUT_ERROR`). With
``quantize_scope=all_linear`` (every Linear but the classifier quantized too, nf4 keeping the
3 x 128 classifier float): nf4 9.8e-2, int8 1.1e-2; allowed 0.15 and 2e-2
(:data:`ALL_LINEAR_OUTPUT_ERROR`). Per weight
(``experiments/bench/results/quant_libraries.md``, random Gaussian 768 x 3072): relative
error of ``W x`` 9.2e-2 for nf4, 7.7e-3 for int8.

Also the 2-process DDP driver: ``python tests/test_quantize.py OUT`` (Lightning re-launches
this file for rank 1), run by
:func:`test_two_process_ddp_trains_identical_adapters_on_a_quantized_base`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    plan_lora,
    save_adapter,
    unload_lora,
)
from lora_lightning.core import config_of, quantize
from lora_lightning.core.errors import (
    CheckpointMismatchError,
    LoRAConfigError,
    LoRAStateError,
    UnsupportedModuleError,
)
from lora_lightning.core.state import quantized_modules

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # when run as the DDP driver script
    sys.path.insert(0, str(TESTS))

from ddp_runner import run_ddp_driver  # noqa: E402
from lightning_models import BertModule, token_dataset, trainer  # noqa: E402
from models import mlp, randomize_adapters, seeded, tiny_config  # noqa: E402

QKV = ["query", "key", "value"]
ADAPTED = [f"bert.encoder.layer.0.attention.self.{n}" for n in QKV]
#: Largest relative L2 error of the logits (zero adapters) allowed per scheme; see docstring.
OUTPUT_ERROR = {"nf4": 2e-2, "int8": 2e-3}
SCHEMES = ("nf4", "int8")
ALL_LINEAR_OUTPUT_ERROR = {"nf4": 0.15, "int8": 2e-2}
#: The frozen Linears of :func:`qbert` besides the adapted ones (nf4 can store each: 16384 or
#: 32768 weights); its classifier (3 x 128) is the one Linear nf4 cannot store.
FROZEN = [
    "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.0.output.dense",
    "bert.pooler.dense",
]


def qbert(seed: int = 0) -> BertForSequenceClassification:
    """1 layer, width 128 (query/key/value 128 x 128: nf4-sized), 3 labels, eval mode."""
    config = tiny_config(
        BertConfig, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=256, num_labels=3,
    )  # fmt: skip
    return seeded(BertForSequenceClassification, config, seed)


def ids(seed: int = 1, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 8), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def qconfig(scheme: str = "nf4", **kwargs: Any) -> LoRAConfig:
    return LoRAConfig(target_modules=QKV, quantize_base=scheme, **kwargs)


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every storage tensor of every quantized weight, by ``<param>/<part>``."""
    return {
        f"{name}/{part}": tensor.clone()
        for name, param in model.named_parameters()
        if quantize.is_quantized(param)
        for part, tensor in quantize.storage(param)
    }


class QBertModule(BertModule):
    """:class:`BertModule` around :func:`qbert`, 3 classes over :func:`token_dataset`."""

    def __init__(self, seed: int = 0, lr: float = 0.02, n: int = 8) -> None:
        super().__init__(seed=seed, lr=lr, n=n)
        self.model = qbert(seed).train()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_dataset(self.n), batch_size=4, shuffle=False)


# --- the quantized base --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapted_bases_are_stored_quantized_within_the_stated_output_error(scheme):
    reference = logits(qbert(), ids())
    model = qbert()
    assert inject_lora(model, qconfig(scheme)) == ADAPTED
    modules = dict(model.named_modules())
    for name in ADAPTED:
        weight = modules[name].weight
        assert quantize.scheme_of(weight) == scheme and not weight.requires_grad
        assert quantize.stored_bytes(weight) < weight.numel() * (0.6 if scheme == "nf4" else 1.1)
    assert not quantize.is_quantized(modules["bert.encoder.layer.0.output.dense"].weight)
    error = relative_error(logits(model, ids()), reference)
    assert 0 < error <= OUTPUT_ERROR[scheme], error


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_input_gradient_through_a_quantized_base_is_that_of_its_dequantized_weight(scheme):
    """Adapters below a quantized layer learn through it: its input gradient must be right."""
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    stored_weight = quantize.quantize(weight, scheme)
    x = torch.randn(5, 128, requires_grad=True)
    grad = torch.randn(5, 256)
    F.linear(x, stored_weight).backward(grad)
    through_quantized, x.grad = x.grad, None
    F.linear(x, quantize.dequantize(stored_weight)).backward(grad)
    torch.testing.assert_close(through_quantized, x.grad, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(x.grad, grad @ weight, atol=1e-3)  # dequantized != original


def test_training_lowers_the_loss_and_leaves_the_quantized_storage_bit_identical():
    model = qbert().train()
    inject_lora(model, qconfig("nf4", dropout=0.1))
    before = stored(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("bias")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_state_dict(model)) and len(names) == 6
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    tokens, labels = ids(batch=8), torch.arange(8) % 3
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(input_ids=tokens).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    after = stored(model)
    assert before.keys() == after.keys() and len(before) == 3 * 5
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_parameter_counts_are_logical_element_counts_not_packed_bytes():
    plain, quantized = qbert(), qbert()
    inject_lora(plain, LoRAConfig(target_modules=QKV))
    inject_lora(quantized, qconfig("nf4"))
    assert count_parameters(quantized) == count_parameters(plain)
    assert count_parameters(quantized).total == sum(p.numel() for p in qbert().parameters()) + 3 * (
        2 * 8 * 128
    )


# --- merge, export, unload -----------------------------------------------------------------


def test_merge_lora_is_refused_by_name_and_the_model_is_unchanged():
    model = qbert()
    inject_lora(model, qconfig("nf4"))
    randomize_adapters(model, scale=0.05)
    before, out = stored(model), logits(model, ids())
    with pytest.raises(LoRAStateError, match=r"stored quantized \(nf4.*merged_state_dict"):
        merge_lora(model)
    assert all(torch.equal(v, stored(model)[k]) for k, v in before.items())
    assert torch.equal(logits(model, ids()), out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merged_state_dict_holds_dequantized_merged_float_weights(scheme):
    model = qbert()
    inject_lora(model, qconfig(scheme))
    randomize_adapters(model, scale=0.05)
    out = logits(model, ids())
    merged = merged_state_dict(model)
    modules = dict(model.named_modules())
    for name in ADAPTED:
        module = modules[name]
        value = merged[f"{name}.weight"]
        assert type(value) is torch.Tensor and value.dtype == torch.float32
        delta = 2.0 * module.lora_B.weight @ module.lora_A.weight  # s = 16 / 8
        assert delta.abs().max() > 1e-3
        expected = quantize.dequantize(module.weight) + delta
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    plain = qbert()
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits(plain, ids()), out, rtol=1e-4, atol=1e-5)


def test_unload_without_merge_leaves_dequantized_float_weights():
    model = qbert()
    inject_lora(model, qconfig("nf4"))
    randomize_adapters(model, scale=0.05)
    modules = dict(model.named_modules())
    dequantized = {n: quantize.dequantize(modules[n].weight) for n in ADAPTED}
    assert unload_lora(model, merge=False) is model
    for name in ADAPTED:
        weight = modules[name].weight
        assert type(weight) is nn.Parameter and not quantize.is_quantized(weight)
        assert torch.equal(weight, dequantized[name])
    assert "_ddp_params_and_buffers_to_ignore" not in model.__dict__
    assert not any("lora_" in k for k in model.state_dict())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_float_base_loaded_after_injection_is_stored_as_quantizing_it_would(scheme):
    """``load_state_dict`` of a plain base checkpoint into a quantized model: int8's tensor
    cannot take a float copy_ at all; both schemes must store the new base's quantized codes."""
    model = qbert()
    inject_lora(model, qconfig(scheme))
    new_base = qbert(seed=5)
    expected = qbert(seed=5)
    inject_lora(expected, qconfig(scheme))
    result = model.load_state_dict(new_base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys)
    assert stored(model).keys() == stored(expected).keys()
    for key, tensor in stored(expected).items():
        assert torch.equal(stored(model)[key], tensor), key
    torch.testing.assert_close(logits(model, ids()), logits(expected, ids()))
    # A wrong shape is still torch's size-mismatch error, and the weight is unchanged.
    before = stored(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({f"{ADAPTED[0]}.weight": torch.zeros(3, 3)}, strict=False)
    assert all(torch.equal(stored(model)[k], v) for k, v in before.items())
    # Once unloaded, the layer is a plain Linear again: a float load is a plain copy.
    unload_lora(model, merge=False)
    module = dict(model.named_modules())[ADAPTED[0]]
    assert not module._load_state_dict_pre_hooks


def test_unload_with_merge_folds_the_adapters_into_dequantized_weights():
    model = qbert()
    inject_lora(model, qconfig("int8"))
    randomize_adapters(model, scale=0.05)
    out = logits(model, ids())
    unload_lora(model, merge=True)
    assert not quantize.quantized_parameter_names(model)
    torch.testing.assert_close(logits(model, ids()), out, rtol=1e-4, atol=1e-5)


def test_adapter_file_loads_in_peft_onto_the_full_precision_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = qbert()
    inject_lora(model, qconfig("nf4"))
    randomize_adapters(model, scale=0.05)
    quantized_out = logits(model, ids())
    save_adapter(model, tmp_path / "adapter")

    ours = qbert()
    load_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(qbert(), str(tmp_path / "adapter")).eval()
    float_out = logits(theirs, ids())
    torch.testing.assert_close(float_out, logits(ours, ids()), rtol=1e-5, atol=1e-6)
    assert not quantize.quantized_parameter_names(ours)  # the file is plain LoRA
    assert 0 < relative_error(quantized_out, float_out) <= OUTPUT_ERROR["nf4"]


# --- refusals and rollback -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"quantize_base": "fp4"}, r"quantize_base='fp4' is invalid: expected one of none, nf4, int8"),
        ({"quantize_base": True}, r"quantize_base=True is invalid"),
        ({"quantize_base": "nf4", "use_dora": True}, r"quantize_base='nf4' with lora.use_dora"),
        ({"quantize_base": "int8", "init": "pissa"}, r"quantize_base='int8' with lora.init='pissa'"),
        ({"quantize_base": "nf4", "quantize_scope": "all"},
         r"quantize_scope='all' is invalid: expected one of adapted, all_linear"),
        ({"quantize_scope": "all_linear"},
         r"quantize_scope='all_linear' with lora.quantize_base='none'"),
    ],
)  # fmt: skip
def test_bad_quantize_base_values_are_refused_by_name(kwargs, text):
    with pytest.raises(LoRAConfigError, match=text):
        LoRAConfig(**kwargs)


def _bert_with_tied_query() -> nn.Module:
    model = qbert()
    layer = model.bert.encoder.layer[0].attention.self
    layer.key.weight = layer.query.weight
    return model


@pytest.mark.parametrize(
    ("build", "config", "text"),
    [
        (lambda: mlp(sizes=(6, 10, 4)), LoRAConfig(target_modules=["layers.0"], quantize_base="nf4"),
         r"'layers.0' is \(10, 6\) \(60 weights\): nf4 stores a multiple of 1024"),
        (qbert, LoRAConfig(target_modules=["word_embeddings"], quantize_base="int8"),
         r"'bert.embeddings.word_embeddings' is a Embedding, whose base weight "
         r"quantize_base='int8' cannot store"),
        (_bert_with_tied_query, qconfig("int8"), r"'bert.encoder.layer.0.attention.self.query' is "
         r"tied to .*would untie"),
    ],
)  # fmt: skip
def test_layers_a_scheme_cannot_store_are_refused_by_name_before_any_change(build, config, text):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=text):
        inject_lora(model, config)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(quantize.is_quantized(p) for p in model.parameters())


def test_a_meta_base_is_refused_by_name():
    with torch.device("meta"):
        model = BertForSequenceClassification(qbert().config)
    with pytest.raises(UnsupportedModuleError, match=r"on the meta device: quantize_base='nf4'"):
        plan_lora(model, qconfig("nf4"))


def test_a_missing_torchao_is_one_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = qbert()
    with pytest.raises(LoRAConfigError, match=r"pip install 'lora-lightning\[quant\]'"):
        inject_lora(model, qconfig("nf4"))
    assert not quantize.quantized_parameter_names(model)


def test_a_failure_mid_apply_restores_the_original_float_weights(monkeypatch):
    model = qbert()
    model._ddp_params_and_buffers_to_ignore = ["classifier.bias"]
    modules = dict(model.named_modules())
    params = {n: modules[n].weight for n in ADAPTED}
    values = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    real = quantize.quantize

    def fail_on_third(weight, scheme):
        calls.append(scheme)
        if len(calls) == 3:
            raise RuntimeError("out of memory while quantizing")
        return real(weight, scheme)

    monkeypatch.setattr(quantize, "quantize", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject_lora(model, qconfig("nf4"))
    assert len(calls) == 3
    for name in ADAPTED:
        assert modules[name].weight is params[name]
        assert torch.equal(modules[name].weight, values[name])
        assert not hasattr(modules[name], "lora_A")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model._ddp_params_and_buffers_to_ignore == ["classifier.bias"]
    assert "_lora_ddp_ignored" not in model.__dict__


# --- quantize_scope=all_linear: every frozen Linear ------------------------------------------


def all_linear(scheme: str = "nf4", **kwargs: Any) -> LoRAConfig:
    return qconfig(scheme, quantize_scope="all_linear", **kwargs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_linear_stores_every_frozen_linear_quantized_within_the_stated_output_error(scheme):
    reference = qbert()
    model = qbert()
    assert inject_lora(model, all_linear(scheme)) == ADAPTED
    modules, float_modules = dict(model.named_modules()), dict(reference.named_modules())
    storable = [*FROZEN, "classifier"] if scheme == "int8" else FROZEN
    assert sorted(quantize_scope_names(model)) == sorted(storable)
    for name in [*ADAPTED, *storable]:
        weight = modules[name].weight
        assert quantize.scheme_of(weight) == scheme and not weight.requires_grad
        assert modules[name].bias is not None and not quantize.is_quantized(modules[name].bias)
        # The layer computes with exactly its dequantized weight (zero adapters).
        float_modules[name].weight.data = quantize.dequantize(weight)
    assert quantize.is_quantized(modules["classifier"].weight) == (scheme == "int8")
    out = logits(model, ids())
    torch.testing.assert_close(out, logits(reference, ids()), rtol=1e-5, atol=1e-5)
    error = relative_error(out, logits(qbert(), ids()))
    assert 0 < error <= ALL_LINEAR_OUTPUT_ERROR[scheme], error


def quantize_scope_names(model: nn.Module) -> list[str]:
    """Frozen, not adapted modules whose weight is stored quantized."""
    adapted = set(ADAPTED)
    return [
        n
        for n, m in model.named_modules()
        if n not in adapted and quantize.is_quantized(getattr(m, "weight", None))
    ]


def test_adapted_scope_plans_and_quantizes_the_adapted_layers_only():
    plan = plan_lora(qbert(), qconfig("nf4"))
    assert plan.quantized_frozen == () and plan.kept_float == ()
    model = qbert()
    inject_lora(model, qconfig("nf4"))
    assert quantize_scope_names(model) == []


def _bert_with_tied_dense() -> nn.Module:
    model = qbert()
    model.bert.pooler.dense.weight = model.bert.encoder.layer[0].attention.output.dense.weight
    return model


def test_all_linear_keeps_float_and_lists_with_reasons_what_it_cannot_or_must_not_store():
    plan = plan_lora(qbert(), all_linear("nf4"))
    assert plan.quantized_frozen == tuple((n, "nf4") for n in FROZEN)
    ((name, why),) = plan.kept_float
    assert name == "classifier" and "(3, 128) (384 weights): nf4 stores a multiple of 1024" in why
    assert "classifier  frozen, base kept float: (3, 128)" in plan.summary()
    assert "bert.pooler.dense  frozen, base nf4" in plan.summary()

    saved = plan_lora(_bert_with_tied_dense(), all_linear("int8", modules_to_save=["classifier"]))
    assert [n for n, _ in saved.quantized_frozen] == FROZEN[1:3]
    reasons = dict(saved.kept_float)
    assert list(reasons) == [FROZEN[0], FROZEN[3], "classifier"]
    assert reasons["classifier"] == "trained in full (modules_to_save)"
    assert reasons["bert.pooler.dense"].startswith(f"tied to ['{FROZEN[0]}.weight']")
    assert "would untie" in reasons[FROZEN[0]]


def test_all_linear_training_leaves_every_quantized_storage_bit_identical():
    model = qbert().train()
    inject_lora(model, all_linear("nf4", modules_to_save=["classifier"]))
    before = stored(model)
    assert len(before) == (3 + 4) * 5
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_state_dict(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tokens, labels = ids(batch=8), torch.arange(8) % 3
    for _ in range(3):
        loss = F.cross_entropy(model(input_ids=tokens).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = stored(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_all_linear_counts_logical_parameters_and_lists_every_quantized_one_for_ddp():
    plain, model = qbert(), qbert()
    inject_lora(plain, LoRAConfig(target_modules=QKV))
    inject_lora(model, all_linear("nf4"))
    assert count_parameters(model) == count_parameters(plain)
    expected = sorted(f"{n}.weight" for n in [*ADAPTED, *FROZEN])
    assert model._ddp_params_and_buffers_to_ignore == expected


def test_all_linear_merge_refusal_and_merged_state_dict_dequantize_every_layer():
    model = qbert()
    inject_lora(model, all_linear("nf4"))
    randomize_adapters(model, scale=0.05)
    with pytest.raises(LoRAStateError, match=r"adapted layer .*stored quantized \(nf4"):
        merge_lora(model)
    out, modules = logits(model, ids()), dict(model.named_modules())
    merged = merged_state_dict(model)
    for name in FROZEN:
        value = merged[f"{name}.weight"]
        assert type(value) is torch.Tensor and value.dtype == torch.float32
        assert torch.equal(value, quantize.dequantize(modules[name].weight))
    plain = qbert()
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits(plain, ids()), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge", [False, True])
def test_unload_under_all_linear_dequantizes_every_quantized_layer_and_clears_the_marks(merge):
    model = qbert()
    inject_lora(model, all_linear("nf4"))
    modules = dict(model.named_modules())
    dequantized = {n: quantize.dequantize(modules[n].weight) for n in FROZEN}
    assert [n for n, _ in quantized_modules(model)] == FROZEN
    unload_lora(model, merge=merge)
    assert not quantize.quantized_parameter_names(model)
    for name in FROZEN:
        weight = modules[name].weight
        assert type(weight) is nn.Parameter and torch.equal(weight, dequantized[name])
    assert list(quantized_modules(model)) == [] and config_of(model) is None
    assert "_ddp_params_and_buffers_to_ignore" not in model.__dict__


def test_a_failure_mid_apply_under_all_linear_restores_every_original_weight(monkeypatch):
    model = qbert()
    modules = dict(model.named_modules())
    params = {n: modules[n].weight for n in [*ADAPTED, *FROZEN]}
    values = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    real = quantize.quantize_layer

    def fail_on_sixth(module, scheme):
        calls.append(scheme)
        if len(calls) == 6:  # 3 adapted layers and 2 frozen ones quantized already
            raise RuntimeError("out of memory while quantizing")
        return real(module, scheme)

    monkeypatch.setattr(quantize, "quantize_layer", fail_on_sixth)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject_lora(model, all_linear("nf4"))
    assert len(calls) == 6
    for name, param in params.items():
        assert modules[name].weight is param and torch.equal(param, values[name])
    assert not quantize.quantized_parameter_names(model)
    assert list(quantized_modules(model)) == [] and config_of(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "_ddp_params_and_buffers_to_ignore" not in model.__dict__


# --- Lightning: checkpoints, resume, fingerprint, DDP ----------------------------------------


def _fit(root: Path, module: QBertModule, epochs: int, ckpt: Path | None = None, **options):
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    callback = LoRACallback(target_modules=QKV, quantize_base="nf4", **options)
    run = trainer(root, [callback, checkpoint], max_epochs=epochs)
    run.fit(module, ckpt_path=ckpt)
    return callback, sorted((root / "ckpt").glob("*.ckpt"))


def test_checkpoints_are_adapter_only_and_resume_exactly(tmp_path):
    full = QBertModule()
    callback, checkpoints = _fit(tmp_path / "full", full, epochs=2)
    expected = {k: v.detach().clone() for k, v in lora_state_dict(full).items()}
    saved = torch.load(checkpoints[0], weights_only=False)
    assert set(saved["state_dict"]) == set(expected)  # no base weight, quantized or not

    resumed = QBertModule()
    again, _ = _fit(tmp_path / "resumed", resumed, epochs=2, ckpt=checkpoints[0])
    assert again.fingerprint == callback.fingerprint
    got = lora_state_dict(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(
        torch.equal(a, b)
        for a, b in zip(stored(full).values(), stored(resumed).values(), strict=True)
    )


def test_resume_onto_a_changed_base_is_refused(tmp_path):
    _, checkpoints = _fit(tmp_path / "first", QBertModule(), epochs=1)
    changed = QBertModule()
    with torch.no_grad():
        changed.model.bert.encoder.layer[0].attention.self.key.weight[0, 0] += 1.0
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        _fit(tmp_path / "second", changed, epochs=2, ckpt=checkpoints[0])


def test_the_base_fingerprint_hashes_the_stored_codes():
    from lora_lightning.lightning.fingerprint import base_fingerprint

    first, second, other = qbert(), qbert(), qbert()
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.value.weight[3, 5] -= 0.5
    for model in (first, second, other):
        inject_lora(model, qconfig("nf4"))
    assert base_fingerprint(first) == base_fingerprint(second)
    assert base_fingerprint(first) != base_fingerprint(other)
    plain = qbert()
    inject_lora(plain, LoRAConfig(target_modules=QKV))
    assert base_fingerprint(plain) != base_fingerprint(first)


@pytest.mark.slow
def test_two_process_ddp_trains_identical_adapters_on_a_quantized_base(tmp_path):
    """One driver run fits an nf4 and an int8 base under 2-process DDP (gloo). DDP's
    construction-time broadcast cannot flatten an int8 tensor (``aten.view``), so this fails
    unless the quantized weights are in ``_ddp_params_and_buffers_to_ignore``."""
    run_ddp_driver(Path(__file__), tmp_path)
    initial = QBertModule()
    inject_lora(initial, LoRAConfig(target_modules=QKV))
    start = lora_state_dict(initial)
    for scheme in SCHEMES:
        ranks = [torch.load(tmp_path / f"{scheme}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for key, value in ranks[0]["lora"].items():
            assert torch.equal(value, ranks[1]["lora"][key]), (scheme, key)
        assert any(not torch.equal(ranks[0]["lora"][k], start[k]) for k in start)  # it trained
        fresh = QBertModule()
        inject_lora(fresh, qconfig(scheme))
        expected = stored(fresh)
        for rank in ranks:
            assert rank["stored"].keys() == expected.keys()
            assert all(torch.equal(v, expected[k]) for k, v in rank["stored"].items())
            assert rank["ignored"] == sorted(f"model.{n}.weight" for n in ADAPTED)


def _ddp_driver(out: Path) -> None:
    """Each rank: fit QBertModule on an nf4, then an int8 base, 2 steps each; save the
    adapters, the quantized storage and DDP's ignore list it ends with."""
    import torch.distributed as dist

    for scheme in SCHEMES:
        module = QBertModule()
        callback = LoRACallback(target_modules=QKV, quantize_base=scheme)
        run = trainer(out / scheme, [callback], strategy="ddp", devices=2, max_steps=2)
        run.fit(module)
        torch.save(
            {
                "lora": {k: v.detach().clone() for k, v in lora_state_dict(module).items()},
                "stored": stored(module),
                "ignored": module._ddp_params_and_buffers_to_ignore,
            },
            out / f"{scheme}_rank{dist.get_rank()}.pt",
        )


if __name__ == "__main__":
    _ddp_driver(Path(sys.argv[1]))


def test_nf4_groups_block_scales_by_256_or_the_largest_power_of_two_dividing_the_blocks():
    from lora_lightning.core.quantize import nf4_scaler_block

    assert nf4_scaler_block(1536 * 576) == 256  # SmolLM2's MLP: QLoRA's grouping
    assert nf4_scaler_block(576 * 576) == 64  # SmolLM2's q/o_proj: 5184 blocks
    assert nf4_scaler_block(192 * 576) == 64  # its k/v_proj: 1728 blocks
    assert nf4_scaler_block(1024) == 16
    assert nf4_scaler_block(512) is None and nf4_scaler_block(1000) is None


def test_a_smollm2_shaped_attention_projection_is_stored_as_nf4_with_qloras_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 576, bias=False))
    reference = model[0].weight.detach().clone()
    inject_lora(model, LoRAConfig(r=4, target_modules=["0"], quantize_base="nf4"))
    assert quantize.scheme_of(model[0].weight) == "nf4"
    error = (quantize.dequantize(model[0].weight) - reference).norm() / reference.norm()
    assert 0.05 < float(error) < 0.1  # NF4's error on Gaussian weights, as at 256 per group
