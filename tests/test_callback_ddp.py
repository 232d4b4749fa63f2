"""LoRACallback under 2-process CPU DDP (gloo), via Lightning's script re-launch (``ddp``).

One driver run (tests/ddp_driver.py: a fit, then a DDP resume from its epoch-0 checkpoint; a
fit with LoRA dropout, then a DDP resume from its mid-epoch checkpoint) writes per-rank result
files; each test below asserts one fact about them. The last test
resumes the 2-process checkpoint in this single process (another world size).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_runner import TESTS, run_ddp_driver
from lightning_models import MLP_TARGETS, MLPModule, lora_tensors, trainer

from lora_lightning import LoRACallback, LoRAConfig, inject_lora, load_adapter
from lora_lightning.lightning import base_fingerprint

pytestmark = pytest.mark.slow

RANKS = (0, 1)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_ddp_driver(TESTS / "ddp_driver.py", out)
    return out


def record(out: Path, run: str, moment: str, rank: int) -> dict:
    return torch.load(out / f"{run}_{moment}_rank{rank}.pt", weights_only=False)


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_adapters_identical_on_both_ranks_after_setup(ddp_out):
    first, second = (record(ddp_out, "fit", "setup", rank)["lora"] for rank in RANKS)
    assert len(first) == 4
    assert_same_tensors(second, first)


def test_adapters_identical_on_both_ranks_at_the_end(ddp_out):
    first, second = (record(ddp_out, "fit", "end", rank)["lora"] for rank in RANKS)
    assert_same_tensors(second, first)
    initial = record(ddp_out, "fit", "setup", 0)["lora"]
    assert not torch.equal(
        first["net.layers.0.lora_B.weight"], initial["net.layers.0.lora_B.weight"]
    )


def test_adapter_directories_are_written_once_by_rank_zero(ddp_out):
    markers = sorted(p.name for p in (ddp_out / "exports").iterdir())
    assert markers == [
        "fit-rank0-1-epoch=0-step=2_adapter",
        "fit-rank0-2-epoch=1-step=4_adapter",
        "fit-rank0-3-fit_adapter",
        "resume-rank0-1-epoch=1-step=4_adapter",
        "resume-rank0-2-resume_adapter",
    ]
    assert not [p for p in ddp_out.rglob("*") if ".tmp-" in p.name]


def test_final_ddp_adapter_holds_the_trained_tensors(ddp_out):
    module = MLPModule()
    load_adapter(module, ddp_out / "fit_adapter")
    assert_same_tensors(lora_tensors(module), record(ddp_out, "fit", "end", 0)["lora"])


def test_ddp_checkpoint_holds_only_the_adapters(ddp_out):
    saved = torch.load(ddp_out / "fit_ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(record(ddp_out, "fit", "end", 0)["lora"])
    assert "base_fingerprint" in saved["lora"]


def test_ddp_base_fingerprint_shared_by_the_ranks_equals_the_single_process_one(ddp_out):
    saved = torch.load(ddp_out / "fit_ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    module = MLPModule()
    inject_lora(module, LoRAConfig(target_modules=MLP_TARGETS, r=2))
    assert saved["lora"]["base_fingerprint"] == base_fingerprint(module)


def test_ddp_resume_loads_the_checkpoint_on_every_rank(ddp_out):
    saved = torch.load(ddp_out / "fit_ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    for rank in RANKS:
        start = record(ddp_out, "resume", "start", rank)
        assert start["global_step"] == 2
        assert_same_tensors(start["lora"], saved["state_dict"])


def assert_resumed_run_ends_like_the_straight_one(out: Path, straight: str, resumed: str) -> None:
    """On every rank: the same step, adapters and optimizer state at train end."""
    for rank in RANKS:
        expected, actual = record(out, straight, "end", rank), record(out, resumed, "end", rank)
        assert actual["global_step"] == expected["global_step"] == 4
        assert_same_tensors(actual["lora"], expected["lora"])
        moments = actual["optimizer"]["state"]
        assert moments.keys() == expected["optimizer"]["state"].keys()
        for index, state in expected["optimizer"]["state"].items():
            assert_same_tensors(moments[index], state)


def test_ddp_resume_ends_exactly_where_the_straight_run_did(ddp_out):
    assert_resumed_run_ends_like_the_straight_one(ddp_out, "fit", "resume")


def test_ddp_checkpoint_holds_the_random_state_of_each_rank(ddp_out):
    saved = torch.load(ddp_out / "dropout_ckpt" / "epoch=1-step=3.ckpt", weights_only=False)
    rng = saved["callbacks"]["LoRACallback"]["rng"]
    assert rng["world_size"] == 2
    first, second = (state["torch"] for state in rng["states"])
    assert not torch.equal(first, second)  # each rank's own, not rank zero's twice


def test_ddp_mid_epoch_resume_with_dropout_is_bit_exact_on_every_rank(ddp_out):
    assert_resumed_run_ends_like_the_straight_one(ddp_out, "dropout", "dropout_resume")


def test_two_process_checkpoint_resumes_in_one_process(ddp_out, tmp_path):
    path = ddp_out / "fit_ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=False)
    module = MLPModule()
    loaded = {}

    class Start(LoRACallback):
        def on_train_start(self, trainer, pl_module):
            loaded.update(lora_tensors(pl_module))

    callback = Start(target_modules=MLP_TARGETS, r=2, adapter_dir=tmp_path / "adapter")
    run = trainer(tmp_path, [callback], max_epochs=2)
    run.fit(module, ckpt_path=path)
    assert_same_tensors(loaded, saved["state_dict"])
    assert run.global_step == 2 + 4  # one more epoch of 4 batches in a single process
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
