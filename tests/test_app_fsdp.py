"""The Hydra app with ``trainer=fsdp`` (FSDP2Strategy) on 2 CPU processes: the default job
runs, writes adapter-only checkpoints and PEFT-loadable adapters, and a job stopped by SIGTERM
continues with ``resume=auto`` to the uninterrupted job's adapter. (Exact resume inside
Lightning is tested in test_callback_fsdp.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_app
from safetensors.torch import load_file
from test_app import compose_train, train_py
from test_app_resume import _assert_same_adapter, _budget, preempt_then_resume
from torch.distributed.checkpoint import FileSystemReader

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu"]


def test_fsdp_trainer_config_builds_the_fsdp2_strategy():
    cfg = compose_train(["trainer=fsdp"])
    assert cfg.trainer.strategy._target_ == "lora_lightning.lightning.FSDP2Strategy"
    assert cfg.trainer.devices == 2


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-app") / "straight"
    train_py([*_budget(tiny_model_dir), *FSDP, f"hydra.run.dir={out}"], timeout=400)
    return out


@pytest.mark.slow
def test_fsdp_job_checkpoints_hold_trained_tensors_only(straight):
    keys = FileSystemReader(str(straight / "checkpoints" / "last.ckpt")).read_metadata()
    tensors = [k for k in keys.state_dict_metadata if k.startswith("state_dict.")]
    assert tensors and all(".lora_" in k or ".classifier." in k for k in tensors)


@pytest.mark.slow
def test_fsdp_job_adapters_load_in_peft_whole(straight, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = load_file(straight / "adapter" / "adapter_model.safetensors")
    beside = load_file(straight / "checkpoints" / "last_adapter" / "adapter_model.safetensors")
    for directory in (straight / "adapter", straight / "checkpoints" / "last_adapter"):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        PeftModel.from_pretrained(base, str(directory))  # refuses a tensor of the wrong shape
    # Whole tensors (not one rank's slice) in both: the shapes of the unsharded model.
    assert {k: v.shape for k, v in beside.items()} == {k: v.shape for k, v in final.items()}


@pytest.mark.slow
def test_sigterm_to_every_rank_of_an_fsdp_job_then_resume_auto_gives_the_uninterrupted_adapter(
    straight, tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "interrupted"
    preempt_then_resume([*_budget(tiny_model_dir), *FSDP], run_dir, ranks="null")
    assert (run_dir / "checkpoints" / "preempted.ckpt" / "meta.pt").is_file()  # the folder form
    _assert_same_adapter(load_file(straight / "adapter" / "adapter_model.safetensors"), run_dir)
