"""Checks of a composed config that run before any model or data is loaded.

Owns the rules that turn a bad value into a :class:`ConfigError` naming the key, the value and
what is valid: the ``lora`` and ``lora_export`` groups (through the library's own validation:
``LoRACallback(config, **export)``), the resume settings, data files, and building everything
from ``_target_`` with the owning group's name on any argument error. Also warns when more CPU
processes than cores are started. Must not import W&B or the default task (it checks configs,
it does not train).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf

from lora_lightning import LoRACallback, LoRAConfig, LoRAError, plan_lora
from lora_lightning.app.config import CALLBACK_EXPORT_FIELDS, CONF_DIR, EXPORT_FIELDS
from lora_lightning.app.errors import ConfigError

log = logging.getLogger(__name__)

RESUME_MODES = (None, "auto")
#: What ``trainer.devices`` accepts (Lightning's own errors say only what is not valid).
DEVICES_HELP = (
    "a positive integer (how many), -1 (all), auto, or a list of device indices such as "
    "[0, 1] (on CPU: a positive integer of processes)"
)


def lora_callback(cfg: DictConfig) -> LoRACallback | None:
    """The ``LoRACallback`` the ``lora`` and ``lora_export`` groups describe (None without ``lora``).

    Raises:
        LoRAError: an invalid LoRA field or export option (the message names ``lora.<field>``).
    """
    if cfg.get("lora") is None:
        return None
    if lora_group_removed():
        # An experiment config (`experiment=llm_sft`) sets `lora.*` fields in the global
        # package, so `'~lora'` leaves a partial `lora` node behind: building a callback from it
        # would train LoRA with default fields where the user asked for full fine-tuning.
        log.info(
            "'~lora' removed the LoRA group: full fine-tuning (the lora fields an experiment "
            "sets, %s, are not used)",
            ", ".join(sorted(cfg.lora)),
        )
        return None
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    export = OmegaConf.to_container(cfg.get("lora_export") or {}, resolve=True)
    options = {key: export[key] for key in CALLBACK_EXPORT_FIELDS if key in export}
    return LoRACallback(lora, **options)


def lora_group_removed() -> bool:
    """Whether this Hydra job's defaults list has no ``lora`` group (``python train.py '~lora'``).

    False outside a Hydra job (a config built by hand decides with its ``lora`` node alone).
    """
    if not HydraConfig.initialized():
        return False
    return "lora" not in HydraConfig.get().runtime.choices


#: Groups whose entries are each built from a ``_target_`` (a list of objects, not arguments).
TARGET_LISTS = ("callbacks", "logger")


def check_known_keys(cfg: DictConfig) -> None:
    """Every key the app reads is one it knows, however it was written (``lora.x=1``,
    ``+lora.x=1``, ``++x=1``): the ``lora`` and ``lora_export`` groups hold only their schema's
    fields, the top level only ``train.yaml``'s keys and groups, and every entry of
    ``callbacks``/``logger`` is null or has a ``_target_``. (The other groups pass their keys
    to a constructor, which refuses unknown ones.)

    Raises:
        ConfigError: naming the unknown key, the valid ones and the closest.
    """
    schemas = {
        "lora": [f.name for f in dataclasses.fields(LoRAConfig)],
        "lora_export": list(EXPORT_FIELDS),
        "": _top_level_keys(),
    }
    for group, known in schemas.items():
        node = cfg if not group else cfg.get(group)
        for key in node or {}:
            if key not in known:
                name = f"{group}.{key}" if group else key
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"{name} is not a key the app reads ({hint}valid"
                    f"{' in ' + group if group else ' top-level keys'}: {', '.join(known)}); "
                    "a key added with '+' is checked too"
                )
    for group in TARGET_LISTS:
        for name, node in (cfg.get(group) or {}).items():
            if node is not None and not (OmegaConf.is_dict(node) and "_target_" in node):
                raise ConfigError(
                    f"{group}.{name}={_short(node)} is not a {group[:-1] if group == 'callbacks' else group} "
                    f"to build: each entry of {group} is null or a mapping with a _target_ "
                    f"(the class) and its arguments; entries: {', '.join(cfg.get(group))}"
                )


def _top_level_keys() -> list[str]:
    """The keys of ``train.yaml`` and the names of the groups its defaults list."""
    train = OmegaConf.load(CONF_DIR / "train.yaml")
    groups = []
    for entry in train.get("defaults", []):
        name = next(iter(entry)) if OmegaConf.is_dict(entry) else str(entry)
        if not name.startswith(("override ", "hydra")) and name != "_self_":
            groups.append(name)
    return sorted({*groups, *(k for k in train if k not in ("defaults", "hydra"))})


def _short(node: Any) -> str:
    text = str(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)
    return text if len(text) <= 40 else text[:37] + "..."


def check_targets(model: pl.LightningModule, lora: LoRACallback | None) -> None:
    """Plan the injection on the freshly built model (the task builds its layers in
    ``__init__``), so a target that matches nothing is reported before W&B starts or the
    trainer runs, not from inside ``fit``. Changes nothing.

    Raises:
        LoRAError: as ``plan_lora`` (e.g. ``lora.target_modules=[...] matched no module``).
    """
    if lora is not None:
        with warnings.catch_warnings():  # the callback warns (once) when it injects
            warnings.simplefilter("ignore")
            plan_lora(model, lora.config, target_fn=lora.target_fn)


def check_resume(cfg: DictConfig) -> None:
    """``resume`` is null or ``auto``; ``ckpt_path``, when set, is an existing file."""
    resume = cfg.get("resume")
    if resume not in RESUME_MODES:
        raise ConfigError(
            f"resume={resume!r} is invalid: expected null (start fresh unless ckpt_path is set) "
            "or auto (continue from the run folder's newest checkpoint)"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return
    if resume == "auto":
        raise ConfigError(
            f"ckpt_path={ckpt_path} and resume=auto are both set: use ckpt_path to resume from "
            "that file, or resume=auto to find the run folder's newest checkpoint"
        )
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")


def check_files(cfg: DictConfig, group: str) -> None:
    """Every ``<group>.*_file`` that is set names an existing file."""
    node = cfg.get(group) or {}
    for key, value in node.items():
        if key.endswith("_file") and value is not None and not Path(str(value)).is_file():
            raise ConfigError(f"{group}.{key}={value}: no such file")


def instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """Build ``cfg.<key>`` from its ``_target_``; a bad argument is a ConfigError naming ``key``.

    The task's and Lightning's constructors check their arguments before loading anything, so a
    bad value is reported here, in one line, before any weights or data are read.
    """
    try:
        return hydra.utils.instantiate(OmegaConf.select(cfg, key), **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LoRAError):
            raise cause from err
        user_errors = (ValueError, TypeError, MisconfigurationException, ModuleNotFoundError)
        if isinstance(cause, user_errors):  # a missing extra: the task's message names it
            reason = " ".join(str(cause).split())
            if key == "trainer" and re.search(r"\bdevices\b", reason):
                # Lightning's wording names neither the key nor always the value, and says
                # what is not valid rather than what is.
                devices = OmegaConf.select(cfg, "trainer.devices")
                raise ConfigError(
                    f"trainer.devices={devices}: {reason} Valid trainer.devices: {DEVICES_HELP}"
                ) from err
            raise ConfigError(f"{key}: {reason}") from err
        raise


def warn_if_cpu_oversubscribed(trainer: pl.Trainer) -> None:
    """Warn when more CPU training processes than cores run on this machine."""
    if not isinstance(trainer.accelerator, CPUAccelerator) or trainer.num_devices < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores is not None and trainer.num_devices > cores:
        message = (
            f"trainer.devices={trainer.num_devices} starts {trainer.num_devices} CPU processes "
            f"on {cores} cores: they compete for the cores and train slower than fewer "
            f"processes; use trainer.devices={cores} or fewer"
        )
        if trainer.is_global_zero:
            log.warning(message)
