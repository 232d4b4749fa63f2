"""LoRA checkpoints as pure functions on Lightning checkpoint dicts, testable without a Trainer.

Owns: what a trimmed checkpoint holds (:func:`trim_checkpoint`: trainable tensors only, plus a
``"lora"`` entry with the config, the base fingerprint and the adapted modules), the checks a
checkpoint must pass before it is resumed (:func:`validate_checkpoint`: every malformed or
foreign form is a :class:`CheckpointMismatchError` saying what is wrong), and the base-model
fingerprint. Must not import: Lightning (these are plain dict functions), Hydra, ``app/``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.core import LoRAConfig, config_diff, lora_state_dict, trainable_names
from lora_lightning.core.errors import CheckpointMismatchError, LoRAConfigError
from lora_lightning.core.state import is_adapter_parameter

CHECKPOINT_KEY = "lora"
FORMAT = 1


def adapter_dir_for(checkpoint_path: str | Path) -> Path:
    """The adapter directory kept beside a checkpoint: ``epoch=1.ckpt`` -> ``epoch=1_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_adapter")


def lora_metadata(
    config: LoRAConfig, fingerprint: str, adapted: list[str], export_root: str
) -> dict[str, Any]:
    """The ``checkpoint["lora"]`` entry: enough to refuse resuming into another setup."""
    return {
        "config": config.to_dict(),
        "base_fingerprint": fingerprint,
        "adapted_modules": list(adapted),
        "export_root": export_root,
        "format": FORMAT,
    }


def trim_checkpoint(checkpoint: dict[str, Any], keep: Iterable[str], metadata: dict) -> None:
    """Keep only the ``keep`` tensors in ``checkpoint["state_dict"]`` and add the LoRA entry
    (in place; the state dict keeps its mapping type)."""
    keep = set(keep)
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = type(state)((k, v) for k, v in state.items() if k in keep)
    checkpoint[CHECKPOINT_KEY] = metadata


def validate_checkpoint(
    checkpoint: Any, model: nn.Module, config: LoRAConfig, fingerprint: str
) -> None:
    """Check that ``checkpoint`` resumes ``model`` (adapted with ``config``) exactly, and drop
    any frozen base tensor it carries so the resume loads trainable tensors only.

    Raises:
        CheckpointMismatchError: not a checkpoint dict; no or a malformed ``"lora"`` entry
            (not written by a LoRA run, or tampered with); another LoRA config; another base
            model; missing, unexpected, non-tensor or wrongly-shaped trainable tensors.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f"the checkpoint holds a {type(checkpoint).__name__}, not a Lightning checkpoint "
            "dict; resume from a .ckpt written by Trainer.save_checkpoint or ModelCheckpoint"
        )
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise CheckpointMismatchError(
            "the checkpoint was not written by a run with LoRACallback (it has no 'lora' "
            "entry), so resuming from it would silently drop LoRA state; to start LoRA from "
            "full-model weights, load them into the model before fit() instead of passing "
            "ckpt_path"
        )
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config"), Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint's 'lora' entry is malformed (expected a dict with 'config', "
            f"'base_fingerprint', 'adapted_modules'; got {_describe(meta)}); it was edited or "
            "written by an incompatible version: resume from another checkpoint"
        )
    try:
        differ = config_diff(dict(meta["config"]), config, labels=("checkpoint", "now"))
    except LoRAConfigError as err:
        raise CheckpointMismatchError(
            f"the checkpoint's LoRA config is not a valid config ({err}); it was edited or "
            "written by an incompatible version"
        ) from None
    if differ:
        raise CheckpointMismatchError(
            "the checkpoint was trained with another LoRA config; differing fields: "
            + "; ".join(differ)
            + ". Resume with the checkpoint's config, or start "
            "a new run without ckpt_path"
        )
    if meta.get("base_fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"the checkpoint belongs to another base model (fingerprint "
            f"{meta.get('base_fingerprint')!r} vs this model's {fingerprint!r}): its frozen "
            "weights differ in names, shapes, dtypes or values; load the same pretrained base"
        )
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint's 'state_dict' is {_describe(state)}, not a mapping of tensors"
        )
    _check_tensors(checkpoint, state, model)


def _check_tensors(checkpoint: dict, state: Mapping, model: nn.Module) -> None:
    trainable = set(lora_state_dict(model))
    # Names only: model.state_dict() would be a collective under FSDP. Every alias of a
    # shared (tied) tensor is a state-dict key: keep duplicates.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(params) - set(buffers))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit the adapted model: missing {len(missing)} "
            f"trainable tensor(s) {missing[:6]}, unexpected {len(unexpected)} "
            f"{unexpected[:6]}; frozen base weights may be absent, adapters may not"
        )
    problems = []
    for name in sorted(trainable):
        value, want = state[name], params[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is {_describe(value)}")
        elif tuple(value.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(value.shape)}, model {tuple(want.shape)}")
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint's trainable tensors do not fit the model: " + "; ".join(problems[:6])
        )
    frozen = [k for k in state if k in params and k not in trainable]
    if frozen:  # frozen base weights are the base model's, never the checkpoint's
        kept = type(state)((k, v) for k, v in state.items() if k not in set(frozen))
        checkpoint["state_dict"] = kept


def base_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """A short hash of the frozen base: names, shapes, dtypes and a strided sample of values.

    Cheap enough to compute at every setup on a 7B model (``samples`` values per tensor), and
    enough to tell a checkpoint of another base (another model, size or pretrained weights)
    from this one. Meta tensors contribute structure only. Sums are rounded so the same
    weights on another device give the same hash.
    """
    digest = hashlib.sha256()
    trainable = set(trainable_names(model))
    for name, param in model.named_parameters():
        if name in trainable or is_adapter_parameter(name):
            continue
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        if param.device.type != "meta" and param.numel() and param.is_floating_point():
            flat = param.detach().reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()
            values = flat[index.to(flat.device)].double()
            digest.update(f"|{values.sum().item():.6g}|{values.abs().sum().item():.6g}".encode())
    return digest.hexdigest()[:16]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
