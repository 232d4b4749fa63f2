"""Reading an adapter directory and checking it against a model, then installing it: the
first and second halves of ``load_adapter`` (:func:`read_adapter`, :func:`install_adapter`).

Owns: :class:`CheckedAdapter` (what loading a directory will do), every check of a file's
tensors against a model or a plan (names, shapes, dtypes, finite values; shared with saving
through :func:`tensor_problems`), and the comparison with adapters already in a model. Used by
``core.adapter`` (``load_adapter``) and ``core.bank`` (named adapters), so neither imports the
other's half. Must not import: ``core.adapter``, ``core.bank``, Lightning, Hydra, W&B,
transformers. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import nn

from lora_lightning.core import files, peft_format, tensor_checks, variants
from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.errors import AdapterFileError, LoRAError, LoRAStateError
from lora_lightning.core.files import CONFIG_FILE
from lora_lightning.core.inject import apply_plan
from lora_lightning.core.peft_format import to_peft_key
from lora_lightning.core.plan import LoRAPlan, plan_lora
from lora_lightning.core.state import (
    adapted_layers,
    config_of,
    is_merged,
    lora_state_dict,
    owner_of,
)
from lora_lightning.core.tensor_checks import (
    DTYPE,
    META,
    NON_FINITE,
    NOT_TENSOR,
    SHAPE,
)


def install_adapter(
    model: nn.Module, plan: LoRAPlan | None, tensors: dict[str, torch.Tensor]
) -> None:
    """Apply ``plan`` (None: the adapters are there already), then copy ``tensors`` (keyed as
    ``lora_state_dict``, checked against the plan by the caller) into the model's."""
    if plan is not None:
        apply_plan(model, plan, values_follow=True)
    with torch.no_grad():
        for key, target in lora_state_dict(model).items():
            target.copy_(tensors[key])


@dataclasses.dataclass(frozen=True)
class CheckedAdapter:
    """An adapter directory read and checked against ``model``: what loading it will do.

    ``plan`` is the injection it needs (None: the model holds exactly its adapters already);
    ``tensors`` are the file's values keyed as ``lora_state_dict`` keys them once loaded.
    """

    directory: Path
    config: LoRAConfig
    plan: LoRAPlan | None
    tensors: dict[str, torch.Tensor]


def read_adapter(
    model: nn.Module, directory: str | os.PathLike[str], *, alongside: bool = False
) -> CheckedAdapter:
    """Read ``directory`` and check it in full against ``model``, changing nothing: the first
    half of :func:`load_adapter` (same checks, same errors).

    With ``alongside`` the file is checked against its own plan as if the model held no
    adapters (``plan_lora(..., alongside=True)``), for an inactive named adapter.
    """
    model = getattr(model, "_orig_mod", model)
    directory = Path(directory)
    text, tensors = files.read_adapter_files(directory)
    peft_config = peft_format.parse_adapter_config(text, directory / CONFIG_FILE)
    file_modules = peft_format.file_modules(tensors, directory)
    if is_merged(model) and not alongside:
        raise LoRAStateError(
            "load_adapter: the model is merged; call unmerge_lora(model) before loading"
        )
    config = peft_format.config_from_peft(peft_config, file_modules, tensors, model, directory)
    tensors = peft_format.without_saved_base_weights(
        tensors, peft_config, model, file_modules, directory
    )
    if owner_of(model) is not None and not alongside:
        _check_same_adapters(model, config, file_modules, directory)
        plan = None
        present = lora_state_dict(model)
        expected = {n: (tuple(t.shape), t.dtype) for n, t in present.items()}
        on_meta = any(t.device.type == "meta" for t in present.values())
    else:
        try:
            plan = plan_lora(
                model, config, target_fn=lambda n, _: n in file_modules, alongside=alongside
            )
        except LoRAError as err:
            raise AdapterFileError(f"adapter {directory} cannot be loaded: {err}") from None
        expected = plan.trainable_tensors(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        on_meta = any(t.on_meta for t in plan.targets) or any(
            params[n].device.type == "meta" for n in expected if n in params
        )
    kinds = _kinds(model, plan)
    keys = {n: to_peft_key(n, kinds) for n in expected}
    _check_fit({keys[n]: spec for n, spec in expected.items()}, tensors, directory)
    if on_meta:
        raise AdapterFileError(
            f"adapter {directory} cannot be loaded into a model on the meta device (its tensors "
            "hold no values, so the loaded ones would be dropped); materialise the model first "
            "(model.to_empty(device=...) and load the base weights), then load the adapter"
        )
    return CheckedAdapter(directory, config, plan, {n: tensors[keys[n]] for n in expected})


def _kinds(model: nn.Module, plan: LoRAPlan | None) -> dict[str, str]:
    if plan is not None:
        return {t.name: t.kind for t in plan.targets}
    return {name: layer.kind for name, _, layer in adapted_layers(model)}


def _check_same_adapters(
    model: nn.Module,
    config: LoRAConfig,
    file_modules: dict[str, int],
    directory: Path,
) -> None:
    """A model that already holds adapters takes a file only with the same modules, ranks and
    scalings: never load values under another scaling than they were trained with."""
    present = {name: layer for name, _, layer in adapted_layers(model)}
    problems = []
    held = config_of(model)
    for field in variants.config_fields() if held is not None else ():
        if getattr(held, field) != getattr(config, field):
            problems.append(
                f"{field} differs (model {getattr(held, field)}, file {getattr(config, field)})"
            )
    if only_model := sorted(set(present) - set(file_modules)):
        problems.append(f"adapted in the model but not in the file: {only_model[:5]}")
    if only_file := sorted(set(file_modules) - set(present)):
        problems.append(f"in the file but not adapted in the model: {only_file[:5]}")
    for name in sorted(set(present) & set(file_modules)):
        layer, rank = present[name], file_modules[name]
        if layer.r != rank:
            problems.append(f"rank differs for {name} (model r={layer.r}, file r={rank})")
            continue
        scaling = config.scaling(rank, config.alpha_for(name))
        if not math.isclose(layer.scaling, scaling):
            problems.append(
                f"another scaling (lora_alpha / r, or alpha / sqrt(r) with use_rslora) for "
                f"{name} (model {layer.scaling:g}, file {scaling:g})"
            )
    if problems:
        raise AdapterFileError(
            f"adapter {directory} does not match the adapters already in the model: "
            + "; ".join(problems[:6])
            + "; load it into a model without adapters, or inject with the file's alpha, ranks "
            "and targets"
        )


def _check_fit(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    found: dict[str, torch.Tensor],
    directory: Path,
) -> None:
    problems = tensor_problems(found, expected, "in file")
    if problems:
        listed = "\n  ".join(problems)
        raise AdapterFileError(
            f"adapter {directory} does not fit the model ({len(problems)} problem(s)):\n  {listed}"
        )


def tensor_problems(
    tensors: dict[str, object],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    where: str,
) -> list[str]:
    """Every way ``tensors`` (``where``: "in file", "to save") differ from the model's
    ``expected`` name -> (shape, dtype): missing or extra names, then the rules of
    :func:`tensor_checks.tensor_problems` with exact dtypes and no meta tensors. Empty when they fit."""
    problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected))]
    in_order = {name: expected[name] for name in sorted(expected)}
    for name, rule, found, want in tensor_checks.tensor_problems(tensors, in_order):
        problems.append(
            {
                NOT_TENSOR: f"{name}: a {type(found).__name__}, not a tensor",
                META: f"{name}: on the meta device (no values)",
                SHAPE: f"{name}: shape {found} {where}, model expects {want}",
                DTYPE: f"{name}: dtype {found} {where}, model expects {want}",
                NON_FINITE: f"{name}: holds NaN or Inf values",
            }[rule]
        )
    return problems
