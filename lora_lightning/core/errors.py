"""The project's exception types, in one place.

Every error names the field, module or file at fault, the bad value, and what would be valid.
Each type also subclasses the matching built-in (``ValueError``/``RuntimeError``), so code that
already catches those keeps working.
"""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every error raised by lora_lightning."""


class LoRAConfigError(LoRAError, ValueError):
    """A LoRA configuration value is invalid, or targets match no module."""


class UnsupportedModuleError(LoRAError, TypeError):
    """A targeted module is of a type LoRA cannot adapt."""


class AdapterFileError(LoRAError, ValueError):
    """An adapter directory is missing, unreadable, or does not fit the model."""


class LoRAStateError(LoRAError, RuntimeError):
    """An operation does not fit the model's current LoRA state (e.g. merging twice)."""


class CheckpointMismatchError(LoRAError, ValueError):
    """A checkpoint does not belong to this model, this LoRA configuration, or this base."""


class AdapterWriteError(OSError, AdapterFileError):
    """A destination cannot be written (a file in the way, read-only, full disk...).

    Both an :class:`AdapterFileError` and an ``OSError`` carrying the cause's ``errno``, so
    code that handles ``OSError(ENOSPC)`` keeps working.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)
