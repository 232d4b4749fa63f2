"""LoRACallback under FSDP1 (Lightning's ``strategy=fsdp``), in one CPU process (gloo).

Lightning refuses ``strategy=fsdp`` with ``accelerator=cpu``; ``cpu_fsdp1_strategy`` (the GPU
check's, experiments/gpu/lightning_steps.py) is Lightning's ``FSDPStrategy`` with the model
wrapped on the CPU, so its wrapping, full-state-dict and checkpoint-loading paths run here.
The first GPU run (2026-12-04) found them broken: every name under a wrapped block carried
``_fsdp_wrapped_module.`` (checkpoints trimmed to 2 of 74 tensors, no adapter export, every
resume refused), and the strategy loads a checkpoint's model and optimizer states before any
hook sees it. Each test here fails on that code.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from fsdp_driver import TARGETS, LlamaModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import lora_tensors, trainer
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from experiments.gpu.lightning_steps import cpu_fsdp1_strategy
from lora_lightning import LoRACallback, inject_lora, lora_state_dict
from lora_lightning.core.errors import CheckpointMismatchError, LoRAConfigError
from lora_lightning.lightning.checkpoint import WRAPPER_COMPONENTS, clean_name, without_wrappers

pytestmark = pytest.mark.slow

STEP1 = "epoch=0-step=1.ckpt"
STEP2 = "epoch=1-step=2.ckpt"


def fsdp1(**kwargs) -> object:
    return cpu_fsdp1_strategy(
        auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full", **kwargs
    )


#: ``lm_head`` trained too, so the root FSDP unit (embeddings, norm, lm_head) holds a
#: trainable parameter; with all of them frozen FSDP1 without sharding cannot save (see
#: test_a_root_unit_of_frozen_weights_only_is_refused_before_the_first_step).
SAVED = ["lm_head"]


def fit(out: Path, label: str, *, max_steps: int = 2, ckpt_path: Path | None = None,
        strategy: object | None = None, module: LlamaModule | None = None,
        saved: list[str] | None = SAVED) -> dict:  # fmt: skip
    torch.manual_seed(0)
    module = module or LlamaModule()
    checkpoint = ModelCheckpoint(dirpath=out / f"ckpt_{label}", save_top_k=-1)
    callback = LoRACallback(
        target_modules=TARGETS, r=2, modules_to_save=saved, adapter_dir=out / f"adapter_{label}"
    )
    # One batch per epoch, so the step-1 checkpoint is at an epoch boundary: a mid-epoch
    # resume would replay the epoch's first batch (the loader is not resumable).
    run = trainer(
        out, [callback, checkpoint], max_epochs=max_steps, limit_train_batches=1,
        strategy=strategy or fsdp1(),
    )  # fmt: skip
    run.fit(module, ckpt_path=ckpt_path)
    return {"module": module, "trainer": run, "dir": out / f"ckpt_{label}"}


def reference_keys() -> set[str]:
    module = LlamaModule()
    inject_lora(module, LoRACallback(target_modules=TARGETS, r=2, modules_to_save=SAVED).config)
    return set(lora_state_dict(module))


@pytest.fixture(scope="module", autouse=True)
def own_process_group():
    """The Trainer initialises a one-process gloo group in this pytest process and exports
    its rendezvous (MASTER_PORT, ...) to the environment: end the group and restore the
    environment after this module, or every later test that launches processes inherits a
    port this process still listens on."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp1")
    run = fit(out, "straight")
    run["out"] = out
    run["adapters"] = lora_tensors(run["module"])
    return run


def test_the_model_really_was_wrapped_by_fsdp1(straight) -> None:
    wrapped = [n for n, _ in straight["trainer"].strategy.model.named_modules()]
    assert any("_fsdp_wrapped_module" in name for name in wrapped)


def test_checkpoints_hold_the_adapters_under_the_unwrapped_names(straight) -> None:
    checkpoint = torch.load(straight["dir"] / STEP1, map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == reference_keys()
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(reference_keys())
    assert not any("_fsdp" in name for name in checkpoint["lora"]["adapted_modules"])


def test_exported_adapter_equals_the_trained_adapters(straight) -> None:
    exported = load_file(str(straight["out"] / "adapter_straight" / "adapter_model.safetensors"))
    beside = load_file(
        str(straight["dir"] / f"{Path(STEP2).stem}_adapter" / "adapter_model.safetensors")
    )
    assert exported.keys() == beside.keys() and len(exported) == 2 * 3 * 2 + 1  # + lm_head
    assert all(torch.equal(exported[k], beside[k]) for k in exported)
    assert not any("_fsdp" in key for key in exported)
    ours = straight["adapters"]
    assert sorted(v.sum().item() for v in ours.values()) == pytest.approx(
        sorted(v.sum().item() for v in exported.values())
    )


def test_resume_ends_bit_identical_to_the_straight_run(straight, tmp_path) -> None:
    resumed = fit(tmp_path, "resumed", ckpt_path=straight["dir"] / STEP1)
    assert resumed["trainer"].global_step == 2
    after = lora_tensors(resumed["module"])
    assert after.keys() == straight["adapters"].keys()
    assert all(torch.equal(after[k], straight["adapters"][k]) for k in after)


def test_a_bad_checkpoint_is_refused_before_the_strategy_loads_it(straight, tmp_path) -> None:
    checkpoint = torch.load(straight["dir"] / STEP1, map_location="cpu", weights_only=False)
    name = sorted(k for k in checkpoint["state_dict"] if "lora_B" in k)[0]
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], math.nan)
    bad = tmp_path / "nan.ckpt"
    torch.save(checkpoint, bad)
    module = LlamaModule()
    with pytest.raises(CheckpointMismatchError, match="NaN|non-finite|finite"):
        fit(tmp_path, "bad", ckpt_path=bad, module=module)
    # FSDP1 loads the model inside load_checkpoint: validated only in the hook, the NaN
    # would already be in the model here.
    assert all(torch.isfinite(v).all() for v in lora_tensors(module).values())


def test_a_root_unit_of_frozen_weights_only_is_refused_before_the_first_step(tmp_path) -> None:
    module = LlamaModule()
    with pytest.raises(LoRAConfigError, match=r"root FSDP unit holds only frozen .*embed_tokens"):
        fit(tmp_path, "frozen_root", module=module, saved=None)
    assert not (tmp_path / "ckpt_frozen_root").exists()  # no step, no checkpoint


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"state_dict_type": "sharded"}, "state_dict_type='sharded'"),
     ({"use_orig_params": False}, "use_orig_params=False")],
)  # fmt: skip
def test_fsdp1_forms_lora_cannot_train_are_refused_by_name(tmp_path, kwargs, named) -> None:
    module = LlamaModule()
    options = {"state_dict_type": "full", **kwargs}
    strategy = cpu_fsdp1_strategy(auto_wrap_policy={LlamaDecoderLayer}, **options)
    with pytest.raises(LoRAConfigError, match=named.replace("(", r"\(")):
        fit(tmp_path, "refused", strategy=strategy, module=module)
    assert not lora_tensors(module)  # refused before anything was injected


def test_clean_name_drops_every_wrapper_component() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        _CHECKPOINT_WRAPPED_MODULE,
    )
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    assert {FSDP_WRAPPED_MODULE, _CHECKPOINT_WRAPPED_MODULE, "_orig_mod"} == set(WRAPPER_COMPONENTS)
    name = "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module._orig_mod.q.lora_A"
    assert clean_name(name) == "model.layers.0.q.lora_A"
    assert clean_name("model.my_fsdp_wrapped_module_x.q") == "model.my_fsdp_wrapped_module_x.q"


def test_without_wrappers_looks_through_activation_checkpointing_wrappers() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    module = LlamaModule()
    layer = module.model.model.layers[0]
    module.model.model.layers[0] = checkpoint_wrapper(layer)
    wrapper = module.model.model.layers[0]
    with without_wrappers(module):
        assert module.model.model.layers[0] is layer
        assert not any("_checkpoint" in n for n, _ in module.named_parameters())
    assert module.model.model.layers[0] is wrapper
