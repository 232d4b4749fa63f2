"""A Hydra multirun sweep with ``trainer=fsdp``: two jobs of 2 CPU processes each (FSDP2 over
gloo), one after the other in the sweep's process. What a user needs from it: every job
finishes, each job's adapter-only checkpoints and PEFT exports hold the rank that job asked
for and are written by global rank zero alone, the sweep summary compares both jobs, and no
job (or job's extra rank) writes into another's folder. (One FSDP job, its checkpoints and its
resume are tested in test_app_fsdp.py; the DDP sweep in test_app.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import test_app
from safetensors.torch import load_file
from test_app import tiny_args, train_py
from torch.distributed.checkpoint import FileSystemReader

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)

RANKS = {"0": 2, "1": 4}  # job folder -> lora.r swept

# Loaded by every process of the sweep (the sweep's own and each job's relaunched rank 1):
# records each rename onto an adapter path (how core.files publishes a written adapter
# directory) with the process's rank, so the test sees who wrote what; and each start of a
# relaunched rank (LOCAL_RANK is set in its environment from the start), so the test knows
# the spy ran there too.
RENAME_SPY = """\
import os, sys

if "LOCAL_RANK" in os.environ:
    with open(os.environ["RENAME_LOG"], "a") as log:
        log.write(f"{os.environ['LOCAL_RANK']}\\tstarted\\n")

def _spy(event, args):
    if event == "os.rename" and "adapter" in os.fsdecode(args[1]):
        with open(os.environ["RENAME_LOG"], "a") as log:
            log.write(f"{os.environ.get('LOCAL_RANK', '0')}\\t{os.fsdecode(args[1])}\\n")

sys.addaudithook(_spy)
"""


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> tuple[Path, str, list[tuple[str, Path]]]:
    """``train.py -m trainer=fsdp lora.r=2,4`` on 2 CPU processes per job: the sweep folder,
    the console output, and the (rank, path) of every adapter write."""
    root = tmp_path_factory.mktemp("fsdp-sweep")
    (root / "spy").mkdir()
    (root / "spy" / "sitecustomize.py").write_text(RENAME_SPY)
    log = root / "renames.log"
    result = train_py(
        ["-m", "trainer=fsdp", "trainer.devices=2", "lora.r=2,4", *tiny_args(tiny_model_dir),
         "logger=none", f"hydra.sweep.dir={root / 'sweep'}"],
        timeout=600, env={"PYTHONPATH": str(root / "spy"), "RENAME_LOG": str(log)},
    )  # fmt: skip
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    assert [rank for rank, what in lines if what == "started"] == ["1", "1"]  # one per job
    writes = [(rank, Path(what)) for rank, what in lines if what != "started"]
    return root / "sweep", result.stdout + result.stderr, writes


def _adapter_dir(written: Path) -> Path:
    # A new directory is renamed into place whole; an existing one gets one rename per file.
    return written if written.name.endswith("adapter") else written.parent


@pytest.mark.slow
def test_fsdp_sweep_runs_each_job_once_in_its_own_folder(sweep):
    sweep_dir, output, _ = sweep
    assert output.count("Launching 2 jobs") == 1  # no relaunched rank started a sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(RANKS)
    for job, rank in RANKS.items():
        results = json.loads((sweep_dir / job / "results.json").read_text())
        assert results["output_dir"] == str(sweep_dir / job)
        assert results["adapter_dir"] == str(sweep_dir / job / "adapter")
        assert f"lora.r={rank}" in results["overrides"]
        # Each job's second process logged into its job's folder.
        assert "GLOBAL_RANK: 1" in (sweep_dir / job / "train_ddp_process_1.log").read_text()


@pytest.mark.slow
def test_fsdp_sweep_adapters_have_each_jobs_rank_in_every_file(sweep):
    sweep_dir, _, _ = sweep
    for job, rank in RANKS.items():
        final = sweep_dir / job / "adapter"
        beside_last = sweep_dir / job / "checkpoints" / "last_adapter"
        for directory in (final, beside_last):
            assert json.loads((directory / "adapter_config.json").read_text())["r"] == rank
            tensors = load_file(directory / "adapter_model.safetensors")
            shapes = {k: v.shape for k, v in tensors.items() if ".lora_" in k}
            assert shapes and all(
                (s[0] if ".lora_A." in k else s[1]) == rank for k, s in shapes.items()
            ), (directory, shapes)
        # The final export and last.ckpt's adapter are the same step's whole tensors.
        final_tensors = load_file(final / "adapter_model.safetensors")
        last_tensors = load_file(beside_last / "adapter_model.safetensors")
        assert final_tensors.keys() == last_tensors.keys()
        assert all(final_tensors[k].equal(last_tensors[k]) for k in final_tensors)
        # The distributed checkpoint: trained tensors only, of the job's rank.
        metadata = FileSystemReader(str(sweep_dir / job / "checkpoints" / "last.ckpt"))
        sizes = {
            key: meta.size
            for key, meta in metadata.read_metadata().state_dict_metadata.items()
            if key.startswith("state_dict.")
        }
        assert sizes and all(".lora_" in k or ".classifier." in k for k in sizes)
        assert all(
            (s[0] if ".lora_A." in k else s[1]) == rank for k, s in sizes.items() if ".lora_" in k
        )


@pytest.mark.slow
def test_fsdp_sweep_adapters_are_written_by_rank_zero_once_each(sweep):
    sweep_dir, _, writes = sweep
    assert writes and {rank for rank, _ in writes} == {"0"}
    folders = [_adapter_dir(path) for _, path in writes]
    for job in RANKS:
        checkpoints = sweep_dir / job / "checkpoints"
        expected = {sweep_dir / job / "adapter", checkpoints / "last_adapter"} | {
            checkpoints / f"{p.stem}_adapter" for p in checkpoints.glob("epoch=*.ckpt")
        }
        mine = [folder for folder in folders if folder.is_relative_to(sweep_dir / job)]
        assert sorted(mine) == sorted(expected)  # each written once: no duplicate rename


@pytest.mark.slow
def test_fsdp_sweep_summary_lists_both_jobs_with_their_metric(sweep):
    sweep_dir, output, _ = sweep
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(row["job"], row["lora.r"]) for row in rows] == [("0", "2"), ("1", "4")]
    for row in rows:
        results = json.loads((sweep_dir / row["job"] / "results.json").read_text())
        # The table rounds to 4 decimals.
        assert float(row["val/acc"]) == pytest.approx(results["metrics"]["val/acc"], abs=5e-5)
    assert "| job | lora.r | val/acc |" in output
