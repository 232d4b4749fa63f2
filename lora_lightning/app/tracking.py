"""Weights & Biases around one job: the adapter artifact, and finishing the run with its status.

Owns every direct use of the ``wandb`` module in the application (the ``WandbLogger`` itself is
built from ``conf/logger/wandb.yaml``). Imported only where W&B is used; ``wandb`` itself is
imported only when a run exists. Must not import Hydra or the default task.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _active_run() -> Any:
    if "wandb" not in sys.modules:  # no WandbLogger created a run in this process
        return None
    import wandb

    return wandb.run


def log_adapter_artifact(adapter_dir: Path, metadata: dict[str, Any]) -> str | None:
    """Log ``adapter_dir`` as an artifact of type ``model`` to the active run; return its name.

    Works offline (the artifact is stored with the offline run and uploaded by ``wandb sync``).
    Does nothing without an active run (other loggers, or ranks other than zero).
    """
    run = _active_run()
    if run is None:
        return None
    import wandb

    name = f"adapter-{run.id}"  # like Lightning's own model-<run id> checkpoint artifacts
    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact)
    return name


def offline_run_dir() -> str | None:
    """The folder of the active offline run (what ``wandb sync`` uploads), else None."""
    run = _active_run()
    if run is None or run.settings.mode not in ("offline", "dryrun"):
        return None
    return str(Path(run.dir).parent)


def finish_run(exit_code: int) -> None:
    """Finish this job's run, recorded as failed when ``exit_code`` is not 0.

    One W&B run per job: without ``finish()`` the next job of a sweep would reuse this run, and
    a failed job finished with code 0 would later sync as a normal finished run.
    """
    run = _active_run()
    if run is not None:
        run.finish(exit_code=exit_code)


def drop_unset_anonymous(loggers: list[Any]) -> None:
    """Lightning's ``WandbLogger`` passes ``anonymous=None`` to ``wandb.init``, which then
    prints a deprecation warning on every job ("The anonymous setting has no effect"); an
    unset value is left out instead (a value the user set is kept)."""
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]
