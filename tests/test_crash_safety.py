"""Crash safety: a kill, a full disk or a failing DDP rank never leaves a broken file behind.

- SIGKILL at seeded random points of a training run (``crash_driver.py kill``, slow): every
  checkpoint left loads with ``torch.load(weights_only=True)``, every adapter folder left loads
  with ``load_adapter``, and resuming from ``last.ckpt`` ends with adapter tensors bit-identical
  to an uninterrupted run.
- A kill at *every* point of a save (``crash_driver.py save-kills``): before and after each
  rename, fsync and removal, and halfway through each write. An adapter folder is absent, the
  old one or the new one; an overwritten ``last.ckpt`` is the old or the new one.
- A full disk (``OSError(ENOSPC)`` halfway through a write) while saving an adapter or a
  checkpoint leaves the previous ones intact and loadable, and no temp file behind.
- The order of fsyncs, which no kill can show (a killed process's writes survive in the page
  cache): every rename of a save comes after the fsync of what it moves and before the fsync
  of its folder, for a checkpoint file and for new and overwritten adapter folders.
- A rank that raises under 2-process CPU DDP stops the whole run with that error, in bounded
  time, and writes no final adapter and no temp file (slow).

Lightning's own checkpoint write (``TorchCheckpointIO`` -> ``_atomic_save``) serialises to
memory, writes a temp file made by ``tempfile.mkstemp()`` in the *system* temp folder and moves
it into place with ``shutil.move`` (no fsync). On one filesystem that is an atomic rename;
across filesystems (``/tmp`` on tmpfs, checkpoints on disk) the move copies into the
destination after truncating it, so a kill or a full disk mid-copy destroys the previous
``last.ckpt``. The LoRA CheckpointIO therefore writes local checkpoints itself: a hidden temp
file beside the destination, fsync, rename (``test_checkpoint_write_needs_no_cross_folder_move``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from crash_driver import TinyNet, adapted_tiny_net, make_trainer, tiny_module_class
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import load_file

import lora_lightning.core.files as adapter_module
from lora_lightning import load_adapter, save_adapter
from lora_lightning.lightning.checkpoint_io import AdapterExportingIO

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "crash_driver.py"


def run_driver(*args: Any, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    return subprocess.run(
        [sys.executable, str(DRIVER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS.parent,
        env=env,
    )


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def hidden(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def adapter_folders(root: Path) -> list[Path]:
    """Every non-hidden folder holding (or named like) an adapter."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_dir()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.name.endswith("adapter") or any(p.glob("adapter_*")))
    )


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*.ckpt")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def assert_everything_loads(root: Path) -> None:
    """Every checkpoint loads weights-only, every adapter folder loads into a fresh model."""
    for path in checkpoint_files(root):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert "lora" in checkpoint and checkpoint["state_dict"], path
    for folder in adapter_folders(root):
        load_adapter(TinyNet(), folder)


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------ SIGKILL during training


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path):
    result = run_driver("kill", tmp_path, "--trials", 10, "--seed", 6, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    trials = report["trials"]
    assert len(trials) == 10
    reference = adapter_tensors(tmp_path / "reference" / "adapter")
    for trial in trials:
        index = trial["trial"]
        assert trial["resume_exit_code"] == 0, trial
        killed = tmp_path / f"trial{index}_killed"
        if killed.exists():  # what the kill left: all of it loads, nothing looks half-written
            assert_everything_loads(killed)
            for folder in [killed / "ckpt", *adapter_folders(killed)]:
                if folder.exists():
                    for name in visible(folder):
                        assert name.endswith((".ckpt", "_adapter", ".json", ".safetensors")), name
        final = adapter_tensors(tmp_path / f"trial{index}" / "adapter")
        assert tensors_equal(final, reference), f"trial {index} differs after resuming: {trial}"
    # The kills did land mid-run, and resumes did start from checkpoints.
    assert sum(t["killed_while_running"] for t in trials) >= 5, trials
    assert any(0 < t["resumed_at_step"] < 40 for t in trials), trials
    print(json.dumps(report, indent=1))


# ----------------------------------------------------------------- a kill at every save point


@pytest.fixture(scope="module")
def save_kills(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("save_kills")
    result = run_driver("save-kills", root, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, json.loads((root / "report.json").read_text())


@pytest.mark.parametrize("scenario", ["adapter-new", "adapter-overwrite"])
def test_kill_at_every_point_of_an_adapter_save(save_kills, scenario):
    root, report = save_kills
    entries = [e for e in report if e["scenario"] == scenario]
    assert len(entries) >= 10 and not entries[-1]["killed"]  # every point, then a full save
    old, new = adapter_tensors(root / "old"), adapter_tensors(root / "new")
    for entry in entries:
        folder = root / entry["folder"]
        target = folder / "adapter"
        assert visible(folder) in ([], ["adapter"]), entry
        if not target.exists():
            assert scenario == "adapter-new" and entry["killed"], entry
            continue
        assert visible(target) == ["adapter_config.json", "adapter_model.safetensors"], entry
        load_adapter(TinyNet(), target)
        found = adapter_tensors(target)
        allowed = [new] if scenario == "adapter-new" else [old, new]
        assert any(tensors_equal(found, v) for v in allowed), entry
        if not entry["killed"]:
            assert tensors_equal(found, new)


def test_kill_at_every_point_of_a_checkpoint_write(save_kills):
    root, report = save_kills
    entries = [e for e in report if e["scenario"] == "checkpoint-overwrite"]
    assert len(entries) >= 5 and not entries[-1]["killed"]
    versions = [torch.load(root / f"{v}.ckpt", weights_only=True) for v in ("old", "new")]
    for entry in entries:
        folder = root / entry["folder"]
        assert visible(folder) == ["last.ckpt"], entry
        found = torch.load(folder / "last.ckpt", weights_only=True)
        assert any(
            found["step"] == v["step"] and tensors_equal(found["state_dict"], v["state_dict"])
            for v in versions
        ), entry
    assert torch.load(root / entries[-1]["folder"] / "last.ckpt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------- the order of fsyncs
# A kill cannot show a wrong order: a killed process's writes survive in the page cache, so
# only a power loss would. The order is pinned from a log of the calls instead.

#: A file or folder on disk: ``(st_dev, st_ino)``, which a rename keeps.
Identity = tuple[int, int]


def identity(stat: os.stat_result) -> Identity:
    return stat.st_dev, stat.st_ino


def log_fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """From now on, ``("fsync", what)`` once ``os.fsync`` returns and ``("rename", moved,
    folder)`` once ``os.replace`` does: ``moved`` the identities of the source and, for a
    folder, of every entry in it; ``folder`` that of the destination's folder."""
    log: list[tuple[Any, ...]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        fsync(fd)
        log.append(("fsync", identity(os.fstat(fd))))

    def logged_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        moved = [identity(os.lstat(src))]
        if Path(src).is_dir() and not Path(src).is_symlink():
            moved += [identity(entry.stat(follow_symlinks=False)) for entry in os.scandir(src)]
        folder = identity(os.stat(Path(dst).parent))
        replace(src, dst, *args, **kwargs)
        log.append(("rename", moved, folder))

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return log


@pytest.mark.parametrize("write", ["checkpoint-file", "adapter-new", "adapter-overwrite"])
def test_every_rename_of_a_save_comes_after_the_fsync_of_its_data_and_before_its_folders(
    tmp_path, monkeypatch, write
):
    """A rename is durable only once what it moves is on disk (else a power loss can leave
    the new name on an empty or partial file) and its folder is fsynced after it (else the
    rename itself can be lost)."""
    folder = tmp_path / "adapter"
    if write == "adapter-overwrite":
        save_adapter(adapted_tiny_net(1), folder)
    log = log_fsyncs_and_renames(monkeypatch)
    if write == "checkpoint-file":
        adapter_module.atomic_write_file(tmp_path / "last.ckpt", lambda tmp: tmp.write_bytes(b"x"))
    else:
        save_adapter(adapted_tiny_net(2), folder)
    monkeypatch.undo()

    renames = [i for i, event in enumerate(log) if event[0] == "rename"]
    assert renames, log
    for i in renames:
        _, moved, parent = log[i]
        synced_before = {event[1] for event in log[:i] if event[0] == "fsync"}
        synced_after = {event[1] for event in log[i + 1 :] if event[0] == "fsync"}
        assert set(moved) <= synced_before, f"rename {i} moves data not fsynced yet: {log}"
        assert parent in synced_after, f"rename {i}: its folder is not fsynced after it: {log}"


# ------------------------------------------------------------------------------ disk full


def _disk_full_halfway(write: Any) -> Any:
    """``write(obj, path, ...)`` that puts half the bytes on disk, then fails like ENOSPC."""

    def failing(obj: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        write(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return failing


@pytest.mark.parametrize("failing", ["weights", "config"])
@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new-folder"])
def test_disk_full_while_saving_an_adapter_keeps_the_previous_one(
    tmp_path, monkeypatch, failing, existing
):
    target = tmp_path / "adapter"
    if existing:
        save_adapter(adapted_tiny_net(1), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if existing else {}
    if failing == "weights":
        monkeypatch.setattr(
            adapter_module, "save_file", _disk_full_halfway(adapter_module.save_file)
        )
    else:
        real = Path.write_text

        def write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
            if "adapter_config.json" not in self.name:
                return real(self, text, *args, **kwargs)
            real(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))

        monkeypatch.setattr(Path, "write_text", write_text)

    with pytest.raises(OSError) as raised:
        save_adapter(adapted_tiny_net(2), target)

    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["adapter"] if existing else [])  # no temp file or folder
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        model = TinyNet()
        load_adapter(model, target)
        expected = adapted_tiny_net(1)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())


class _DiskFullAt(pl.Callback):
    """From global step ``step`` on, ``target.name`` fails halfway with ENOSPC."""

    def __init__(self, step: int, target: Any, name: str, monkeypatch: Any) -> None:
        self.step, self.target, self.name, self.monkeypatch = step, target, name, monkeypatch

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            failing = _disk_full_halfway(getattr(self.target, self.name))
            self.monkeypatch.setattr(self.target, self.name, failing)


def _ckpt_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("failing", ["checkpoint", "adapter-export"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_adapter(
    tmp_path, monkeypatch, failing
):
    steps = 6
    module_class = tiny_module_class()
    reference = tmp_path / "reference"
    make_trainer(reference, steps).fit(module_class(steps))

    run = tmp_path / "run"
    target, name = (torch, "save") if failing == "checkpoint" else (adapter_module, "save_file")
    disk_full = _DiskFullAt(4, target, name, monkeypatch)
    with pytest.raises(OSError) as raised:
        make_trainer(run, steps, extra_callbacks=(disk_full,)).fit(module_class(steps))
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()

    ckpt = run / "ckpt"
    expected = ["epoch=0-step=4.ckpt", "epoch=0-step=4_adapter", "last.ckpt", "last_adapter"]
    if failing == "adapter-export":  # the step-5 checkpoint was written; its adapter was not
        expected = sorted([*expected, "epoch=0-step=5.ckpt"])
    assert visible(ckpt) == expected
    assert hidden(run) == [], "a temp file was left behind"
    assert _ckpt_state(ckpt / "last.ckpt")["global_step"] == 4
    assert not (run / "adapter").exists()
    assert_everything_loads(run)
    # The adapter beside a checkpoint holds that checkpoint's tensors.
    for stem in ("epoch=0-step=4", "last"):
        state = _ckpt_state(ckpt / f"{stem}.ckpt")["state_dict"]
        exported = adapter_tensors(ckpt / f"{stem}_adapter")
        assert tensors_equal(exported, {f"base_model.model.{k}": v for k, v in state.items()})

    # And the run resumes from last.ckpt to the same result as an uninterrupted run.
    make_trainer(run, steps).fit(module_class(steps), ckpt_path=ckpt / "last.ckpt")
    assert tensors_equal(adapter_tensors(run / "adapter"), adapter_tensors(reference / "adapter"))


def test_checkpoint_write_needs_no_cross_folder_move(tmp_path, monkeypatch):
    """Where ``/tmp`` is another filesystem, a move from it is a copy that can fail midway.

    Simulated: every rename across folders fails with EXDEV (as across filesystems) and
    every copy runs out of space. Lightning's default write goes through that path; the
    LoRA CheckpointIO writes beside the destination, so it neither needs it nor loses the
    previous checkpoint.
    """
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AdapterExportingIO(TorchCheckpointIO(), export=lambda checkpoint, path: None)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)
    rename, replace = os.rename, os.replace

    def same_folder_only(move: Any) -> Any:
        def moved(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(src).resolve().parent != Path(dst).resolve().parent:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return move(src, dst, *args, **kwargs)

        return moved

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", same_folder_only(rename))
    monkeypatch.setattr(os, "replace", same_folder_only(replace))
    monkeypatch.setattr(os, "sendfile", no_space)  # how shutil copies on Linux
    monkeypatch.setattr(shutil, "copyfileobj", no_space)  # and elsewhere

    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)

    monkeypatch.undo()
    assert visible(path.parent) == ["last.ckpt"] and hidden(path.parent) == []
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 2 and torch.equal(
        checkpoint["state_dict"]["w"], torch.ones(3)
    )


def test_removed_checkpoint_adapter_never_lingers_half_deleted(tmp_path, monkeypatch):
    """``save_top_k`` removes old checkpoints and their adapters; a crash mid-removal must not
    leave a half-deleted adapter folder under its real name."""
    ckpt = tmp_path / "epoch=0-step=1.ckpt"
    io = AdapterExportingIO(TorchCheckpointIO(), export=lambda checkpoint, path: None)
    io.save_checkpoint({"state_dict": {}}, ckpt)
    save_adapter(adapted_tiny_net(1), tmp_path / "epoch=0-step=1_adapter")
    deleted: list[str] = []
    real_rmtree = shutil.rmtree

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).exists():
            deleted.append(Path(path).name)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    io.remove_checkpoint(ckpt)
    monkeypatch.undo()
    # Deleted only once renamed to a hidden name: a kill mid-deletion leaves a hidden folder.
    assert deleted and all(name.startswith(".") for name in deleted), deleted
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ DDP faults


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_ddp_rank_failure_stops_the_run_and_writes_no_partial_adapter(tmp_path, fail_rank):
    result = run_driver("ddp", tmp_path, "--fail-rank", fail_rank, "--fail-step", 3, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"RuntimeError: injected failure on rank {fail_rank} at step 3" in output
    assert not (tmp_path / "adapter").exists(), "a final adapter was written after a failure"
    assert hidden(tmp_path) == [], "a temp file was left behind"
    # Checkpoints written before the failure (every step) are complete.
    assert _ckpt_state(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 3
    assert_everything_loads(tmp_path)
