"""The Hydra application behind ``python train.py`` and ``lora-lightning-train``.

Modules, one concern each (none imports the library's internals, only ``lora_lightning``'s
public names and the default task through its config):

- ``config``: where ``conf/`` is (in the wheel or the checkout), the ``lora_export`` schema,
  ``register_configs``.
- ``checks``: config checks before anything loads, one-line-ready errors.
- ``errors``: ``ConfigError``, ``Preempted`` and the one-line report with its exit status.
- ``signals``: ``ckpt_path`` / ``resume=auto``, SIGTERM checkpoints, exact mid-epoch resume.
- ``final_step``: a run stopped between validations or mid-epoch is validated at its last step
  and resumes there.
- ``console``: logging routes, dependency noise, the progress bar, the final block; ``train.log``.
- ``tracking``: W&B run status and the adapter artifact.
- ``summary``: ``summary.csv`` / ``.md`` / ``.png`` at the end of a multirun.
- ``train``: ``run(cfg)`` (one job) and ``main`` (the entry point).
- ``evaluate``: ``lora-lightning-eval``, scoring saved adapters on a labelled TSV.
"""

from lora_lightning.app.config import CONF_DIR, ExportConfig, register_configs
from lora_lightning.app.errors import ConfigError, Preempted
from lora_lightning.app.train import main, run

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "ExportConfig",
    "Preempted",
    "main",
    "register_configs",
    "run",
]
