"""The SmolLM2 benchmark's memory measure (``experiments.bench.llm_train_step``), without
running a model: each worker runs with the allocator settings that make RSS follow what is
allocated, and ``--memory-only`` writes a report with a verdict per variant pair."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

from experiments.bench import llm_train_step as bench

MIB = 1024**2


def _record(variant: str, peak_mib: int) -> dict:
    return {
        "variant": variant,
        "rss_after_first_step_bytes": 1000 * MIB,
        "peak_rss_bytes": peak_mib * MIB,
        "peak_increase_bytes": (peak_mib - 500) * MIB,
    }


def test_each_memory_worker_runs_with_malloc_returning_freed_blocks(monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        return SimpleNamespace(returncode=0, stdout=json.dumps(_record("peft", 9)), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = SimpleNamespace(batch=8, memory_steps=3, threads=1, quick=False)
    assert bench.run_worker("peft", args)["variant"] == "peft"
    assert "--worker" in seen["command"] and "peft" in seen["command"]
    for key, value in bench.ALLOCATOR_ENV.items():
        assert seen["env"][key] == value
    assert "PATH" in seen["env"]  # the rest of the environment is kept


def test_memory_only_reports_every_pair_with_its_verdict(monkeypatch, tmp_path):
    peaks = {"peft": 2000, "ours_hf_loss": 2001, "ours_task_loss": 1800}
    monkeypatch.setattr(bench, "run_worker", lambda name, args: _record(name, peaks[name]))
    bench.main(["--memory-only", "--no-compile", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "llm_train_step_memory.json").read_text())
    assert set(report["variants"]) == set(peaks)
    assert report["allocator_env"] == bench.ALLOCATOR_ENV
    goals = report["goals"]
    assert goals["ours_task_loss/peft"]["met"] is True
    assert goals["ours_hf_loss/peft"]["met"] is False  # one MiB over is over
    text = (tmp_path / "llm_train_step_memory.md").read_text()
    assert "ratio 0.900 (goal <= 1: met)" in text
    assert "ratio 1.000 (goal <= 1: NOT met)" in text
