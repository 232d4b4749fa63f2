"""The causal-LM study scores every row on the same test rows: a run made before
``data.eval_seed`` existed, with a training seed other than 0, is scored again from its final
checkpoint (experiments/llm_sft/run.py: rescore, row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.llm_sft import run as study

SEED_1 = study.VARIANTS[[v.name for v in study.VARIANTS].index("lora_s1")]


def finished_run(run_dir: Path, seed: int, eval_seed: int | None) -> Path:
    data = {"seed": "${seed}", **({} if eval_seed is None else {"eval_seed": eval_seed})}
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "data": data}), run_dir / ".hydra/config.yaml")
    metrics = {"test/exact_match": 0.52, "val/loss": 0.33}
    metrics |= {f"test/exact_match/{family}": 0.5 for family in study.FAMILIES}
    results = {
        "metrics": metrics,
        "parameters": {"trainable": 10},
        "wall_time_s": 700.0,
        "overrides": [f"seed={seed}", "model.lr=0.002"],
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.mark.parametrize(
    ("seed", "eval_seed", "other_rows"), [(1, None, True), (0, None, False), (1, 0, False)]
)
def test_only_a_run_whose_seed_drew_other_rows_is_rescored(
    tmp_path, monkeypatch, seed, eval_seed, other_rows
):
    run_dir = finished_run(tmp_path / "lora_s1", seed, eval_seed)
    jobs: list[list[str]] = []
    monkeypatch.setattr(study, "_job", lambda variant, more: jobs.append(more))
    study.rescore(SEED_1, run_dir, ["data.max_length=400"])
    assert study.scored_on_other_rows(run_dir) is other_rows
    expected = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={run_dir / 'rescored'}",
        "data.max_length=400",
    ]
    assert jobs == ([expected] if other_rows else [])


def test_a_rescored_run_is_not_scored_again(tmp_path, monkeypatch):
    run_dir = finished_run(tmp_path / "lora_s1", 1, None)
    (run_dir / "rescored").mkdir()
    (run_dir / "rescored/results.json").write_text(json.dumps({"metrics": {}}))
    monkeypatch.setattr(study, "_job", lambda variant, more: pytest.fail("ran a job"))
    study.rescore(SEED_1, run_dir, [])


def test_a_rescored_row_takes_the_new_test_numbers_and_shows_no_val_loss(tmp_path):
    run_dir = finished_run(tmp_path / "lora_s1", 1, None)
    (run_dir / "rescored").mkdir()
    rescored = {"test/exact_match": 0.49, **{f"test/exact_match/{f}": 0.4 for f in study.FAMILIES}}
    (run_dir / "rescored/results.json").write_text(json.dumps({"metrics": rescored}))
    row = study.row(SEED_1, run_dir)
    assert row["exact_match"] == 0.49 and row["em/arithmetic"] == 0.4
    assert row["val_loss"] is None and row["rescored"] is True
    assert row["wall_time_s"] == 700.0  # the training run's
    machine = {"quick": False, "cpu": "cpu", "cores": 2, "threads": "1", "date_utc": "now"}
    report = study.markdown([row], machine)
    assert "| LoRA r=8* | 0.002 | 1 | 0.490 |" in report and "*: rescored" in report


def test_the_report_keeps_recorded_rows_whose_run_folders_are_not_here(tmp_path):
    """The run folders are git-ignored: a study continued in a fresh clone rewrites its report
    from the rows results.json recorded plus the runs it has, in the study's order."""
    names = [v.name for v in study.VARIANTS]
    recorded = [{"name": "full_ft", "exact_match": 0.53}, {"name": "lora_s1", "exact_match": 0.1}]
    (tmp_path / "results.json").write_text(json.dumps({"machine": {}, "rows": recorded}))
    finished_run(tmp_path / "runs" / "lora_s1", 1, 0)
    rows = study.collect(tmp_path)
    assert [r["name"] for r in rows] == sorted(["full_ft", "lora_s1"], key=names.index)
    assert rows[0] == recorded[0]  # kept as recorded
    assert rows[1]["exact_match"] == 0.52  # the run folder wins over the recorded row
    assert study.collect(tmp_path / "elsewhere") == []
    study.write_rows(rows, {}, tmp_path)  # the recorded row lacks fields the new one has
    header, *lines = (tmp_path / "results.csv").read_text().splitlines()
    assert "rescored" in header.split(",") and len(lines) == 2


def test_the_report_gives_each_seed_groups_mean_and_the_gap_the_goal_is_about():
    def fake(name: str, em: float) -> dict:
        return {"name": name, "method": name, "lr": 1e-3, "seed": "0", "exact_match": em,
                "base_exact_match": None, "val_loss": None, "trainable_params": 1,
                "wall_time_s": 1.0, "load_before": None, "load_after": None,
                **{f"em/{f}": None for f in study.FAMILIES}}  # fmt: skip

    machine = {"quick": False, "cpu": "cpu", "cores": 2, "threads": "1", "date_utc": "now"}
    rows = [
        fake("lora_s0", 0.5),
        fake("lora_s1", 0.46),
        fake("lora_s2", 0.51),
        fake("full_ft", 0.53),
    ]
    report = study.markdown(rows, machine)
    assert "- LoRA r=8 over 3 seeds: mean 0.490, sd 0.026" in report
    assert "full fine-tuning over" not in report and "points" not in report  # one seed: no mean
    report = study.markdown([*rows, fake("full_ft_s1", 0.49)], machine)
    assert "- full fine-tuning over 2 seeds: mean 0.510, sd 0.028" in report
    assert "- LoRA mean - full fine-tuning mean: -2.0 points (the issue's goal: within 3)" in report
