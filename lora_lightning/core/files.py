"""Bytes on disk: atomic file and directory writes that never lose what was there.

Owns: :func:`atomic_write_file` (temp file beside the destination, fsync, rename),
:func:`write_directory` (every file of an adapter written in a staging folder, then moved into
place), :func:`remove_directory`. Knows nothing of LoRA or of the PEFT format. Must not
import: any other ``lora_lightning`` module but ``core.errors``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

#: ``write(path)`` writes one file's bytes to ``path``.
Writer = Callable[[Path], None]


def atomic_write_file(path: Path, write: Writer) -> None:
    """Write via a hidden temp file in the same folder, fsync, then rename over ``path``.

    A failure (disk full, a crash) leaves the previous ``path`` untouched and at most a
    hidden ``.<name>.tmp-<pid>`` file (removed on errors; only a kill can leave one).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_directory(directory: Path, files: Mapping[str, Writer]) -> Path:
    """Write ``files`` (name -> writer) into ``directory`` so that no file is ever partial.

    Every file is written and fsynced in a hidden sibling folder first: a full disk or a
    crash while writing never touches what is already at ``directory``. Then a new directory
    appears whole (one rename); an existing one gets its files replaced one rename each, in
    the order given (the caller puts the file that makes the others valid last).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.resolve().with_name(f".{directory.resolve().name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, write in files.items():
            atomic_write_file(staging / name, write)
        if directory.is_dir() and any(directory.iterdir()):
            for name in files:
                os.replace(staging / name, directory / name)
            fsync_directory(directory)
        else:
            os.replace(staging, directory)
            fsync_directory(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def remove_directory(folder: Path) -> None:
    """Delete ``folder`` so that a crash never leaves it half-deleted under its own name."""
    if not folder.is_dir():
        return
    doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
