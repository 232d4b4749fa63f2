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
