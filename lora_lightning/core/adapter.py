"""`save_adapter` and `load_adapter`: adapter directories in Hugging Face PEFT's format.

Owns: the two operations, each planned and checked in full before anything changes. Saving
checks every tensor (shape against the model, dtype, finite values) before the first byte is
written; loading reads and checks the files, plans the injection, checks every tensor against
the plan, and only then injects and copies (those two halves are ``core.loading``'s, shared
with ``core.bank``; a named load is handed to ``core.bank``). On any error the model and
every file are exactly as before. Key and config translation is ``core.peft_format``'s;
writing is ``core.files``'. Must not import: Lightning, Hydra, W&B, transformers. Nothing is
ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_lightning.core import files, model_checks, peft_format
from lora_lightning.core.bank import load_named_adapter
from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.errors import AdapterFileError, LoRAStateError
from lora_lightning.core.loading import install_adapter, read_adapter, tensor_problems
from lora_lightning.core.peft_format import to_peft_key
from lora_lightning.core.serving import ServingCompatibilityWarning, vllm_unsupported
from lora_lightning.core.state import (
    adapted_layers,
    config_of,
    is_merged,
    lora_state_dict,
    saved_modules,
)


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    convert_to_plain_lora: bool = False,
) -> Path:
    """Write ``model``'s adapter as a PEFT-format directory, atomically.

    An adapter trained from a PiSSA/OLoRA init (``LoRAConfig.init``) is relative to the
    *modified* base ``W_res = W - s·B0 A0``. Saved as it is, the file says so
    (``init_lora_weights: "pissa"``, as PEFT writes) and loading it onto a base is refused;
    with ``convert_to_plain_lora`` it is written as PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` does: ``A' = [A; A0]``,
    ``B' = [B, -B0]`` (rank 2r, alpha doubled, ``alpha·sqrt(2)`` with rsLoRA, so the scaling
    is the same), ``init_lora_weights: true``, which gives the same outputs on the untouched
    stock base, here and in PEFT. For any other init the option changes nothing.

    Args:
        model: the adapted model; saved paths are relative to it (pass the Hugging Face model
            itself, not a wrapper holding it, for an adapter PEFT loads onto the stock model).
        directory: created if missing; an adapter already there is replaced only once the new
            files are complete on disk.
        state_dict: take tensors from this mapping (keys relative to ``model``) instead of the
            live parameters, e.g. from a checkpoint gathered under FSDP.
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.
        convert_to_plain_lora: write a PiSSA/OLoRA adapter in its converted, plain LoRA form.

    Returns:
        The directory.

    Raises:
        LoRAStateError: if the model has no adapters or is merged (unmerge first).
        AdapterFileError: a tensor that does not fit the model (shape, dtype), holds NaN/Inf,
            or has no values (meta device); nothing is written then.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: save clean names
    layers = list(adapted_layers(model))
    config = config_of(model)
    if not layers or config is None:
        raise LoRAStateError(
            "save_adapter: the model has no LoRA adapters; call inject_lora(model, config) first"
        )
    if is_merged(model):
        raise LoRAStateError(
            "save_adapter: the model is merged, so its base weights already contain the "
            "adapters; call unmerge_lora(model) before saving, or save the merged weights"
        )
    expected = lora_state_dict(model)
    tensors = expected
    if state_dict is not None:
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise LoRAStateError(f"save_adapter: state_dict lacks adapter tensors {missing[:8]}")
        tensors = {name: state_dict[name] for name in expected}
    _check_savable(tensors, expected, Path(directory))
    _check_no_tensor_twice(tensors, Path(directory))
    saved = [n for n, _ in saved_modules(model)]
    model_checks.check_model_features(
        model, [n for n, _, _ in layers], saved, f"save_adapter: refusing to write {directory}"
    )
    kinds = {name: layer.kind for name, _, layer in layers}
    tensors = {name: t.detach().to("cpu") for name, t in tensors.items()}
    if convert_to_plain_lora and config.changes_base:
        tensors, layers, config = _converted_to_plain_lora(tensors, layers, config)
    peft_tensors = {to_peft_key(name, kinds): t.contiguous() for name, t in tensors.items()}
    peft_config = peft_format.peft_config(config, layers, saved)
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    config_text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    written = files.write_adapter_files(Path(directory), config_text, peft_tensors)
    unservable = vllm_unsupported(model)
    if unservable:
        warnings.warn(
            ServingCompatibilityWarning(
                f"save_adapter: {written} loads in PEFT, but vLLM refuses adapters with "
                f"{'; '.join(unservable)}: serve it merged (merged_state_dict) or with PEFT"
            ),
            stacklevel=2,
        )
    return written


def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], name: str | None = None
) -> list[str]:
    """Load a PEFT-format LoRA adapter into ``model``, injecting adapters first if needed.

    Targets and ranks come from the tensors themselves; alpha, dropout, rslora, bias and
    ``modules_to_save`` from ``adapter_config.json`` (PEFT's pattern semantics). If the model
    already has adapters they must be exactly the file's (modules, ranks, scalings). Every
    tensor's name, shape and dtype is checked against the planned injection and every
    mismatch reported at once, before the model is changed.

    With a ``name`` the adapter is one of several on this base (see ``core.bank``): the
    first named one loaded into a plain model is installed as above and recorded under
    ``name``; later ones are checked the same way against their own plan and stored inactive
    (switch with :func:`lora_lightning.core.switch.set_active_adapter`). An unnamed injection
    counts as the adapter ``"default"``. A name already there is refused (use
    :func:`lora_lightning.core.hotswap.hotswap_adapter`).

    Returns:
        The qualified names of the adapted modules (of the named adapter with ``name``).

    Raises:
        AdapterFileError: missing or unreadable files, a pickle-only ``adapter_model.bin``, a
            non-LoRA adapter, tensors that do not fit the model, or a model on the ``meta``
            device (nothing to load the values into). The message names the directory.
        LoRAStateError: if the model is merged; with ``name``, a name already in use.
    """
    if name is not None:
        return load_named_adapter(model, directory, name)
    model = getattr(model, "_orig_mod", model)
    checked = read_adapter(model, directory)
    install_adapter(model, checked.plan, checked.tensors)
    return [layer_name for layer_name, _, _ in adapted_layers(model)]


def _converted_to_plain_lora(
    tensors: dict[str, torch.Tensor], layers: list, config: LoRAConfig
) -> tuple[dict[str, torch.Tensor], list, LoRAConfig]:
    """PEFT's ``subtract_mutated_init``: ``ΔW = s·(B A - B0 A0) = s'·[B, -B0] [A; A0]`` with
    ``s' = s`` at rank 2r, for the tensors, the layers' ranks/alphas and the config."""
    tensors = dict(tensors)
    converted = []
    for name, module, layer in layers:
        a0, b0 = (t.detach().to("cpu") for t in layer.initial)
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        tensors[key_a] = torch.cat([tensors[key_a], a0.to(tensors[key_a].dtype)], dim=0)
        tensors[key_b] = torch.cat([tensors[key_b], -b0.to(tensors[key_b].dtype)], dim=1)
        alpha = layer.alpha * (math.sqrt(2) if config.use_rslora else 2)
        converted.append((name, module, dataclasses.replace(layer, r=2 * layer.r, alpha=alpha)))
    return tensors, converted, dataclasses.replace(config, init="kaiming")


def _check_savable(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], directory: Path
) -> None:
    """Every tensor to be written fits the model and holds finite values, or nothing is."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in expected.items()}
    problems = tensor_problems(tensors, specs, "to save")
    if problems:
        listed = "\n  ".join(problems[:10])
        raise AdapterFileError(
            f"save_adapter: refusing to write {directory} ({len(problems)} problem(s); nothing "
            f"was written):\n  {listed}"
        )


def _check_no_tensor_twice(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """A file holds each tensor once: names sharing one (a module held under two names after
    injection, say) are refused by name before anything is written."""
    by_storage: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "meta":
            place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            by_storage.setdefault((place[0], place[1], tuple(place[2])), []).append(name)
    shared = [names for names in by_storage.values() if len(names) > 1]
    if shared:
        raise LoRAStateError(
            f"save_adapter: refusing to write {directory}: {shared[:3]} are one tensor under "
            "several names (a module held under two names, e.g. self.b = self.a); PEFT would "
            "adapt only one of the names. Give each name its own module, or unload_lora and "
            "inject again (injection refuses such modules by name)"
        )
