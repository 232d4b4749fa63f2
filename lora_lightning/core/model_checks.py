"""Features of a model that PEFT computes differently from this project, refused by name.

Owns: :func:`check_model_features`, the checks of the model (not of a file) that saving
(``core.adapter``), loading (``core.peft_format``) and the callback's setup share, so an
adapter file is refused before it is written or read when PEFT would give other outputs for
this model's layers, and :func:`tied_elsewhere` (weights shared across modules). Pure queries
on a read-only model. Must not import: ``core.adapter``, ``core.peft_format``, Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_lightning.core.errors import AdapterFileError
from lora_lightning.core.state import parameter_aliases


def check_model_features(model: nn.Module, adapted: list[str], saved: list[str], what: str) -> None:
    """Refuse an adapter file (to write or to read) whose layers PEFT computes differently.

    ``adapted``: names of the LoRA layers; ``saved``: ``modules_to_save`` names; ``what``
    starts the message. Refused: a ``modules_to_save`` module whose weights are tied to a
    module outside it (PEFT trains a copy and leaves the other as it was; here the shared
    tensor changes both); an adapted embedding with an ``embed_scale`` other than 1 (PEFT
    scales the LoRA term by it, this project does not); an adapted convolution with a
    dilation other than 1 (PEFT's ``lora_A`` ignores the dilation).

    Raises:
        AdapterFileError: naming the module and the difference.
    """
    modules = dict(model.named_modules())
    problems = []
    for name in saved:
        tied = tied_elsewhere(model, name)
        if tied:
            problems.append(
                f"modules_to_save module {name!r} shares its weights with {tied[:3]} (tied "
                "weights): PEFT trains a copy of it and leaves the others as they were, here "
                "the shared tensor would change both; untie them first (give "
                f"{name!r} its own nn.Parameter clone) or adapt it with LoRA instead"
            )
    for name in adapted:
        module = modules.get(name)
        scale = getattr(module, "embed_scale", None)
        if isinstance(module, nn.Embedding) and scale is not None and _not_one(scale):
            problems.append(
                f"{name!r} is a scaled embedding ({type(module).__name__}, embed_scale="
                f"{float(torch.as_tensor(scale).reshape(-1)[0]):g}): PEFT multiplies its LoRA "
                "term by embed_scale, this project does not; leave it out of the targets"
            )
        dilation = getattr(module, "dilation", None)
        if isinstance(module, nn.modules.conv._ConvNd) and any(d != 1 for d in dilation):
            problems.append(
                f"{name!r} is a convolution with dilation={tuple(dilation)}: PEFT builds its "
                "lora_A without the dilation, so its outputs differ from this project's; "
                "leave it out of the targets"
            )
    if problems:
        raise AdapterFileError(
            f"{what}: PEFT would compute something else for this model: " + "; ".join(problems)
        )


def tied_elsewhere(model: nn.Module, name: str) -> list[str]:
    """Names of parameters outside module ``name`` that are the same tensor as one inside."""
    prefix = f"{name}."
    aliases = parameter_aliases(model)
    outside = {o for n, others in aliases.items() if n.startswith(prefix) for o in others}
    return [n for n in aliases if n in outside and not n.startswith(prefix)]


def _not_one(scale: Any) -> bool:
    values = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    return bool((values != 1).any())
