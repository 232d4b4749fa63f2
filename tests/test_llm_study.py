"""The causal-LM study runner (experiments/llm_sft/run.py) on a tiny Llama: each kind of variant
runs through the app (our LoRA, full fine-tuning with '~lora', PEFT), the report holds them, and
a second call runs nothing that has finished."""

from __future__ import annotations

import json

import pytest
from test_llm_app import tiny_llm_dir  # noqa: F401 - a fixture

from experiments.llm_sft import run as study


@pytest.mark.slow
def test_the_study_runs_lora_full_fine_tuning_and_peft_and_resumes_nothing_twice(
    tiny_llm_dir,  # noqa: F811
    tmp_path,
):
    model = [f"model.model={tiny_llm_dir}", f"data.tokenizer={tiny_llm_dir}", "data.max_length=400"]
    argv = [
        *model,
        "--quick",
        "--out",
        str(tmp_path),
        "--only",
        "lora_lr1e-3",
        "full_ft",
        "peft_lr1e-3",
    ]
    study.main(argv)
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == ["lora_lr1e-3", "full_ft", "peft_lr1e-3"]
    total = json.loads((tmp_path / "runs/full_ft/results.json").read_text())["parameters"]
    assert rows["full_ft"]["trainable_params"] == total["total"]  # '~lora': every weight trains
    assert (
        rows["lora_lr1e-3"]["trainable_params"]
        == rows["peft_lr1e-3"]["trainable_params"]
        < total["total"]
    )
    assert (
        rows["lora_lr1e-3"]["base_exact_match"] is not None
    )  # the one run that evaluates the base
    assert rows["full_ft"]["base_exact_match"] is None
    assert rows["lora_lr1e-3"]["lr"] == 1e-3 and rows["full_ft"]["lr"] == 1e-4  # as run
    report = (tmp_path / "results.md").read_text()
    assert "QUICK SMOKE RUN" in report and "not run yet: lora_s0, peft_s0, lora_s1" in report
    assert (tmp_path / "exact_match.png").stat().st_size > 0

    stamp = (tmp_path / "runs/lora_lr1e-3/results.json").stat().st_mtime_ns
    study.main(argv)  # everything finished: nothing runs again
    assert (tmp_path / "runs/lora_lr1e-3/results.json").stat().st_mtime_ns == stamp


def test_an_unknown_variant_name_is_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        study.main(["--only", "lora_s9"])
    assert "lora_s0" in capsys.readouterr().err
