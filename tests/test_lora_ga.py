"""LoRA-GA (``init="lora_ga"``, ``core.lora_ga``) against PEFT's own on the same model and batches.

The gradient step is deterministic, so the gradients are compared as values. The A0/B0 of
both come from a randomised SVD; with ``q`` the gradient's full size (``4r >= min(out, in)``)
it is the exact SVD up to the signs of the singular vectors, so A0's rows and B0's columns are
compared up to sign. The base becomes ``W - s·B0 A0`` in both; the converted file loads in
PEFT on the stock base with this project's outputs.
"""

from __future__ import annotations

import lightning.pytorch as pl
import peft
import pytest
import torch
import torch.nn.functional as F
from lightning_models import MLP_TARGETS, MLPModule, mlp_dataset
from models import VOCAB, tiny_gpt2, tiny_llama
from peft import preprocess_loraga
from torch.utils.data import DataLoader

from lora_lightning import (
    CheckpointMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    UnsupportedModuleError,
    inject_lora,
    prepare_lora,
    save_adapter,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(count):
        ids = torch.randint(1, VOCAB, (4, 8), generator=torch.Generator().manual_seed(i))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def _loss(model, batch):
    return model(**batch).loss


def _peft(batches, **options):
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(**options))  # fmt: skip

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules()
             if hasattr(m, "_peft_loraga_grad")}  # fmt: skip
    return peft.get_peft_model(model, config), grads


def _ours(batches, **options):
    model = tiny_llama()
    config = LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, init="lora_ga",
                        lora_ga_config=options)  # fmt: skip
    prepared = prepare_lora(model, config, batches, forward=_loss)
    inject_lora(model, config, batches=batches, forward=_loss)
    return model, prepared.values


def _sign_aligned(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """``ours`` with each row (``dim=1``) or column (``dim=0``) sign-flipped toward ``theirs``."""
    signs = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    return ours * signs


@pytest.mark.parametrize(
    "options",
    [{}, {"direction": "A2rBr", "scale": "gd_scale"}, {"direction": "ArBr", "scale": "unit"}],
    ids=["defaults", "A2rBr-gd_scale", "ArBr-unit"],
)
def test_lora_ga_gives_peft_s_gradients_and_a_b_up_to_sign(options):
    batches = _batches()
    theirs, their_grads = _peft(batches, **options)
    ours, our_grads = _ours(batches, **options)
    assert sorted(our_grads) == sorted(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-7)
        module = ours.get_submodule(name)
        peer = theirs.base_model.model.get_submodule(name)
        a, b = module.lora_A.weight, module.lora_B.weight
        their_a, their_b = peer.lora_A["default"].weight, peer.lora_B["default"].weight
        torch.testing.assert_close(_sign_aligned(a, their_a, 1), their_a, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(_sign_aligned(b, their_b, 0), their_b, rtol=1e-3, atol=1e-4)
        original = tiny_llama().get_submodule(name).weight
        rebuilt = module.weight + 2.0 * (b @ a)  # s = alpha / r = 2
        torch.testing.assert_close(rebuilt, original, rtol=1e-5, atol=1e-5)


def test_the_converted_lora_ga_file_loads_in_peft_on_the_stock_base(tmp_path):
    batches = _batches()
    ours, _ = _ours(batches)
    with torch.no_grad():  # trained-looking adapters
        for module in ours.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.weight.add_(0.05)
    save_adapter(ours, tmp_path, convert_to_plain_lora=True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).logits, ours.eval()(**inputs).logits, rtol=1e-4, atol=1e-5
        )


def test_lora_ga_leaves_no_gradient_and_the_flags_as_they_were():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoRAConfig(r=2, init="lora_ga", target_modules=TARGETS)
    prepare_lora(model, config, _batches(1), forward=_loss)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_a_forward_without_a_loss_is_refused_naming_what_to_pass():
    with pytest.raises(LoRAConfigError, match="needs a loss"):
        prepare_lora(tiny_llama(), LoRAConfig(r=2, init="lora_ga", target_modules=TARGETS),
                     _batches(1), forward=lambda m, b: m(**b).logits)  # fmt: skip


def test_a_rank_above_half_the_smaller_dimension_is_refused():
    with pytest.raises(UnsupportedModuleError, match=r"fewer than 2·r=18 \(r=9\); use r <= 8"):
        prepare_lora(tiny_llama(), LoRAConfig(r=9, init="lora_ga", target_modules=["q_proj"]),
                     _batches(1), forward=_loss)  # fmt: skip


def test_gpt2_conv1d_targets_are_refused_by_name():
    with pytest.raises(UnsupportedModuleError, match="cannot adapt \\(only nn.Linear\\)"):
        prepare_lora(tiny_gpt2(), LoRAConfig(r=2, init="lora_ga", target_modules=["c_attn"]),
                     _batches(1), forward=_loss)  # fmt: skip


def test_the_callback_runs_lora_ga_and_a_resume_on_the_same_batches_is_exact(tmp_path):
    config = LoRAConfig(r=2, init="lora_ga", target_modules=MLP_TARGETS)

    def callback():
        return LoRACallback(config, init_batches=2,
                            init_forward=lambda m, b: F.cross_entropy(m(b[0]), b[1]))  # fmt: skip

    def trainer(cb):
        return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, limit_val_batches=0, callbacks=[cb])  # fmt: skip

    first = trainer(callback())
    first.fit(MLPModule())
    first.save_checkpoint(tmp_path / "a.ckpt")
    trained = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    resumed = MLPModule()
    trainer(callback()).fit(resumed, ckpt_path=tmp_path / "a.ckpt")
    assert torch.equal(resumed.net.layers[0].lora_A.weight, trained["net.layers.0.lora_A.weight"])


def test_validating_from_a_lora_ga_checkpoint_rewrites_the_base_as_the_run_did(tmp_path):
    config = LoRAConfig(r=2, init="lora_ga", target_modules=MLP_TARGETS)
    options = {"init_batches": 2, "init_forward": lambda m, b: F.cross_entropy(m(b[0]), b[1])}
    trained = MLPModule()
    first = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path,
                       limit_val_batches=0, callbacks=[LoRACallback(config, **options)])  # fmt: skip
    first.fit(trained)
    first.save_checkpoint(tmp_path / "a.ckpt")
    module = MLPModule()
    second = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(config, **options)])  # fmt: skip
    second.validate(module, ckpt_path=tmp_path / "a.ckpt")
    for i in (0, 1):
        assert torch.equal(module.net.layers[i].weight, trained.net.layers[i].weight)


class _OtherData(MLPModule):
    def _loader(self) -> DataLoader:
        return DataLoader(mlp_dataset(self.n, seed=3), batch_size=self.batch_size)


def test_resuming_lora_ga_on_other_first_batches_is_refused(tmp_path):
    config = LoRAConfig(r=2, init="lora_ga", target_modules=MLP_TARGETS)
    options = {"init_batches": 2, "init_forward": lambda m, b: F.cross_entropy(m(b[0]), b[1])}
    first = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path,
                       limit_val_batches=0, callbacks=[LoRACallback(config, **options)])  # fmt: skip
    first.fit(MLPModule())
    first.save_checkpoint(tmp_path / "a.ckpt")
    second = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[LoRACallback(config, **options)])  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="rewrites the base weights"):
        second.fit(_OtherData(), ckpt_path=tmp_path / "a.ckpt")
