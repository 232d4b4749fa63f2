"""Where the Hydra configs live, and the structured schemas that type-check them.

Owns: ``CONF_DIR`` (the ``conf/`` tree, inside the installed package or at the top of a source
checkout), :class:`ExportConfig` (the ``lora_export`` group's schema) and
:func:`register_configs`. Imports only Hydra and the library's public ``LoRAConfig``; it must
not import Lightning, W&B or the default task, so composing a config stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore

from lora_lightning import LoRAConfig


def _find_conf_dir() -> Path:
    """``lora_lightning/app/conf`` in a wheel (copied there at build time), else the checkout's."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


#: The config tree ``train.yaml`` is composed from.
CONF_DIR = _find_conf_dir()


@dataclass
class ExportConfig:
    """Schema of the ``lora_export`` group: what is written when and where.

    Args:
        adapter_dir: the final PEFT-format adapter folder (null: ``<output_dir>/adapter``).
        export_on_checkpoint: also write ``<checkpoint stem>_adapter/`` beside every checkpoint.
        merge_on_end: also write ``merged_model.safetensors`` (adapters folded into the base).
        export_converted: with a PiSSA/OLoRA init, write adapters converted to plain LoRA (they
            load on the untouched base, in PEFT too); false writes the unconverted form.
        log_artifact: log the final adapter as a W&B artifact of type ``model`` (with the W&B
            logger only; works offline).
    """

    adapter_dir: str | None = None
    export_on_checkpoint: bool = True
    merge_on_end: bool = False
    export_converted: bool = True
    log_artifact: bool = True


#: ``lora_export`` fields that are ``LoRACallback`` keyword arguments (the rest are the app's).
CALLBACK_EXPORT_FIELDS = ("adapter_dir", "export_on_checkpoint", "merge_on_end", "export_converted")
EXPORT_FIELDS = tuple(f.name for f in fields(ExportConfig))


def register_configs() -> None:
    """Register the schemas (``lora/schema``, ``lora_export/schema``) with Hydra's ConfigStore.

    The ``lora`` and ``lora_export`` groups list ``schema`` in their defaults, so an unknown key
    (``lora.rr=8``) or a value of the wrong type fails while Hydra composes the config.
    """
    store = ConfigStore.instance()
    store.store(group="lora", name="schema", node=LoRAConfig)
    store.store(group="lora_export", name="schema", node=ExportConfig)
