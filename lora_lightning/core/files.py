"""Bytes on disk: atomic file and directory writes that never lose what was there.

Owns: reading and writing adapter directories as bytes (:func:`write_adapter_files`,
:func:`read_adapter_files`: which files, in which order, never a mix of two saves),
:func:`atomic_write_file` (temp file beside the destination, fsync, rename),
:func:`write_directory`, :func:`remove_directory`. Knows nothing of LoRA maths or of what the
keys and fields mean (``core.peft_format``). Must not import: any other ``lora_lightning``
module but ``core.errors``.

How a save never loses or mixes anything::

    lock the parent folder (flock, exclusive: writers of one folder take turns)
    finish or delete what killed writers left     (a ``.swap-`` folder is rolled forward)
    write + fsync every file in a staging folder  .<name>.tmp-<pid>-<thread>-<random>
    new or empty destination:  rename the staging folder onto it (one atomic step)
    folder with files in it, or a mount point:    staging *inside* it, renamed .swap- once
                                                  complete, then one rename per file,
                                                  the config last
    unlock

How a read never returns two saves' files::

    read the config, then the weights (no lock)   the weights record sha256(config text)
    they match (or no record: PEFT wrote them)    -> done
    else: the same lock, shared (a writer midway finishes first), read again
      match                                       -> done
      a killed writer's .swap- config matches     -> that config (its save, completed)
      the save held the lock                      -> an edit made after saving: warn, done
      else (no flock there): retry ~1 s, then     -> AdapterFileError: different saves

- The staging name is unique per call (pid, thread id, random), so threads and processes
  never share one. Every writer holds the exclusive lock while its staging folder exists, so
  a writer holding the lock knows any other staging folder of that name is a leftover (even
  one of a pid reused since, or from another container).
- The lock is ``flock`` on the parent folder itself: no lock file is ever created, and a
  mount point or a destination behind a symlink keeps a stable parent. Where ``flock`` is
  not available (some network filesystems) saving still works, without the serialisation,
  and the save records so. Readers lock only on a mismatch: readers that held the shared
  lock on every load kept a writer waiting for as long as they kept loading.
- The destination is resolved first (a symlink to a folder writes into that folder), and a
  destination folder is never itself renamed once it exists (``os.replace`` cannot move a
  mount point, and would break a symlink).
"""

from __future__ import annotations

import errno as errnos
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from lora_lightning.core.errors import AdapterFileError, AdapterWriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: saves are not serialised
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

#: The safetensors metadata entry of a save: JSON ``{"config_sha256": hex of the config
#: text saved with these weights, "saved_locked": whether the save held the folder's lock}``.
#: One entry, because safetensors writes metadata in no fixed order: one key keeps two saves
#: of the same adapter byte-identical.
SAVE_RECORD = "lora_lightning"
#: An adapter config is a few kilobytes; anything this large is not one.
MAX_CONFIG_BYTES = 16 * 2**20
#: Seconds a reader waits between reads that found the files of two different saves.
MISMATCH_RETRY_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)

#: ``write(path)`` writes one file's bytes to ``path``.
Writer = Callable[[Path], None]

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|swap|del)-(?P<pid>\d+)(?:-\d+-[0-9a-f]+)?")


def write_adapter_files(
    directory: Path, config_text: str, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write an adapter directory: ``adapter_model.safetensors`` (``tensors``, contiguous CPU
    tensors; its metadata records the sha256 of ``config_text``, see :data:`SAVE_RECORD`) and
    ``adapter_config.json`` (``config_text``), never losing what was there or mixing saves.

    Raises:
        AdapterWriteError: the destination cannot be written (naming the path and why); the
            previous adapter there is unchanged.
    """
    digest = hashlib.sha256(config_text.encode("utf-8")).hexdigest()

    def files(locked: bool) -> dict[str, Writer]:
        record = {"config_sha256": digest, "saved_locked": locked}
        metadata = {SAVE_RECORD: json.dumps(record, sort_keys=True)}
        # Weights first, config last: the config is what makes a directory an adapter.
        return {
            WEIGHTS_FILE: lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
            CONFIG_FILE: lambda tmp: tmp.write_text(config_text, encoding="utf-8", newline="\n"),
        }

    return _write_directory(Path(directory), files)


def read_adapter_files(directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read an adapter directory: ``(adapter_config.json text, tensors)``; never unpickles.

    The two files are always those of one save (see the module docstring); the config is read
    as UTF-8 text (a byte-order mark is dropped), its parsing is ``core.peft_format``'s job.

    Raises:
        AdapterFileError: not a folder, a file missing, a pickle-only ``adapter_model.bin``,
            an unreadable or oversized file, or files that come from two different saves;
            the message names the path.
    """
    directory = Path(directory)
    if not directory.is_dir():
        state = "is a file, not a folder" if directory.exists() else "does not exist"
        raise AdapterFileError(
            f"adapter directory {directory} {state}; expected a folder with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    target = Path(os.path.realpath(directory))
    config, tensors, record = _read_pair(directory, target)
    recorded = record.get("config_sha256")
    if recorded is None or recorded == _sha256(config):  # no lock: writers never wait on us
        return _decode(config, directory / CONFIG_FILE), tensors
    with _folder_lock(target.parent, exclusive=False):  # a writer mid-swap finishes first
        for delay in (*MISMATCH_RETRY_DELAYS, None):
            config, tensors, record = _read_pair(directory, target)
            text = _decode(config, directory / CONFIG_FILE)
            recorded = record.get("config_sha256")
            if recorded is None or recorded == _sha256(config):
                return text, tensors
            finished = _config_left_by_interrupted_swap(target, recorded)
            if finished is not None:  # a writer was killed between its renames
                return _decode(finished, directory / CONFIG_FILE), tensors
            if record.get("saved_locked") is True:  # no locked save leaves a mix behind
                warnings.warn(
                    f"{directory / CONFIG_FILE} was changed after {WEIGHTS_FILE} was saved "
                    "(its sha256 differs from the one recorded with the weights); loading "
                    "it as edited",
                    stacklevel=3,
                )
                return text, tensors
            if delay is not None:  # an unlocked writer may be midway: look again
                time.sleep(delay)
    raise AdapterFileError(
        f"{directory}: {CONFIG_FILE} and {WEIGHTS_FILE} come from different saves (the "
        f"weights were saved with a config of sha256 {recorded[:12]}..., the config there has "
        f"{_sha256(config)[:12]}...); two writers saved to this folder at once without a "
        "lock, or the config was edited by hand: save the adapter again"
    )


def atomic_write_file(path: Path, write: Writer) -> None:
    """Write via a hidden temp file in the same folder, fsync, then rename over ``path``.

    A failure (disk full, a crash) leaves the previous ``path`` untouched and at most a
    hidden ``.<name>.tmp-<pid>-<thread>-<random>`` file (removed on errors; one left by a
    killed process is removed by the next write of ``path``).
    """
    path = Path(path)
    _remove_leftovers(path.parent, path.name, all_stale=False)
    tmp = _staging_name(path, "tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_directory(directory: Path, files: Mapping[str, Writer]) -> Path:
    """Write ``files`` (name -> writer) into ``directory`` so that no file is ever partial.

    Every file is written and fsynced in a hidden staging folder first: a full disk or a
    crash while writing never touches what is already at ``directory``. Then a new (or empty)
    directory appears whole (one rename); one with files in it, or a mount point, gets its
    files replaced one rename each, in the order given (the caller puts the file that makes
    the others valid last). Concurrent calls for one directory are serialised (the writers
    run under the parent folder's lock: one must not itself write into that folder).

    Returns:
        ``directory`` as given.

    Raises:
        AdapterWriteError: the destination cannot be written (naming the path and why).
    """
    return _write_directory(Path(directory), lambda locked: files)


def remove_directory(folder: Path) -> None:
    """Delete ``folder`` so that a crash never leaves it half-deleted under its own name.

    A symlink is removed, not the folder it points to.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        return
    if not folder.is_dir():
        return
    with _folder_lock(folder.parent, exclusive=True):
        doomed = _staging_name(folder, "del")
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


# ------------------------------------------------------------------------------- writing


def _write_directory(directory: Path, make_files: Callable[[bool], Mapping[str, Writer]]) -> Path:
    """:func:`write_directory` with files that may depend on whether the lock is held."""
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise AdapterWriteError(
            errnos.ENOTDIR,
            f"cannot save to {directory}: it is a file, not a folder; remove it or choose "
            "another directory",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(directory, err, f"cannot create its parent {target.parent}") from err
    with _folder_lock(target.parent, exclusive=True) as locked:
        staging = None
        try:
            _remove_leftovers(target.parent, target.name, all_stale=locked)
            if target.is_dir():
                _finish_interrupted_swaps(target, all_stale=locked)
                _remove_leftovers(target, target.name, all_stale=locked)
            files = make_files(locked)
            in_place = target.is_dir() and (any(target.iterdir()) or os.path.ismount(target))
            staging = _staging_name(target / target.name if in_place else target, "tmp")
            staging.mkdir()
            for name, write in files.items():
                write(staging / name)
                _fsync_file(staging / name)
            fsync_directory(staging)
            if in_place:  # the folder stays (a mount point, say); its files are replaced
                swap = staging.with_name(staging.name.replace(".tmp-", ".swap-", 1))
                os.replace(staging, swap)  # from here on the staged files are complete
                staging = swap
                _move_files(swap, target, list(files))
            else:
                os.replace(staging, target)
                fsync_directory(target.parent)
        except (OSError, SafetensorError) as err:
            raise _write_error(directory, err) from err
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return directory


def _move_files(source: Path, target: Path, names: list[str]) -> None:
    """Rename ``names`` from ``source`` into ``target`` in that order, then fsync."""
    for name in names:
        os.replace(source / name, target / name)
    fsync_directory(target)


def _finish_interrupted_swaps(target: Path, all_stale: bool) -> None:
    """Complete the per-file swap of a writer killed midway, so ``target`` is one save.

    Its ``.swap-`` folder holds the files it had not moved yet, all complete (the folder gets
    that name only once every file is written and fsynced); the config goes last.
    """
    for swap in _leftovers(target, target.name, {"swap"}, all_stale):
        names = sorted(p.name for p in swap.iterdir() if p.is_file())
        names.sort(key=lambda name: name == CONFIG_FILE)
        try:
            _move_files(swap, target, names)
        except OSError:
            pass  # a read-only folder, say: the save that follows reports it


def _write_error(
    directory: Path, err: OSError | SafetensorError, doing: str = ""
) -> AdapterWriteError:
    """The error for a failed save; safetensors reports the OS error only in its message."""
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
        reason += f" ({err.filename})" if err.filename else ""
    else:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found[1]) if found else None
        reason = os.strerror(code) if code else str(err)
    doing = f"{doing}: " if doing else ""
    return AdapterWriteError(
        code or errnos.EIO,
        f"cannot save to {directory}: {doing}{reason}; what was there is unchanged",
    )


def _staging_name(path: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-<thread id>-<random>`` beside ``path``: unique per call."""
    unique = f"{os.getpid()}-{threading.get_native_id()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.{kind}-{unique}")


def _leftovers(folder: Path, name: str, kinds: set[str], all_stale: bool) -> list[Path]:
    """Hidden temp entries for ``name`` in ``folder`` that no live writer is using.

    ``all_stale``: the caller holds the exclusive lock, so every one is a leftover (its
    writer is dead, maybe in another pid namespace); otherwise only a dead pid's.
    """
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == name and match["kind"] in kinds:
            if all_stale or not _alive(int(match["pid"])):
                found.append(folder / entry.name)
    return found


def _remove_leftovers(folder: Path, name: str, all_stale: bool) -> None:
    """Delete what killed writers of ``name`` left in ``folder`` (temp files and folders)."""
    for path in _leftovers(folder, name, {"tmp", "swap", "del"}, all_stale):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


@contextmanager
def _folder_lock(folder: Path, exclusive: bool) -> Iterator[bool]:
    """``flock`` ``folder`` itself (no lock file); yields whether the lock is held.

    Best effort: where the folder cannot be opened or the filesystem has no ``flock`` (some
    network filesystems), it yields ``False`` and the caller goes on unserialised.
    """
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            if fd >= 0:
                os.close(fd)
            fd = -1
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------- reading


def _read_pair(
    directory: Path, target: Path
) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    """The config bytes, the tensors and the save record (``{}`` if none) of ``directory``."""
    path = directory / CONFIG_FILE
    if not (target / CONFIG_FILE).is_file():
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {CONFIG_FILE}")
    config = _read_config_bytes(target / CONFIG_FILE, path)
    path = directory / WEIGHTS_FILE
    if not (target / WEIGHTS_FILE).is_file():
        if (target / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{directory} holds only adapter_model.bin, a pickle file that can run "
                "arbitrary code when loaded, so it is refused; convert it to "
                f"{WEIGHTS_FILE} in a trusted environment"
            )
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {WEIGHTS_FILE}")
    try:
        # One open, one read: the header (with the save record) and the tensors come from
        # the same file even if a save replaces it meanwhile. ``safe_open`` is not that: it
        # reads the header from its open file but maps the tensors by path again (safetensors
        # 0.8), so a save landing between the two gave one save's record with another's
        # tensors (a mix the record check passed) or a "smaller than the required mapping
        # size" error (tests/test_file_faults.py, about one run in ten).
        with open(target / WEIGHTS_FILE, "rb") as handle:
            data = handle.read()
        tensors = safetensors_load(data)  # validates the file; copies: nothing maps it after
        metadata = _safetensors_metadata(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        record = json.loads(metadata.get(SAVE_RECORD, "{}"))
    except ValueError:
        record = None
    return config, tensors, record if isinstance(record, dict) else {}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (``{}`` if none), which
    ``safetensors.torch.load`` has validated: an 8-byte little-endian header length, then the
    header's JSON object (the format's specification)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def _read_config_bytes(real: Path, shown: Path) -> bytes:
    try:
        with open(real, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise AdapterFileError(f"{shown} could not be read ({err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{shown} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; an adapter config is a "
            "few kilobytes of JSON"
        )
    return data


def _decode(config: bytes, shown: Path) -> str:
    try:
        return config.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{shown} could not be read ({err}); it must be UTF-8") from None


def _config_left_by_interrupted_swap(target: Path, digest: str) -> bytes | None:
    """The config a killed writer had not moved in yet, if it is the one ``digest`` names."""
    for swap in _leftovers(target, target.name, {"swap"}, all_stale=True):
        try:
            config = _read_config_bytes(swap / CONFIG_FILE, swap / CONFIG_FILE)
        except AdapterFileError:
            continue
        if _sha256(config) == digest:
            return config
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
