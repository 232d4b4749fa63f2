"""The benchmark scripts under experiments/bench run end to end and write the reports they
promise. Each runs with ``--quick`` (tiny sizes, two rounds) into a temporary directory; the
numbers are not checked, only that the JSON carries the fields the README describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = {"date_utc", "cpu_model", "cpu_count", "torch_threads", "versions"}


def run_quick(module: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", f"experiments.bench.{module}", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"{module}.md").is_file()
    return json.loads((out / f"{module}.json").read_text())


@pytest.mark.slow
def test_injection_benchmark_writes_times_ratio_and_module_checks(tmp_path: Path) -> None:
    result = run_quick("injection", tmp_path)

    assert result["benchmark"] == "injection" and result["quick"] is True
    assert MACHINE_FIELDS <= set(result["machine"])
    assert {"torch", "peft", "transformers"} <= set(result["machine"]["versions"])
    assert {"lora_lightning", "peft", "peft_low_cpu_mem_usage"} <= set(result["times"])
    assert result["times"]["peft"]["median_s"] > 0
    assert result["ratios"]["lora_lightning/peft"]["median_of_pair_ratios"] > 0
    assert all(check["ok"] for check in result["checks"].values())
    assert {"target_ratio", "measured_ratio", "met"} <= set(result["goal"])


@pytest.mark.slow
def test_train_step_benchmark_writes_times_ratios_and_matching_losses(tmp_path: Path) -> None:
    result = run_quick("train_step", tmp_path)

    assert result["benchmark"] == "train_step" and result["quick"] is True
    assert MACHINE_FIELDS <= set(result["machine"])
    counts = result["setup"]["trainable_parameters"]
    assert counts["lora_lightning"] == counts["peft"] < counts["full_finetune"]
    assert {"lora_lightning", "peft", "full_finetune"} <= set(result["dropout_0.0"]["times"])
    assert {"lora_lightning", "peft"} <= set(result["dropout_0.1"]["times"])
    assert result["dropout_0.0"]["ratios"]["lora_lightning/peft"]["median_of_pair_ratios"] > 0
    assert result["numerics"]["ok"]
    assert result["numerics"]["max_abs_loss_diff"] <= 1e-6
    assert {"target_ratio", "measured_ratio", "met"} <= set(result["goal"])
