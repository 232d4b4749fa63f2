"""LoRACallback under FSDP2 (Lightning's ModelParallelStrategy) with 2 CPU processes (gloo).

The fixture first trains a tiny Llama for 2 steps in this process (``single.ckpt``) and with
FSDP2 on one process (``one_ckpt``), then runs tests/fsdp_driver.py on two (distributed-folder
and single-file runs, their resumes, resumes of ``single.ckpt`` and ``one_ckpt``, a refused
resume), then resumes a 2-process folder with FSDP2 on one process; each test asserts one fact
about what the runs recorded or wrote. The last tests resume FSDP2 checkpoints in this single
process without FSDP2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_runner import run_ddp_driver
from fsdp_driver import PROBE_IDS, STEP2, TARGETS, LlamaModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import lora_tensors, trainer
from models import assert_close_relative, tiny_llama
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from lora_lightning import LoRACallback, LoRAConfig, inject_lora
from lora_lightning.core.errors import CheckpointMismatchError
from lora_lightning.lightning import base_fingerprint

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
RANKS = (0, 1)


def single_process_fit(out: Path) -> None:
    """2 steps of LlamaModule in this process, checkpoint at ``out/single.ckpt``."""
    callback = LoRACallback(target_modules=TARGETS, r=2, adapter_dir=out / "single_adapter")
    run = trainer(out, [callback], max_steps=2)
    run.fit(LlamaModule())
    run.save_checkpoint(out / "single.ckpt")


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    single_process_fit(out)
    driver = TESTS / "fsdp_driver.py"
    run_ddp_driver(driver, out, 200, "one")  # FSDP2 on one process: a folder for from_one
    run_ddp_driver(driver, out, 400)
    run_ddp_driver(driver, out, 200, "to_one")
    return out


def record(out: Path, run: str, moment: str, rank: int = 0) -> dict:
    return torch.load(out / f"{run}_{moment}_rank{rank}.pt", weights_only=False)


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def assert_same_optimizer(actual: dict, expected: dict) -> None:
    assert actual["state"].keys() == expected["state"].keys()
    for key, state in expected["state"].items():
        assert_same_tensors(actual["state"][key], state)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under the LightningModule's names (export root ``model``)."""
    saved = load_file(directory / "adapter_model.safetensors")
    return {"model." + k.removeprefix("base_model.model."): v for k, v in saved.items()}


def test_adapters_sharded_with_the_base_and_only_they_optimized(fsdp_out):
    start = record(fsdp_out, "dist", "start")
    assert all(start["sharded"].values())  # frozen base and adapters: all DTensors
    assert sorted(start["optimized"]) == sorted(start["lora"])
    assert all(".lora_" in name for name in start["optimized"])


def test_fingerprint_of_the_sharded_base_equals_the_unsharded_one(fsdp_out):
    whole = LlamaModule()
    inject_lora(whole, LoRAConfig(r=2, target_modules=TARGETS))
    for rank in RANKS:
        fingerprint = record(fsdp_out, "dist", "start", rank)["fingerprint"]
        assert fingerprint["sharded"] == fingerprint["setup"] == base_fingerprint(whole)


def test_distributed_checkpoint_holds_adapters_and_their_optimizer_state_only(fsdp_out):
    folder = fsdp_out / "dist_ckpt" / STEP2
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    adapters = set(record(fsdp_out, "dist", "start")["lora"])
    assert {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")} == adapters
    optimized = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if ".state." in k}
    assert optimized == adapters
    meta = torch.load(folder / "meta.pt", weights_only=False)["lora"]
    assert meta["config"]["r"] == 2 and meta["base_fingerprint"]


def test_single_file_checkpoint_holds_adapters_and_their_optimizer_state_only(fsdp_out):
    saved = torch.load(fsdp_out / "file_ckpt" / STEP2, weights_only=False)
    adapters = set(record(fsdp_out, "file", "start")["lora"])
    assert set(saved["state_dict"]) == adapters
    assert len(saved["optimizer_states"][0]["state"]) == len(adapters)
    fingerprint = record(fsdp_out, "file", "start")["fingerprint"]["setup"]
    assert saved["lora"]["base_fingerprint"] == fingerprint


@pytest.mark.parametrize("form", ["dist", "file"])
def test_resume_ends_bit_identical_to_the_straight_run(fsdp_out, form):
    for rank in RANKS:
        straight = record(fsdp_out, form, "end", rank)
        resumed = record(fsdp_out, f"{form}_resume", "end", rank)
        assert resumed["global_step"] == straight["global_step"] == 4
        assert_same_tensors(resumed["lora"], straight["lora"])
    assert_same_optimizer(
        record(fsdp_out, f"{form}_resume", "end")["optimizer"],
        record(fsdp_out, form, "end")["optimizer"],
    )


def test_final_adapter_holds_every_ranks_shards(fsdp_out):
    end = [record(fsdp_out, "dist", "end", rank) for rank in RANKS]
    exported = adapter_tensors(fsdp_out / "dist_adapter")
    assert_same_tensors(exported, end[0]["lora"])
    name = "model.model.layers.0.self_attn.q_proj.lora_A.weight"
    halves = [end[rank]["local"][name] for rank in RANKS]
    assert not torch.equal(halves[0], halves[1])  # each rank's slice is its own
    assert torch.equal(exported[name], torch.cat(halves))


def test_adapter_beside_a_distributed_checkpoint_holds_every_ranks_shards(fsdp_out):
    exported = adapter_tensors(fsdp_out / "dist_ckpt" / "epoch=0-step=2_adapter")
    assert_same_tensors(exported, record(fsdp_out, "dist_resume", "start")["lora"])


def test_exported_adapter_gives_the_sharded_models_outputs_in_peft(fsdp_out):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(fsdp_out / "dist_adapter")).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS).logits
    assert_close_relative(logits, record(fsdp_out, "dist", "end")["logits"])


def test_merged_model_of_a_sharded_run_gives_its_outputs(fsdp_out):
    merged = load_file(fsdp_out / "dist_adapter" / "merged_model.safetensors")
    model = tiny_llama(0)
    model.load_state_dict(merged)
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS).logits
    assert_close_relative(logits, record(fsdp_out, "dist", "end")["logits"])


def distributed_folder_contents(folder: Path, scratch: Path) -> dict:
    """What a distributed checkpoint folder holds, as whole tensors, read in this process
    (``torch.distributed.checkpoint``'s own conversion, no strategy involved)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch / "whole.pt")
    return torch.load(scratch / "whole.pt", weights_only=False)


@pytest.mark.parametrize(
    ("run", "written_by", "ranks"), [("from_one", "one", RANKS), ("to_one", "dist", (0,))]
)
def test_distributed_checkpoint_resumes_exactly_on_another_number_of_processes(
    fsdp_out, tmp_path, run, written_by, ranks
):
    saved = distributed_folder_contents(fsdp_out / f"{written_by}_ckpt" / STEP2, tmp_path)
    for rank in ranks:
        start = record(fsdp_out, run, "start", rank)
        assert start["global_step"] == 2
        assert_same_tensors(start["lora"], saved["state_dict"])
        assert record(fsdp_out, run, "end", rank)["global_step"] == 3  # and trains on
    assert_same_optimizer(record(fsdp_out, run, "start")["optimizer"], saved["optimizer_0"])


def test_resume_with_another_lora_config_is_refused(fsdp_out):
    error = torch.load(fsdp_out / "mismatch_error.pt")["error"]
    assert "another LoRA config" in error and "r: checkpoint 2 vs now 4" in error


def test_single_process_checkpoint_resumes_under_fsdp2(fsdp_out):
    saved = torch.load(fsdp_out / "single.ckpt", weights_only=False)
    start = record(fsdp_out, "from_single", "start")
    assert start["global_step"] == 2
    assert_same_tensors(start["lora"], dict(saved["state_dict"]))
    optimizer = saved["optimizer_states"][0]
    ids = [key for group in optimizer["param_groups"] for key in group["params"]]
    assert len(ids) == len(start["optimized"])
    for key, name in zip(ids, start["optimized"], strict=True):  # positional, as torch pairs
        assert_same_tensors(start["optimizer"]["state"][name], optimizer["state"][key])


def test_fsdp2_single_file_resumes_in_one_process(fsdp_out, tmp_path):
    path = fsdp_out / "file_ckpt" / STEP2
    saved = torch.load(path, weights_only=False)
    loaded = {}

    class Start(LoRACallback):
        def on_train_start(self, trainer, pl_module):
            loaded["lora"] = lora_tensors(pl_module)
            loaded["optimizer"] = trainer.optimizers[0].state_dict()

    callback = Start(target_modules=TARGETS, r=2, adapter_dir=tmp_path / "adapter")
    run = trainer(tmp_path, [callback], max_steps=3)
    run.fit(LlamaModule(), ckpt_path=path)
    assert_same_tensors(loaded["lora"], dict(saved["state_dict"]))
    mine, theirs = loaded["optimizer"], saved["optimizer_states"][0]
    pairs = zip(
        [key for group in mine["param_groups"] for key in group["params"]],
        [key for group in theirs["param_groups"] for key in group["params"]],
        strict=True,
    )
    for key, saved_key in pairs:
        assert_same_tensors(mine["state"][key], theirs["state"][saved_key])


def test_fsdp2_folder_in_one_process_is_refused_by_name(fsdp_out, tmp_path):
    callback = LoRACallback(target_modules=TARGETS, r=2, export_on_train_end=False)
    run = trainer(tmp_path, [callback, ModelCheckpoint(dirpath=tmp_path)], max_steps=3)
    with pytest.raises(CheckpointMismatchError, match="distributed .sharded. checkpoint folder"):
        run.fit(LlamaModule(), ckpt_path=fsdp_out / "dist_ckpt" / STEP2)
