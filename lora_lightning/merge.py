"""Fold adapters into base weights (`merge_lora`), undo it (`unmerge_lora`), or remove them."""

from __future__ import annotations

import torch
from torch import nn

from lora_lightning.errors import LoRAStateError
from lora_lightning.inject import _BIAS_MARK, _CONFIG_ATTR, _SAVE_MARK, adapted_modules
from lora_lightning.layers import delta_weight, detach


def merge_lora(model: nn.Module) -> None:
    """Fold ``s · B A`` into every adapted base weight; the adapters then stop contributing.

    The sum is formed in float32 and cast back once, so bf16/fp16 bases lose as little as
    possible. Dropout is never baked in. Outputs then equal the unmerged model's up to float
    rounding, at the base model's inference cost.

    Raises:
        LoRAStateError: if the model has no adapters or is already merged.
    """
    _apply(model, merge=True)


def unmerge_lora(model: nn.Module) -> None:
    """Exact inverse of :func:`merge_lora`, up to float rounding of the base dtype.

    Raises:
        LoRAStateError: if the model has no adapters or is not merged.
    """
    _apply(model, merge=False)


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every LoRA part, leaving a plain model whose state-dict keys are the base's.

    Args:
        merge: fold the adapters into the base weights first (if not merged already);
            with False the adapters' contribution is discarded (unmerged first if needed).

    Returns:
        ``model`` itself, modified in place (``modules_to_save`` keep their trained values).
    """
    modules = list(adapted_modules(model))
    merged = any(spec.merged for _, _, spec in modules)
    if merge and not merged and modules:
        merge_lora(model)
    elif not merge and merged:
        unmerge_lora(model)
    for _, module, _ in modules:
        detach(module)
    for module in model.modules():
        for mark in (_SAVE_MARK, _BIAS_MARK, _CONFIG_ATTR):
            module.__dict__.pop(mark, None)
    return model


@torch.no_grad()
def _apply(model: nn.Module, merge: bool) -> None:
    modules = list(adapted_modules(model))
    if not modules:
        raise LoRAStateError(
            f"{'merge' if merge else 'unmerge'}_lora: the model has no LoRA adapters; "
            "call inject_lora(model, config) or load_adapter(model, directory) first"
        )
    wrong = [name for name, _, spec in modules if spec.merged == merge]
    if wrong:
        state = "already merged" if merge else "not merged"
        raise LoRAStateError(
            f"{'merge' if merge else 'unmerge'}_lora: {len(wrong)} adapted module(s) are "
            f"{state} (e.g. {wrong[0]!r}); merge_lora and unmerge_lora must alternate"
        )
    for _, module, spec in modules:
        module.weight.copy_(merged_weight(module, sign=1 if merge else -1))
        spec.merged = merge


@torch.no_grad()
def merged_weight(module: nn.Module, sign: int = 1) -> torch.Tensor:
    """``W + sign · s·B·A`` of one adapted layer, as a new tensor in the base weight's dtype.

    The sum is formed in at least float32 (float64 stays float64) and rounded once, at the
    cast back; the layer itself is not changed.
    """
    weight = module.weight
    delta = delta_weight(module).to(weight.device)
    wide = weight.to(torch.promote_types(weight.dtype, delta.dtype))
    return (wide + sign * delta).to(weight.dtype)
