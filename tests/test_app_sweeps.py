"""Sweeps: the summary written when a multirun ends, and the SLURM launcher through submitit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import test_app
from test_app import compose_train, tiny_args, train_py

from lora_lightning.app.summary import override_values, write_summary

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)


def _job(
    sweep: Path, job: str, rank: int, acc: float, trainable: int, overrides: list[str] | None = None
) -> None:
    folder = sweep / job
    folder.mkdir(parents=True)
    results = {
        "metrics": {"val/acc": acc, "val/loss": 0.5},
        "parameters": {"trainable": trainable, "total": 1000, "adapter": trainable,
                       "adapted_modules": 4, "trainable_percent": trainable / 10},
        "wall_time_s": 1.5,
        "overrides": overrides or [f"lora.r={rank}", "data.train_limit=64"],
    }  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))


def test_summary_compares_the_jobs_on_the_swept_values(tmp_path):
    for job, rank, acc in (("0", 1, 0.8), ("1", 4, 0.85), ("10", 16, 0.9)):
        _job(tmp_path, job, rank, acc, trainable=rank * 10)
    (tmp_path / "2").mkdir()  # a job that failed: no results.json, no row
    table = write_summary(tmp_path, "val/acc")
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    assert rows[0] == ["job", "lora.r", "val/acc", "val/loss", "trainable_params", "trainable_%",
                       "wall_time_s"]  # fmt: skip
    assert [row[:3] for row in rows[1:]] == [["0", "1", "0.8"], ["1", "4", "0.85"],
                                             ["10", "16", "0.9"]]  # fmt: skip
    assert (tmp_path / "summary.md").read_text() in table
    assert "data.train_limit" not in table  # the same in every job: not a swept value
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_added_and_force_added_overrides_are_keyed_without_their_prefix(tmp_path):
    _job(tmp_path, "0", 1, 0.8, 10, ["+trainer.gradient_clip_val=0.5", "++seed=1"])
    _job(tmp_path, "1", 1, 0.9, 10, ["+trainer.gradient_clip_val=1.0", "++seed=2"])
    write_summary(tmp_path, "val/acc")
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    assert rows[0][:3] == ["job", "trainer.gradient_clip_val", "seed"]
    assert [row[:3] for row in rows[1:]] == [["0", "0.5", "1"], ["1", "1.0", "2"]]


def test_the_full_fine_tuning_baseline_is_its_own_row_and_lora_value(tmp_path):
    _job(tmp_path, "0", 1, 0.8, 10, ["lora.r=1", "seed=0"])
    _job(tmp_path, "1", 4, 0.85, 40, ["lora.r=4", "seed=0"])
    _job(tmp_path, "2", 0, 0.9, 1000, ["~lora", "seed=0"])
    write_summary(tmp_path, "val/acc")
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    assert rows[0][:4] == ["job", "lora.r", "lora", "val/acc"]
    assert [row[:4] for row in rows[1:]] == [["0", "1", "", "0.8"], ["1", "4", "", "0.85"],
                                             ["2", "", "~lora", "0.9"]]  # fmt: skip


def test_override_values_read_keys_and_values_as_hydra_parses_them():
    assert override_values(["lora.r=4", "+x.y='a=b'", "~lora", "m@pkg=v", "lr=1e-3"]) == {
        "lora.r": "4", "x.y": "'a=b'", "lora": "~lora", "m@pkg": "v", "lr": "1e-3"
    }  # fmt: skip


def test_summary_columns_keep_each_split_together_optimized_metric_first():
    from lora_lightning.app.summary import metric_order

    names = {"test/acc", "test/f1", "train/loss", "val/acc", "val/f1", "val/loss"}
    assert metric_order(names, "val/f1") == [
        "val/f1",
        "val/acc",
        "val/loss",
        "test/acc",
        "test/f1",
        "train/loss",
    ]


def test_the_sweep_plot_has_a_title_and_each_point_labelled_and_ticked_at_its_value(tmp_path):
    import matplotlib.pyplot as plt

    from lora_lightning.app.summary import collect, sweep_figure

    for job, rank, acc in (("0", 1, 0.8), ("1", 4, 0.85), ("2", 16, 0.9)):
        _job(tmp_path, job, rank, acc, trainable=rank * 1000)
    figure = sweep_figure(collect(tmp_path), "val/acc", "val/acc of each job of sweep x")
    by_params, by_rank = figure.axes
    assert figure._suptitle.get_text() == "val/acc of each job of sweep x"
    for axis in (by_params, by_rank):
        assert [text.get_text() for text in axis.texts] == ["0.8000", "0.8500", "0.9000"]
    assert list(by_params.get_xticks()) == [1000, 4000, 16000]
    assert [t.get_text() for t in by_params.get_xticklabels()] == ["1,000", "4,000", "16,000"]
    assert (by_rank.get_xlabel(), list(by_rank.get_xticks())) == ("lora.r", [1, 4, 16])
    plt.close(figure)


def test_no_finished_job_writes_no_summary(tmp_path):
    assert write_summary(tmp_path, "val/acc") is None
    assert not (tmp_path / "summary.csv").exists()


def test_slurm_launcher_config_follows_the_trainer_shape():
    cfg = compose_train(["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs_and_summarises_them(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = train_py(
        ["-m", "hydra/launcher=submitit_local", "lora.r=1,2", *tiny_args(tiny_model_dir),
         "logger=none", f"hydra.sweep.dir={sweep}"],
        timeout=600,
    )  # fmt: skip
    for job, rank in (("0", 1), ("1", 2)):
        config = json.loads((sweep / job / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == rank
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    assert (sweep / "summary.csv").is_file()
    assert "Sweep summary" in result.stdout and "| job | lora.r | val/acc |" in result.stdout
