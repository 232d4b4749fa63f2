"""The SST-2 quality experiment's report writer (the runs themselves are in experiments/)."""

from __future__ import annotations

import csv
import json

from experiments.sst2_quality.run import write_reports


def _rows():
    rows = [
        {"method": f"lora_lightning r={r}", "dev_acc": 0.80 + r / 1000, "dev_f1": 0.8,
         "trainable_params": 1000 * r, "trainable_percent": 0.01 * r, "wall_time_s": 10.0,
         "saved_bytes": 4000 * r}
        for r in (1, 2, 4, 8, 16)
    ]  # fmt: skip
    rows.append({"method": "full fine-tuning", "dev_acc": 0.9, "dev_f1": 0.9,
                 "trainable_params": 22_000_000, "trainable_percent": 100.0,
                 "wall_time_s": 20.0, "saved_bytes": 88_000_000})  # fmt: skip
    rows.append({"method": "PEFT LoRA r=8", "dev_acc": 0.81, "dev_f1": 0.81,
                 "trainable_params": 8000, "trainable_percent": 0.08, "wall_time_s": 11.0,
                 "saved_bytes": 32000})  # fmt: skip
    return rows


def test_reports_hold_every_row_in_markdown_csv_json_and_a_png(tmp_path):
    write_reports(_rows(), tmp_path, quick=True)
    markdown = (tmp_path / "results.md").read_text()
    assert "QUICK SMOKE RUN" in markdown and "| PEFT LoRA r=8 | 0.8100 |" in markdown
    with open(tmp_path / "results.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)][-2:] == [
            "full fine-tuning",
            "PEFT LoRA r=8",
        ]
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 7
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def _finished(run_dir, acc, trainable=332_546, adapter_bytes=1_340_000, overrides=("seed=0",)):
    run_dir.mkdir(parents=True)
    results = {
        "metrics": {"test/acc": acc, "test/f1": acc},
        "parameters": {"trainable": trainable, "total": 23_000_000},
        "adapter_bytes": adapter_bytes,
        "wall_time_s": 100.0,
        "overrides": [*overrides, "hydra.run.dir=x"],
    }
    (run_dir / "results.json").write_text(json.dumps(results))


def test_variant_reports_rebuild_from_finished_jobs_with_their_verdicts(tmp_path):
    from experiments.sst2_quality import variants

    write_reports(_rows(), tmp_path, quick=True)  # the rank sweep the plot draws beside
    runs = tmp_path / "runs"
    for name, acc in [("lora seed 0", 0.85), ("lora seed 1", 0.86), ("lora nf4 base", 0.83),
                      ("lora+ ratio 16", 0.51)]:  # fmt: skip
        _finished(runs / "variants" / variants._folder(name), acc)
    variants.report("variants", variants.VARIANTS, runs / "variants", tmp_path)
    summary = json.loads((tmp_path / "variants.json").read_text())["summary"]
    assert summary["lora_seeds"] == 2 and summary["lora_mean"] == 0.855
    assert summary["nf4_gap_points"] == 2.5 and summary["nf4_goal_met"] is False
    markdown = (tmp_path / "variants.md").read_text()
    assert "| lora+ ratio 16 | 0.5100 |" in markdown and "dora" not in markdown  # not run
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"

    _finished(runs / "full" / variants._folder("lora r=8 seed 0"), 0.880)
    _finished(runs / "full" / variants._folder("full fine-tuning seed 0"), 0.884,
              trainable=22_713_986, adapter_bytes=None)  # fmt: skip
    variants.report("full", variants.FULL, runs / "full", tmp_path)
    summary = json.loads((tmp_path / "full_data.json").read_text())["summary"]
    assert summary["gap_points"] == 0.4 and summary["goal_met"] is True
    assert "| full fine-tuning seed 0 | 0.8840 |" in (tmp_path / "full_data.md").read_text()
