"""The application's failures that are the user's to fix, and how they reach the terminal.

Owns: :class:`ConfigError` (a config value that cannot work), :class:`Preempted` (the job was
stopped by SIGTERM or SLURM's requeue signal after saving a checkpoint) and :func:`report`,
which turns those, and any :class:`lora_lightning.LoRAError`, into one line on stderr and an
exit status. Anything else is a bug and keeps its traceback. Imports only the library's public
error type; it must not import Lightning, Hydra or W&B.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from lora_lightning import LoRAError

#: Exit status of a job stopped by SIGTERM or SLURM's requeue signal (128 + 15, what a shell
#: reports for SIGTERM).
PREEMPTED_EXIT = 143


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""


class Preempted(RuntimeError):
    """SIGTERM (or the SLURM requeue signal) stopped training after a checkpoint was saved."""


def one_line(error: BaseException) -> str | None:
    """The error as one line for the user, or None when it is a bug that needs its traceback."""
    if isinstance(error, Preempted):
        return f"stopped: {error}"
    if isinstance(error, (ConfigError, LoRAError)):
        return "error: " + " ".join(str(error).split())
    if isinstance(error, ModuleNotFoundError) and "pip install" in str(error):
        return "error: " + " ".join(str(error).split())  # a missing extra, named by the task
    return None


def report(error: BaseException) -> NoReturn:
    """Print ``error`` as one line and exit non-zero; re-raise it if it is a bug.

    ``HYDRA_FULL_ERROR=1`` re-raises every error, so Hydra prints the full traceback.
    """
    message = one_line(error)
    if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    to_log_files(message, logging.ERROR if message.startswith("error:") else logging.WARNING)
    if isinstance(error, Preempted):
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT)
    print(f"{message} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(1)


def to_log_files(message: str, level: int) -> None:
    """Write ``message`` to the job's log files (``train.log``) only: the console gets it once,
    from :func:`report`, and a failed job's folder says why it failed."""
    record = logging.LogRecord("lora_lightning.app", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
