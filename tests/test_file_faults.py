"""Fault injection for adapter saves: nothing already written is lost, no two saves are mixed.

Real where the machine allows it: threads and spawned processes saving different adapters to
one folder while others load it, a small tmpfs mounted as the destination (and filled up, and
remounted read-only), the immutable flag (``chattr +i``, which binds root too), symlinks,
leftovers of a dead process. Mounting and ``chattr`` need root; without them those tests skip
(``chattr``) or fall back to an injected ``EROFS`` (the read-only folder).

Every saver's adapter has its own rank, alpha or values, so a load that mixed the config of
one save with the weights of another would give outputs that match no saver.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_lightning.core.files as files
from lora_lightning import AdapterFileError, LoRAConfig, inject_lora, load_adapter, save_adapter

#: (r, alpha, seed of the adapter values) of each saver: two share r and values, not alpha.
SAVERS = [(2, 4.0, 0), (2, 8.0, 0), (4, 4.0, 1), (1, 16.0, 2)]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def base() -> nn.Sequential:
    """The same weights on every call; seeded locally, as threads share the global RNG."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def adapted(index: int) -> nn.Sequential:
    r, alpha, seed = SAVERS[index]
    model = base()
    inject_lora(model, LoRAConfig(r=r, alpha=alpha, target_modules=[r"[02]"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 18).reshape(3, 6))


def loaded_output(directory: Path) -> torch.Tensor:
    model = base()
    load_adapter(model, directory)
    return output(model)


def saver_of(out: torch.Tensor, expected: list[torch.Tensor]) -> int | None:
    """The index of the saver whose model gives exactly ``out``, or None."""
    return next((i for i, e in enumerate(expected) if torch.equal(out, e)), None)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder``, hidden ones included, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def reference_saves(root: Path) -> list[dict[str, bytes]]:
    saves = []
    for index in range(len(SAVERS)):
        save_adapter(adapted(index), root / f"reference{index}")
        saves.append(snapshot(root / f"reference{index}"))
    return saves


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


# ------------------------------------------------------------------- concurrent saves and loads


def slowed(replace):
    """``replace`` that waits 2 ms first, as on a busy disk: races get room to happen."""

    def slow(*args, **kwargs):
        time.sleep(0.002)
        return replace(*args, **kwargs)

    return slow


def _save_loop(index: int, directory: str, saves: int, start: threading.Event) -> None:
    model = adapted(index)
    start.wait()
    for _ in range(saves):
        save_adapter(model, directory)


def _save_process(index: int, directory: str, saves: int, start) -> None:
    torch.set_num_threads(1)
    os.replace = slowed(os.replace)
    _save_loop(index, directory, saves, start)


def _load_loop(
    directory: Path, done: threading.Event, ready: threading.Event | None = None
) -> tuple[int, list[str]]:
    """Load until ``done`` (and once more): how many loads, and what was wrong with any."""
    expected = [output(adapted(i)) for i in range(len(SAVERS))]
    if ready is not None:
        ready.set()
    loads, problems = 0, []
    while True:
        finished = done.is_set()
        try:
            if saver_of(loaded_output(directory), expected) is None:
                problems.append("a load matches no saver's outputs")
        except Exception as err:  # every failure is a finding
            problems.append(f"{type(err).__name__}: {err}")
        loads += 1
        if finished:
            return loads, problems


def _load_process(directory: str, done, ready, results) -> None:
    torch.set_num_threads(1)
    results.put(_load_loop(Path(directory), done, ready))


def assert_one_complete_save(directory: Path, references: list[dict[str, bytes]]) -> None:
    final = snapshot(directory)
    assert sorted(final) == ADAPTER_FILES, f"leftovers or missing files: {sorted(final)}"
    assert final in references, "the final folder is not byte-identical to any one save"


def test_threads_saving_different_adapters_to_one_folder_never_mix(tmp_path, monkeypatch):
    references = reference_saves(tmp_path)
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    monkeypatch.setattr(os, "replace", slowed(os.replace))
    start, done = threading.Event(), threading.Event()
    failures: list[str] = []

    def save_loop(index: int) -> None:
        try:
            _save_loop(index, str(target), 6, start)
        except Exception as err:  # every failure is a finding
            failures.append(f"saver {index}: {type(err).__name__}: {err}")

    writers = [threading.Thread(target=save_loop, args=(i,)) for i in range(len(SAVERS))]
    results: list[tuple[int, list[str]]] = []
    readers = [
        threading.Thread(target=lambda: results.append(_load_loop(target, done))) for _ in range(2)
    ]
    for thread in writers + readers:
        thread.start()
    start.set()
    for thread in writers:
        thread.join(timeout=60)
    done.set()
    for thread in readers:
        thread.join(timeout=60)

    assert failures == []
    assert len(results) == 2 and all(loads > 1 for loads, _ in results), results
    assert [p for _, problems in results for p in problems] == []
    assert_one_complete_save(target, references)
    assert leftovers(tmp_path) == []


def test_processes_saving_different_adapters_to_one_folder_never_mix(tmp_path):
    references = reference_saves(tmp_path)
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    # A fork server imports torch once; each process forks from it (not from this one's
    # threads), so four processes start in the time of one import.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    start, done, ready = context.Event(), context.Event(), context.Event()
    results = context.Queue()
    writers = [
        context.Process(target=_save_process, args=(i, str(target), 5, start))
        for i in range(len(SAVERS) - 1)
    ]
    reader = context.Process(target=_load_process, args=(str(target), done, ready, results))
    for process in [*writers, reader]:
        process.start()
    assert ready.wait(timeout=60)
    start.set()  # writers start together, with the reader already loading
    in_process: list[tuple[int, list[str]]] = []
    local_reader = threading.Thread(target=lambda: in_process.append(_load_loop(target, done)))
    local_reader.start()
    for process in writers:
        process.join(timeout=90)
    done.set()
    local_reader.join(timeout=60)
    loads, problems = results.get(timeout=60)
    reader.join(timeout=30)

    assert [p.exitcode for p in writers] == [0] * len(writers)
    assert loads > 1 and in_process and in_process[0][0] > 1
    assert problems + in_process[0][1] == []
    assert_one_complete_save(target, references)
    assert leftovers(tmp_path) == []


def test_a_save_landing_while_the_weights_are_read_never_mixes_them(tmp_path, monkeypatch):
    """The weights file's header (which records the config it was saved with) and its
    tensors must come from one file. ``safetensors.safe_open`` read the header from its open
    file and mapped the tensors by path again: a save landing in between loaded one save's
    record with another's tensors (about one run in ten of the test above). Here the save
    lands deterministically, right after the weights file is first opened or mapped."""
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    weights = Path(os.path.realpath(target / files.WEIGHTS_FILE))
    landed: list[bool] = []

    def land_a_save() -> None:
        if not landed:
            landed.append(True)
            save_adapter(adapted(2), target)  # another rank: its tensors have other shapes

    real_open, real_from_file = open, torch.UntypedStorage.from_file

    def open_then_save(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if Path(os.path.realpath(file)) == weights:
            land_a_save()
        return handle

    def map_then_save(filename, *args, **kwargs):
        if Path(os.path.realpath(filename)) == weights:
            land_a_save()
        return real_from_file(filename, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_then_save, raising=False)
    monkeypatch.setattr(torch.UntypedStorage, "from_file", map_then_save)
    got = loaded_output(target)
    monkeypatch.undo()
    assert landed, "the save never landed: the hooks missed the weights read"
    assert torch.equal(got, output(adapted(0)))  # the save it opened, whole
    assert torch.equal(loaded_output(target), output(adapted(2)))  # then the new one


def test_a_writer_killed_between_its_renames_is_finished_not_mixed(tmp_path, monkeypatch):
    """Killed after the weights' rename, before the config's: readers get the new save whole
    (its config waits in the ``.swap-`` folder), and the next save completes it first."""
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def replace_then_die(src, dst):
        if Path(dst) == target / files.CONFIG_FILE:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # no cleanup: killed
    with pytest.raises(Killed):
        save_adapter(adapted(1), target)  # same rank and values as adapter 0, other alpha
    monkeypatch.undo()
    assert [p.name for p in target.iterdir() if p.name.startswith(".")], "no .swap- folder"

    assert torch.equal(loaded_output(target), output(adapted(1)))
    (tmp_path / "other").mkdir()
    save_adapter(adapted(2), tmp_path / "other")  # another folder's save leaves this one be
    assert torch.equal(loaded_output(target), output(adapted(1)))
    save_adapter(adapted(3), target)
    assert torch.equal(loaded_output(target), output(adapted(3)))
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------ what is on disk


def test_weights_record_the_config_they_were_saved_with(tmp_path):
    save_adapter(adapted(0), tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / files.WEIGHTS_FILE), "pt") as handle:
        record = json.loads(handle.metadata()[files.SAVE_RECORD])
    config = (tmp_path / "adapter" / files.CONFIG_FILE).read_bytes()
    assert record == {"config_sha256": hashlib.sha256(config).hexdigest(), "saved_locked": True}


def test_two_saves_of_one_adapter_are_byte_identical(tmp_path):
    save_adapter(adapted(1), tmp_path / "a")
    save_adapter(adapted(1), tmp_path / "b")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_config_of_another_save_is_refused_when_the_saves_held_no_lock(tmp_path, monkeypatch):
    """Where ``flock`` is unavailable, a config that is not the weights' is never loaded."""

    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    save_adapter(adapted(0), tmp_path / "a")
    save_adapter(adapted(1), tmp_path / "b")
    shutil.copy(tmp_path / "b" / files.CONFIG_FILE, tmp_path / "a" / files.CONFIG_FILE)
    monkeypatch.setattr(files, "MISMATCH_RETRY_DELAYS", (0.01,))

    with pytest.raises(AdapterFileError, match="come from different saves") as raised:
        load_adapter(base(), tmp_path / "a")
    assert str(tmp_path / "a") in str(raised.value)


def test_config_edited_after_a_locked_save_loads_with_a_warning(tmp_path):
    """Under the lock no save can leave a mix behind: a different config is a user's edit."""
    save_adapter(adapted(0), tmp_path / "a")
    save_adapter(adapted(1), tmp_path / "b")
    shutil.copy(tmp_path / "b" / files.CONFIG_FILE, tmp_path / "a" / files.CONFIG_FILE)

    with pytest.warns(UserWarning, match="was changed after adapter_model.safetensors was saved"):
        out = loaded_output(tmp_path / "a")
    assert torch.equal(out, output(adapted(1)))  # adapter 0's tensors at adapter 1's alpha


def test_adapter_written_without_metadata_loads(tmp_path):
    """PEFT writes no config hash: such files are read as they are."""
    save_adapter(adapted(2), tmp_path / "adapter")
    weights = tmp_path / "adapter" / files.WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT
    assert torch.equal(loaded_output(tmp_path / "adapter"), output(adapted(2)))


def test_config_with_a_byte_order_mark_loads(tmp_path):
    save_adapter(adapted(2), tmp_path / "adapter")
    config = tmp_path / "adapter" / files.CONFIG_FILE
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    with pytest.warns(UserWarning, match="was changed"):
        assert torch.equal(loaded_output(tmp_path / "adapter"), output(adapted(2)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"r": "\xff"}', "it must be UTF-8"),
        (b" " * (files.MAX_CONFIG_BYTES + 1), "larger than 16 MiB"),
    ],
    ids=["not-utf8", "oversized"],
)
def test_unreadable_config_text_is_named(tmp_path, content, message):
    save_adapter(adapted(0), tmp_path / "adapter")
    (tmp_path / "adapter" / files.CONFIG_FILE).write_bytes(content)
    with pytest.raises(AdapterFileError, match=message) as raised:
        load_adapter(base(), tmp_path / "adapter")
    assert files.CONFIG_FILE in str(raised.value)


# ----------------------------------------------------------------------- unusual destinations


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``folder`` (skips where mounting is not allowed)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_saving_twice_into_a_mount_point(tmp_path):
    references = reference_saves(tmp_path)
    with tmpfs(tmp_path / "volume", "2m") as volume:
        save_adapter(adapted(0), volume)
        save_adapter(adapted(3), volume)
        assert os.path.ismount(volume)
        assert snapshot(volume) == references[3]  # no staging folder left either
        assert torch.equal(loaded_output(volume), output(adapted(3)))


def test_disk_full_on_a_real_small_tmpfs_keeps_the_previous_adapter(tmp_path):
    with tmpfs(tmp_path / "volume", "64k") as volume:
        save_adapter(adapted(0), volume / "adapter")
        before = snapshot(volume / "adapter")
        big = nn.Sequential(nn.Linear(256, 256))
        inject_lora(big, LoRAConfig(r=64, target_modules=["0"]))  # 128 KiB of adapter

        with pytest.raises(AdapterFileError, match="No space left on device") as raised:
            save_adapter(big, volume / "adapter")

        assert raised.value.errno == errno.ENOSPC
        assert str(volume / "adapter") in str(raised.value)
        assert snapshot(volume / "adapter") == before
        assert leftovers(volume) == []


def test_disk_full_mid_write_keeps_the_previous_adapter_byte_identical(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    before = snapshot(target)
    real_save_file = files.save_file

    def half_then_full(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "save_file", half_then_full)
    with pytest.raises(AdapterFileError, match="No space left on device") as raised:
        save_adapter(adapted(3), target)
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC
    assert f"cannot save to {target}" in str(raised.value)
    assert snapshot(target) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("link_to", ["empty-folder", "adapter", "missing-folder", "mount-point"])
def test_destination_that_is_a_symlink_to_a_folder(tmp_path, link_to):
    real = tmp_path / "real"
    if link_to == "empty-folder":
        real.mkdir()
    elif link_to == "adapter":
        save_adapter(adapted(0), real)
    elif link_to == "mount-point":
        real = tmp_path / "volume"
    with tmpfs(real, "1m") if link_to == "mount-point" else _nothing():
        link = tmp_path / "link"
        link.symlink_to(real, target_is_directory=True)

        save_adapter(adapted(3), link)

        assert link.is_symlink() and real.is_dir()
        assert sorted(p.name for p in real.iterdir()) == ADAPTER_FILES
        assert torch.equal(loaded_output(link), output(adapted(3)))
        assert leftovers(tmp_path) == []


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_a_file_in_the_way_is_named_and_kept(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not an adapter folder")
    with pytest.raises(AdapterFileError, match="it is a file, not a folder") as raised:
        save_adapter(adapted(0), target)
    assert str(target) in str(raised.value)
    assert target.read_text() == "not an adapter folder"


@contextmanager
def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``folder`` unwritable even for root: the immutable flag; else injected EROFS."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    real_mkdir, real_replace = os.mkdir, os.replace

    def refuse(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == folder:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    monkeypatch.setattr(os, "replace", refuse(real_replace))
    yield
    monkeypatch.undo()


def test_read_only_adapter_folder_is_named_and_kept(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    before = snapshot(target)
    with read_only(target, monkeypatch):
        with pytest.raises(AdapterFileError, match=re.escape(f"cannot save to {target}")):
            save_adapter(adapted(3), target)
    assert snapshot(target) == before and leftovers(tmp_path) == []


def test_read_only_mount_is_named_and_kept(tmp_path):
    with tmpfs(tmp_path / "volume", "1m") as volume:
        save_adapter(adapted(0), volume / "adapter")
        before = snapshot(volume / "adapter")
        subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)

        with pytest.raises(AdapterFileError, match="Read-only file system") as raised:
            save_adapter(adapted(3), volume / "adapter")

        assert raised.value.errno == errno.EROFS and str(volume) in str(raised.value)
        assert snapshot(volume / "adapter") == before
        assert torch.equal(loaded_output(volume / "adapter"), output(adapted(0)))


def test_unwritable_parent_is_named_and_nothing_is_created(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    parent.mkdir()
    with read_only(parent, monkeypatch):
        with pytest.raises(
            AdapterFileError, match=re.escape(f"cannot save to {parent / 'adapter'}")
        ):
            save_adapter(adapted(0), parent / "adapter")
    assert list(parent.iterdir()) == []


# --------------------------------------------------------------------------- leftovers


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_dead_process_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "adapter"
    save_adapter(adapted(0), target)
    pid = dead_pid()
    made = [
        tmp_path / f".adapter.tmp-{pid}-{pid}-0badc0de",  # a new folder's staging, beside it
        target / f".adapter.tmp-{pid}-{pid}-0badc0de",  # an overwrite's staging, inside it
        tmp_path / f".adapter.del-{pid}-{pid}-0badc0de",  # a removal's doomed folder
        tmp_path / f".adapter.tmp-{pid}",  # the naming of earlier versions
    ]
    for folder in made:
        folder.mkdir()
        (folder / files.WEIGHTS_FILE).write_bytes(b"half a file")
    unrelated = tmp_path / ".other.tmp-1-1-0badc0de"  # another destination's: not ours to touch
    unrelated.mkdir()

    save_adapter(adapted(3), target)

    assert [p for p in made if p.exists()] == []
    assert unrelated.exists()
    assert sorted(p.name for p in target.iterdir()) == ADAPTER_FILES


def test_staging_names_are_unique_per_call_across_threads(tmp_path, monkeypatch):
    seen: list[str] = []
    real_mkdir = Path.mkdir

    def record(self: Path, *args, **kwargs) -> None:
        if ".tmp-" in self.name:
            seen.append(self.name)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", record)
    threads = [
        threading.Thread(target=save_adapter, args=(adapted(i % 2), tmp_path / f"a{i}"))
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 6 and len(set(seen)) == 6
    assert {name.split(".tmp-")[1].split("-")[0] for name in seen} == {str(os.getpid())}
