"""The benchmark scripts under experiments/bench run end to end and write the reports they
promise. ``python -m experiments.bench.run_all --quick`` runs every benchmark once with
``--quick`` (tiny sizes, two rounds; each script in its own process, exactly as from the command
line) into a temporary directory, and then the summary; the numbers are not checked, only that
each JSON carries the fields the README describes. The standalone benchmarks run beside it
(two single-threaded lanes on CI's 2 cores). About a minute and a half on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = {"date_utc", "cpu_model", "cpu_count", "torch_threads", "versions"}
GOAL_FIELDS = {"target_ratio", "measured_ratio", "met", "ci"}

pytestmark = pytest.mark.slow


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"experiments.bench.{module}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


STANDALONE = (
    "switch", "memory_qlora", "quant_libraries", "llm_train_step", "overhead", "dora_norm"
)  # fmt: skip
#: Extra arguments of a standalone benchmark's quick run (the SmolLM2 step: eager only, no
#: memory workers, a small packing set: compiling even 2 layers takes minutes on 2 cores).
STANDALONE_ARGS = {
    "llm_train_step": ("--no-compile", "--no-memory", "--batch", "2", "--pack-examples", "4",
                       "--pack-length", "128", "--pack-rows", "1"),
}  # fmt: skip


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """``run_all --quick`` and, beside it, the standalone benchmarks one after the other: each
    benchmark runs on one thread (``--threads 1``, their default), so the two lanes keep both
    of CI's 2 cores busy. Each module's exit status, stderr and output folder."""
    root = tmp_path_factory.mktemp("bench")
    for module in ("run_all", *STANDALONE):
        (root / module).mkdir()
    log = root / "run_all.stderr"  # a file, not a pipe: a full pipe would stall the lane
    with log.open("w") as stderr:
        run_all = subprocess.Popen(
            [sys.executable, "-m", "experiments.bench.run_all", "--quick",
             "--out", str(root / "run_all")],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            runs = {}
            for module in STANDALONE:
                args = STANDALONE_ARGS.get(module, ())
                done = run_module(module, "--quick", *args, "--out", str(root / module))
                runs[module] = (done.returncode, done.stderr, root / module)
            run_all.wait(timeout=600)
        finally:
            run_all.kill()
    runs["run_all"] = (run_all.returncode, log.read_text(), root / "run_all")
    return runs


@pytest.fixture(scope="module")
def quick_out(quick_runs) -> Path:
    returncode, stderr, out = quick_runs["run_all"]
    assert returncode == 0, stderr[-3000:]
    return out


def load(out: Path, name: str) -> dict:
    assert (out / f"{name}.md").is_file()
    result = json.loads((out / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert MACHINE_FIELDS <= set(result["machine"])
    assert {"torch", "peft", "transformers"} <= set(result["machine"]["versions"])
    return result


def test_injection_benchmark_writes_times_ratio_and_module_checks(quick_out: Path) -> None:
    result = load(quick_out, "injection")

    assert {"lora_lightning", "peft", "peft_low_cpu_mem_usage"} <= set(result["times"])
    assert result["times"]["peft"]["median_s"] > 0
    assert result["ratios"]["lora_lightning/peft"]["median_of_pair_ratios"] > 0
    assert all(check["ok"] for check in result["checks"].values())
    assert GOAL_FIELDS <= set(result["goal"])


def test_train_step_benchmark_covers_both_models_both_dropouts_and_numerics(
    quick_out: Path,
) -> None:
    result = load(quick_out, "train_step")

    assert set(result["models"]) == {"minilm", "bert_base"}
    for key, block in result["models"].items():
        counts = block["setup"]["trainable_parameters"]
        assert counts["lora_lightning_d0.0"] == counts["peft_d0.0"] < counts["full_finetune"]
        assert {
            "lora_lightning_d0.0",
            "peft_d0.0",
            "full_finetune",
            "lora_lightning_d0.1",
            "peft_d0.1",
        } <= set(block["times"])
        for d in ("0.0", "0.1"):
            assert block["ratios"][f"lora_lightning_d{d}/peft_d{d}"]["median_of_pair_ratios"] > 0
            goal = block["goals"][f"dropout_{d}"]
            assert GOAL_FIELDS <= set(goal) and goal["target_ratio"] == 0.9
            assert result["goals"][f"{key}/dropout_{d}"] == goal
        assert block["numerics"]["dropout_0.0"]["ok"]
        assert block["numerics"]["dropout_0.0"]["max_abs_loss_diff"] <= 1e-6
    minilm = result["models"]["minilm"]
    assert "lora_lightning_unfused_d0.1/peft_d0.1" in minilm["ratios"]
    assert minilm["numerics"]["dropout_0.1_unfused"]["ok"]  # unfused = PEFT's dropout masks


def test_inference_benchmark_times_base_unmerged_merged_and_peft(quick_out: Path) -> None:
    result = load(quick_out, "inference")

    assert set(result["models"]) == {"minilm", "bert_base"}
    for block in result["models"].values():
        assert set(block["times"]) == {"base", "lora_lightning", "lora_lightning_merged", "peft"}
        assert {"lora_lightning_merged/base", "lora_lightning/base", "peft/base"} <= set(
            block["ratios"]
        )
        assert set(block["unmerged_overhead"]) == {"lora_lightning", "peft"}
        assert block["checks"]["ok"] and block["checks"]["adapter_changes_output"]
        assert GOAL_FIELDS <= set(block["goals"]["merged"])


def test_memory_benchmark_measures_peaks_in_processes_and_checkpoint_bytes(
    quick_out: Path,
) -> None:
    result = load(quick_out, "memory")

    runs = result["peak_memory"]
    assert {"lora_lightning_d0.1", "peft_d0.1", "full_finetune"} <= set(runs)
    for run in runs.values():
        assert run["peak_rss_bytes"] > 0 and run["peak_increase_bytes"] is not None
    assert (
        runs["full_finetune"]["optimizer_state_bytes"] > runs["peft_d0.1"]["optimizer_state_bytes"]
    )
    checkpoints = result["checkpoints"]
    ours = checkpoints["lora_lightning_trimmed_ckpt"]
    full = checkpoints["full_finetune_plain_ckpt"]
    assert ours["has_lora_metadata"] and not full["has_lora_metadata"]
    assert 0 < ours["bytes"] < full["bytes"]
    for directory in ("lora_lightning_adapter_dir", "peft_adapter_dir"):
        files = checkpoints[directory]["files"]
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    # Both libraries adapted the same modules: the tensor files are the same size (+-2%).
    same = checkpoints["ratios"]["lora_lightning_adapter_safetensors/peft_adapter_safetensors"]
    assert 0.98 < same < 1.02


def test_summary_lists_every_goal_with_a_verdict_and_rebuilds(quick_out: Path) -> None:
    summary = load(quick_out, "summary")

    keys = {(g["benchmark"], g["key"]) for g in summary["goals"]}
    assert keys == {
        ("injection", "injection"),
        ("train_step", "minilm/dropout_0.0"),
        ("train_step", "minilm/dropout_0.1"),
        ("train_step", "bert_base/dropout_0.0"),
        ("train_step", "bert_base/dropout_0.1"),
        ("inference", "minilm/merged"),
        ("inference", "bert_base/merged"),
    }
    for g in summary["goals"]:
        assert g["verdict"] == "met" if g["met"] else g["verdict"].startswith("NOT met")
    assert all(run["exit_code"] == 0 for run in summary["runs"].values())
    assert {"memory", "inference/minilm", "train_step/bert_base"} <= set(summary["stated"])
    text = (quick_out / "summary.md").read_text()
    assert "QUICK SMOKE RUN" in text and "## Goals" in text

    (quick_out / "summary.json").unlink()
    done = run_module("run_all", "--summary-only", "--out", str(quick_out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads((quick_out / "summary.json").read_text())["goals"]) == len(keys)


@pytest.mark.parametrize(
    ("module", "check"),
    [
        ("switch", lambda r: {"in_place", "reinject"} <= set(r["timings"])),
        (
            "memory_qlora",
            lambda r: (
                all(
                    {"weight_bytes", "training_peak_above_baseline", "step_time"} <= set(v)
                    for v in r["ratios"].values()
                )
                and r["ratios"]
            ),
        ),
        (
            "llm_train_step",
            lambda r: (
                {"peft", "ours_hf_loss", "ours_task_loss"} == set(r["step"])
                and {"ours_task_loss/peft", "ours_hf_loss/peft"} == set(r["ratios"])
                and r["packing"]["real_tokens"] > 0
                and r["packing"]["slot_ratio"] >= 1.0
                and len(r["goals"]) == 2
            ),
        ),
        (
            "overhead",
            lambda r: (
                set(r["models"])
                == {"bert train", "bert eval", "llama train", "llama eval", "llama train DoRA"}
                and all(
                    set(m["ratios"])
                    == {"lora_lightning_functions/peft", "lora_lightning_plain/peft"}
                    and m["adapted_layers"] > 30
                    for m in r["models"].values()
                )
            ),
        ),
        (
            "dora_norm",
            lambda r: (
                len(r["cases"]) == 6
                and all(set(c["times"]) == {"direct", "expansion"} for c in r["cases"].values())
                and all(c["ratio"]["median_of_pair_ratios"] > 0 for c in r["cases"].values())
            ),
        ),
        (
            "quant_libraries",
            lambda r: (
                {row["scheme"] for row in r["rows"]} >= {"float32", "torchao_nf4", "torchao_int8"}
            ),
        ),
    ],
)
def test_standalone_benchmarks_run_quick_and_write_their_reports(module, check, quick_runs):
    """The benchmarks outside ``run_all`` (adapter switching, QLoRA memory, quantization
    libraries) run end to end with ``--quick`` and write their JSON and markdown."""
    returncode, stderr, out = quick_runs[module]
    assert returncode == 0, stderr[-3000:]
    stem = f"{module}_quick" if module == "llm_train_step" else module  # it names quick runs
    assert (out / f"{stem}.md").is_file()
    result = json.loads((out / f"{stem}.json").read_text())
    assert MACHINE_FIELDS <= set(result["machine"]), sorted(result["machine"])
    assert check(result)
