"""Fold adapters into base weights (`merge_lora`), undo it (`unmerge_lora`), or remove them.

Owns: merging and unmerging in place, :func:`merged_state_dict` (a deployable copy with the
adapters folded in, the live model untouched), and :func:`unload_lora`. Every check happens
before the first weight changes. A quantized base (``quantize_base``, see ``core.quantize``)
is never merged into: ``merge_lora`` refuses it, ``merged_state_dict`` folds the adapters into
dequantized copies, and ``unload_lora`` leaves dequantized float weights. Frozen layers that
are stored quantized but not adapted (``quantize_scope=all_linear``) do not block
``merge_lora`` (it changes adapted weights only); ``merged_state_dict`` writes them
dequantized, and ``unload_lora`` dequantizes them too. Must not import: ``core.inject``, ``core.adapter``, Lightning.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lightning.core import quantize
from lora_lightning.core.errors import LoRAStateError
from lora_lightning.core.layers import delta_weight, detach, initial_delta
from lora_lightning.core.state import (
    adapted_layers,
    clear_marks,
    is_merged,
    layer_state,
    parameter_aliases,
    quantized_modules,
)


def merge_lora(model: nn.Module) -> None:
    """Fold ``s · B A`` into every adapted base weight; the adapters then stop contributing.
    A DoRA layer's weight becomes ``m ⊙ (W + s·B A) / ||W + s·B A||_row``.

    The sum is formed in float32 and cast back once, so bf16/fp16 bases lose as little as
    possible. Dropout is never baked in. Outputs then equal the unmerged model's up to float
    rounding, at the base model's inference cost.

    Raises:
        LoRAStateError: if the model has no adapters, is already merged, an adapted weight
            is tied to another module's (merging would change that module too), or an adapted
            base is stored quantized (``quantize_base``: merging into 4-bit or 8-bit codes
            would round the adapter away; use ``merged_state_dict`` or ``unload_lora``).
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
            with False the adapters' contribution is discarded (unmerged first if needed),
            and a PiSSA/OLoRA layer gets back its original weight ``W_res + s·B0 A0`` (up to
            float rounding). A quantized base (``quantize_base``) becomes a float parameter
            of its dequantized values (original dtype) first, either way: the original float
            weights are not kept, so it differs from them by the quantization error; with
            ``merge`` the adapters are then folded into those float weights. The same holds
            for the other frozen Linears ``quantize_scope=all_linear`` stored quantized.

    Returns:
        ``model`` itself, modified in place (``modules_to_save`` keep their trained values).
    """
    layers = list(adapted_layers(model))
    merged = is_merged(model)
    for _, module, _ in layers:
        quantize.dequantize_layer(module)
    for _, module in quantized_modules(model):  # quantize_scope=all_linear
        quantize.dequantize_layer(module)
    quantize.update_ddp_ignore(model)
    if merge and not merged and layers:
        merge_lora(model)
    elif not merge and merged:
        unmerge_lora(model)
    with torch.no_grad():
        for _, module, _ in layers:
            initial = None if merge else initial_delta(module)
            if initial is not None:
                wide = module.weight.to(torch.promote_types(module.weight.dtype, torch.float32))
                module.weight.copy_((wide + initial.to(wide.device)).to(module.weight.dtype))
    for _, module, _ in layers:
        detach(module)
    clear_marks(model)
    return model


@torch.no_grad()
def merged_weight(module: nn.Module, sign: int = 1) -> torch.Tensor:
    """``W + sign · s·B·A`` of one adapted layer, as a new tensor in the base weight's dtype
    (with DoRA: its rescaled ``W + s·B·A``, or its inverse, see ``core.dora``).

    The sum is formed in at least float32 (float64 stays float64) and rounded once, at the
    cast back; the layer itself is not changed.
    """
    weight = quantize.dequantize(module.weight)
    delta = delta_weight(module).to(weight.device)
    layer = layer_state(module)
    if layer.variant is not None:  # DoRA: rescaled rows, see core.dora
        return layer.variant.merged_weight(module, layer, delta, sign).to(weight.dtype)
    wide = weight.to(torch.promote_types(weight.dtype, delta.dtype))
    return (wide + sign * delta).to(weight.dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with ``s·B·A`` folded into copies of the adapted weights.

    Keys are exactly the base model's (no ``lora_`` keys), values are CPU copies, and the live
    model is not changed (merging in place and back would move the frozen weights by float
    rounding). A layer the user merged already is copied as it is. A quantized base weight
    is written dequantized (its original dtype), with the adapters folded in.
    """
    merged = {
        key: quantize.dequantize(value.detach()).to("cpu").contiguous().clone()
        for key, value in model.state_dict().items()
        if ".lora_" not in key
    }
    for name, module, layer in adapted_layers(model):
        if not layer.merged:
            key = f"{name}.weight" if name else "weight"
            merged[key] = merged_weight(module).to("cpu").contiguous()
    return merged


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Adapted layer name -> the other parameter names sharing its weight (tied weights)."""
    aliases = parameter_aliases(model)
    tied = {}
    for name, _, _ in adapted_layers(model):
        others = aliases.get(f"{name}.weight" if name else "weight")
        if others:
            tied[name] = others
    return tied


@torch.no_grad()
def _apply(model: nn.Module, merge: bool) -> None:
    verb = "merge" if merge else "unmerge"
    layers = list(adapted_layers(model))
    if not layers:
        raise LoRAStateError(
            f"{verb}_lora: the model has no LoRA adapters; "
            "call inject_lora(model, config) or load_adapter(model, directory) first"
        )
    wrong = [name for name, _, layer in layers if layer.merged == merge]
    if wrong:
        state = "already merged" if merge else "not merged"
        raise LoRAStateError(
            f"{verb}_lora: {len(wrong)} adapted module(s) are {state} (e.g. {wrong[0]!r}); "
            "merge_lora and unmerge_lora must alternate"
        )
    quantized = [
        (n, quantize.scheme_of(m.weight)) for n, m, _ in layers if quantize.is_quantized(m.weight)
    ]
    if quantized and merge:
        name, scheme = quantized[0]
        raise LoRAStateError(
            f"merge_lora: the base weight of adapted layer {name!r} (and {len(quantized) - 1} "
            f"more) is stored quantized ({scheme}, lora.quantize_base); merging into quantized "
            "weights would round the adapter away. Use merged_state_dict(model) for a "
            "dequantized merged copy, or unload_lora(model, merge=True) for a float model"
        )
    tied = tied_weights(model)
    if tied and merge:
        name, others = next(iter(tied.items()))
        raise LoRAStateError(
            f"merge_lora: the weight of adapted layer {name!r} is tied to {others[:3]} (shared "
            "tensor, e.g. GPT-2's lm_head and wte); merging would change those too, so merged "
            "and unmerged outputs would differ. Keep the adapter unmerged, untie the weights "
            "first (give the layer its own copy of the weight), or use merged_state_dict(model)"
            " only where the tie does not matter"
        )
    for _, module, layer in layers:
        module.weight.copy_(merged_weight(module, sign=1 if merge else -1))
        layer.merged = merge
