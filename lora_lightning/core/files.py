"""Bytes on disk: atomic file and directory writes that never lose what was there.

Owns: reading and writing adapter directories as bytes (:func:`write_adapter_files`,
:func:`read_adapter_files`: which files, in which order, never a mix of two saves),
:func:`atomic_write_file` (temp file beside the destination, fsync, rename),
:func:`write_directory`, :func:`remove_directory`. Knows nothing of LoRA maths or of what the
keys and fields mean (``core.peft_format``). Must not import: any other ``lora_lightning``
module but ``core.errors``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_lightning.core.errors import AdapterFileError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

#: ``write(path)`` writes one file's bytes to ``path``.
Writer = Callable[[Path], None]


def write_adapter_files(
    directory: Path, config_text: str, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write an adapter directory: ``adapter_model.safetensors`` (``tensors``, contiguous CPU
    tensors) and ``adapter_config.json`` (``config_text``), without ever losing what was there.

    Raises:
        AdapterFileError: the destination cannot be written (naming the path and why).
    """
    # Weights first, config last: the config is what makes a directory an adapter.
    return write_directory(
        directory,
        {
            WEIGHTS_FILE: lambda tmp: save_file(tensors, str(tmp)),
            CONFIG_FILE: lambda tmp: tmp.write_text(config_text),
        },
    )


def read_adapter_files(directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read an adapter directory: ``(adapter_config.json text, tensors)``; never unpickles.

    Raises:
        AdapterFileError: not a folder, a file missing, a pickle-only ``adapter_model.bin``,
            an unreadable file; the message names the path.
    """
    if not directory.is_dir():
        state = "is a file, not a folder" if directory.exists() else "does not exist"
        raise AdapterFileError(
            f"adapter directory {directory} {state}; expected a folder with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {CONFIG_FILE}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} could not be read ({err})") from None
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{directory} holds only adapter_model.bin, a pickle file that can run "
                "arbitrary code when loaded, so it is refused; convert it to "
                f"{WEIGHTS_FILE} in a trusted environment"
            )
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err})") from None
    return text, tensors


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
