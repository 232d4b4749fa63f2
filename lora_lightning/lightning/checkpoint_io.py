"""A ``CheckpointIO`` that writes checkpoints atomically and keeps an adapter beside each.

Owns: :class:`AdapterExportingIO`, which wraps the strategy's ``CheckpointIO``. It is handed an
export function and optionally a check function (not the callback), so it knows nothing of
LoRA beyond "after writing a checkpoint, call this" and "after reading one, check it". Reading
a checkpoint that cannot be read is a ``CheckpointMismatchError``; the check runs on what was
read before Lightning indexes into it (the callback's refuses a bare tensor, a list, ``{}``,
...). Must not import: ``lora_lightning.lightning.callback``, ``app/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

from lora_lightning.core.errors import CheckpointMismatchError
from lora_lightning.core.files import atomic_write_file, remove_directory
from lora_lightning.lightning.checkpoint import adapter_dir_for

#: ``export(checkpoint, path)``: called after ``checkpoint`` was written to ``path``.
ExportFn = Callable[[dict[str, Any], Any], None]
#: ``check(checkpoint, path)``: called on what was read from ``path``; raises if unusable.
CheckFn = Callable[[Any, Any], None]


class AdapterExportingIO(CheckpointIO):
    """Delegates to ``inner``; after each save calls ``export``, after each load ``check``;
    removes the adapter with the checkpoint."""

    def __init__(self, inner: CheckpointIO, export: ExportFn, check: CheckFn | None = None) -> None:
        self.inner = inner
        self.export = export
        self.check = check

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if type(self.inner) is TorchCheckpointIO and storage_options is None and _local(path):
            # Lightning's _atomic_save writes a temp file in the *system* temp folder and
            # moves it: across filesystems the move copies into the destination, so a crash
            # or a full disk mid-copy destroys the previous file (last.ckpt). Write beside
            # the destination, fsync, rename.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_file(Path(path), lambda tmp: torch.save(checkpoint, tmp))
        else:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.export(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        # Unset: keep the inner IO's default map_location, and never unpickle arbitrary
        # objects unless the caller asked for it (trainer.fit(..., weights_only=False)).
        kwargs = {} if map_location is None else {"map_location": map_location}
        if _local(path) and (Path(path) / "meta.pt").is_file():
            raise CheckpointMismatchError(
                f"checkpoint {path} is a distributed (sharded) checkpoint folder, written by "
                "ModelParallelStrategy(save_distributed_checkpoint=True); this strategy reads "
                "single files: resume it with ModelParallelStrategy, "
                "or train with save_distributed_checkpoint=False to write single files"
            )
        try:
            checkpoint = self.inner.load_checkpoint(
                path, weights_only=True if weights_only is None else weights_only, **kwargs
            )
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file gets one clear error
            reason = f"{type(err).__name__}: {(str(err).strip() or '?').splitlines()[0][:160]}"
            raise CheckpointMismatchError(
                f"checkpoint {path} could not be read ({reason}); it is empty, truncated, "
                "corrupted, not a PyTorch checkpoint, or holds objects a weights-only load "
                "refuses to unpickle. Resume from another checkpoint (e.g. an earlier one) or "
                "start without ckpt_path"
            ) from err
        if self.check is not None:
            self.check(checkpoint, path)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        remove_directory(adapter_dir_for(path))

    def teardown(self) -> None:
        self.inner.teardown()


def _local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and "://" not in str(path)
