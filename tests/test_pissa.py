"""PiSSA and OLoRA initialisation (``LoRAConfig.init``): PEFT's init on the same weights, the
base weight rewritten all or nothing, and adapter files converted to plain LoRA (rank 2r) that
load on the stock base with the same outputs, here and in PEFT, both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import BertModule, trainer
from models import assert_close_relative, conv_embed_net, logits, tiny_bert, tiny_gpt2, token_ids
from torch import nn

from lora_lightning import (
    AdapterFileError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    UnsupportedModuleError,
    inject_lora,
    load_adapter,
    merge_lora,
    plan_lora,
    save_adapter,
    unload_lora,
)
from lora_lightning.core import inject, layers

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
QKV = ["query", "key", "value"]


@torch.no_grad()
def nudge_adapters(model: nn.Module, seed: int = 5, scale: float = 0.1) -> None:
    """Move every adapter matrix (ours or PEFT's) off its init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def _peft_named(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter matrices and adapted base weights under our names."""
    found = {}
    for name, param in model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".default", "")
        found[plain.replace(".base_layer", "")] = param.detach()
    return found


@pytest.mark.parametrize(
    ("build", "init", "targets", "peft_kwargs"),
    [
        (tiny_bert, "pissa", QKV, {}),
        (tiny_bert, "olora", QKV, {}),
        (tiny_gpt2, "pissa", ["c_attn"], {"fan_in_fan_out": True}),
    ],
    ids=["bert-pissa", "bert-olora", "gpt2-pissa"],
)
def test_init_equals_peft_on_the_same_weights(build, init, targets, peft_kwargs):
    ours = build()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, init=init, target_modules=targets))
    theirs = peft.get_peft_model(
        build(),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=targets,
                        **peft_kwargs),
    )  # fmt: skip
    expected = _peft_named(theirs)
    compared = 0
    for name, param in ours.named_parameters():
        if any(name.endswith(f"{t}.{part}") for t in targets for part in
               ("weight", "lora_A.weight", "lora_B.weight")):  # fmt: skip
            torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-6)
            compared += 1
    assert compared >= 6


def test_fast_svd_init_equals_peft_under_the_same_seed():
    config = LoRAConfig(r=3, alpha=6, init="pissa_niter_2", target_modules=["query"])
    ours = tiny_bert()
    inject_lora(ours, config)
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=3, lora_alpha=6,
                                                              target_modules=["query"]))  # fmt: skip
    name = "bert.encoder.layer.0.attention.self.query"
    layer = theirs.base_model.model.get_submodule(name)
    torch.manual_seed(layers.module_seed(config.seed, name))  # PEFT draws from the global RNG
    layer.pissa_init("default", "pissa_niter_2")
    mine = ours.get_submodule(name)
    torch.testing.assert_close(mine.lora_A.weight, layer.lora_A["default"].weight)
    torch.testing.assert_close(mine.lora_B.weight, layer.lora_B["default"].weight)
    torch.testing.assert_close(mine.weight, layer.base_layer.weight)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_outputs_are_unchanged_at_init(init):
    model = tiny_bert()
    expected = logits(model, token_ids())
    inject_lora(model, LoRAConfig(r=4, alpha=8, init=init))
    assert_close_relative(logits(model, token_ids()), expected, rtol=1e-5)


def test_a_failing_injection_restores_every_base_weight_bit_for_bit(monkeypatch):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(inject, "group_shared_inputs", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject_lora(model, LoRAConfig(init="pissa"))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_and_unload_give_the_trained_model_and_unload_without_merge_the_original():
    stock = tiny_bert()
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, alpha=8, init="pissa"))
    nudge_adapters(model)
    trained = logits(model, token_ids())
    merge_lora(model)
    assert_close_relative(logits(model, token_ids()), trained, rtol=1e-5)
    unload_lora(model, merge=False)
    for name, value in stock.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_file_loads_on_the_stock_base_here_and_in_peft(tmp_path, init, use_rslora):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, alpha=8, init=init, use_rslora=use_rslora,
                                  rank_pattern={"value": 2}))  # fmt: skip
    nudge_adapters(model)
    expected = logits(model, token_ids())
    save_adapter(model, tmp_path, convert_to_plain_lora=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8
    assert written["lora_alpha"] == pytest.approx(8 * (2**0.5 if use_rslora else 2))

    in_peft = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    assert_close_relative(logits(in_peft, token_ids()), expected, rtol=1e-5)
    here = tiny_bert()
    load_adapter(here, tmp_path)
    assert_close_relative(logits(here, token_ids()), expected, rtol=1e-5)


def test_peft_converted_file_loads_here_with_peft_outputs(tmp_path):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": QKV}
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(init_lora_weights="pissa", **kwargs))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
    theirs.save_pretrained(str(tmp_path / "init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    nudge_adapters(theirs)
    expected = logits(theirs.eval(), token_ids())
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    here = tiny_bert()
    load_adapter(here, tmp_path / "converted")
    assert_close_relative(logits(here, token_ids()), expected, rtol=1e-5)


def test_unconverted_file_is_marked_and_refused_on_a_base(tmp_path):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(init="pissa_niter_4"))
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "pissa_niter_4"
    with pytest.raises(AdapterFileError, match="(?s)pissa_niter_4.*convert_to_plain_lora=True"):
        load_adapter(tiny_bert(), tmp_path)


@pytest.mark.parametrize(
    ("build", "init", "targets", "reason"),
    [
        (conv_embed_net, "pissa", ["conv"], "only nn.Linear and GPT-2 Conv1D"),
        (tiny_gpt2, "olora", ["c_attn"], "only nn.Linear"),
    ],
)
def test_layers_an_init_cannot_factor_are_refused_before_any_change(build, init, targets, reason):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=reason):
        inject_lora(model, LoRAConfig(init=init, target_modules=targets))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_rank_above_the_layers_smaller_dimension_is_refused_by_name(init):
    model = tiny_bert()  # classifier: Linear(16, 3), so at most 3 components
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"'classifier'.*at most 3 components.*r=4"):
        inject_lora(model, LoRAConfig(r=4, init=init, target_modules=["query", "classifier"]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_rank_at_the_layers_smaller_dimension_exports_a_file_peft_and_load_adapter_read(
    tmp_path,
):
    model = tiny_bert()
    config = LoRAConfig(r=4, init="pissa", target_modules=["query", "classifier"],
                        rank_pattern={"classifier": 3})  # fmt: skip
    plan = plan_lora(model, config)
    inject_lora(model, config)
    assert {t.name: t.r for t in plan.targets} == {
        n: m.lora_A.weight.shape[0] for n, m in model.named_modules() if hasattr(m, "lora_A")
    }
    nudge_adapters(model)
    expected = logits(model, token_ids())
    save_adapter(model, tmp_path, convert_to_plain_lora=True)
    in_peft = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    assert_close_relative(logits(in_peft, token_ids()), expected, rtol=1e-5)
    here = tiny_bert()
    load_adapter(here, tmp_path)
    assert_close_relative(logits(here, token_ids()), expected, rtol=1e-5)


def test_tied_target_weight_is_refused():
    model = tiny_gpt2()
    with pytest.raises(UnsupportedModuleError, match="tied to"):
        inject_lora(model, LoRAConfig(init="pissa", target_modules=["lm_head"]))


@pytest.mark.parametrize("init", ["pissa_niter_0", "pissa_niter_x", "svd", "pissa_niter_<k>"])
def test_unknown_init_names_are_refused(init):
    with pytest.raises(LoRAConfigError, match="lora.init"):
        LoRAConfig(init=init)


def test_pissa_with_dora_is_refused():
    with pytest.raises(LoRAConfigError, match="use_dora"):
        LoRAConfig(init="olora", use_dora=True)


# --- the callback ---------------------------------------------------------------------------
@pytest.mark.parametrize("export_converted", [True, False])
def test_callback_export_is_converted_by_default(tmp_path, export_converted):
    module = BertModule()
    callback = LoRACallback(r=2, alpha=4, init="pissa", export_converted=export_converted)
    trainer(tmp_path, [callback], max_steps=2).fit(module)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if not export_converted:
        assert written["init_lora_weights"] == "pissa"
        return
    assert written["init_lora_weights"] is True and written["r"] == 4
    ids = token_ids()
    expected = logits(module.model.eval(), ids)
    stock = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    assert_close_relative(logits(stock, ids), expected, rtol=1e-5)


def test_callback_resumes_a_pissa_run_exactly(tmp_path):
    straight = BertModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer(tmp_path, [LoRACallback(r=2, init="pissa"), checkpoint], max_epochs=2).fit(straight)
    resumed = BertModule()  # the stock base again: the init is redone, then the A, B loaded
    again = trainer(tmp_path / "resumed", [LoRACallback(r=2, init="pissa")], max_epochs=2)
    again.fit(resumed, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def test_the_plan_records_the_base_rewrite_and_changes_nothing():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_lora(model, LoRAConfig(init="olora"))
    assert {t.base_init for t in plan.targets} == {"olora"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
