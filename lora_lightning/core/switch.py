"""Switching the active adapter of a model holding several (``core.bank``).

Owns: :func:`set_active_adapter` and the rules of what a switch may do exactly
(:func:`check_switchable`, :func:`base_restores`), which hot-swapping and mixed batches share.
Must not import: ``core.hotswap``, ``core.combine``, ``core.mixed``, Lightning, Hydra,
transformers.

Switching to an adapter whose layout equals the installed one's (same tensors by name,
shape and dtype, same ranks, alphas and scalings, same dropout/bias/variant flags) copies
its values into the live parameters in place (parameter identity kept, no recompile of a
``torch.compile``'d model) and stores the outgoing values in the bank; any other switch
unloads the active adapter and applies the incoming adapter's plan (checked before anything
changes). On an error the model is as before.

Refused by name, because the result would not be exact: switching away from an unconverted
PiSSA/OLoRA adapter (it rewrote the base weights), switching on a merged model, restoring a
``modules_to_save`` parameter whose base values were never seen (an adapter injected or loaded
without a name, before the bank existed, trained it), a re-injecting switch on a quantized base.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora_lightning.core import quantize, variants
from lora_lightning.core.bank import (
    active_adapter,
    check_known,
    check_plan_fits,
    trained_in_full,
    uncompiled,
)
from lora_lightning.core.errors import LoRAStateError
from lora_lightning.core.loading import install_adapter
from lora_lightning.core.merge import unload_lora
from lora_lightning.core.plan import LoRAPlan, plan_lora
from lora_lightning.core.state import (
    AdapterBank,
    StoredAdapter,
    adapted_layers,
    adapter_bank,
    config_of,
    is_merged,
    lora_state_dict,
    owner_of,
    rebind_config,
    set_adapter_bank,
)

#: Config fields that change the forward pass beyond ranks and scalings: an in-place switch
#: needs them equal (every variant's flag among them, ``core.variants``).
_FORWARD_FIELDS = (
    "dropout",
    "dropout_masks",
    "group_shared_input",
    *variants.config_fields(),
    "bias",
)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make the adapter ``name`` the one the model computes with; the outgoing one is stored.

    In place (``copy_`` into the same parameters) when both adapters have the same layout,
    else by unloading and applying the incoming adapter's checked plan. Outputs then equal
    those of the model with only that adapter loaded.

    Raises:
        LoRAStateError: an unknown name (the message lists the names); a merged model; an
            active unconverted PiSSA/OLoRA adapter (it rewrote the base weights); a
            ``modules_to_save`` parameter the incoming adapter does not train whose base
            values were never recorded; a switch between layouts on a quantized (QLoRA)
            base. The model is then unchanged.
    """
    model = uncompiled(model)
    check_known(model, name, "set_active_adapter")
    if name == active_adapter(model):
        return
    bank = adapter_bank(model)
    check_switchable(model, "set_active_adapter")
    incoming = bank.stored[name]
    live = lora_state_dict(model)
    restore = base_restores(bank, live, incoming.tensors, f"set_active_adapter({name!r})")
    outgoing = StoredAdapter(config_of(model), {n: t.clone() for n, t in live.items()})
    if _same_layout(model, live, incoming):
        # How the base is stored (QLoRA) belongs to the base, not to the adapter; the config is
        # built (and so validated) before the first value is copied.
        config = dataclasses.replace(
            incoming.config,
            quantize_base=outgoing.config.quantize_base,
            quantize_scope=outgoing.config.quantize_scope,
        )
        with torch.no_grad():
            for key, target in live.items():
                target.copy_(incoming.tensors[key])
        rebind_config(model, config)
    else:
        _check_not_quantized(model, name)
        plan = _checked_plan(model, incoming, f"set_active_adapter({name!r})")
        _reinstall(model, bank, plan, incoming, restore, outgoing)
    bank.activate(name, outgoing)


def check_switchable(model: nn.Module, what: str) -> None:
    """Refuse what cannot be exact with the active adapter: merged weights, a base rewritten
    by a PiSSA/OLoRA init."""
    if is_merged(model):
        raise LoRAStateError(
            f"{what}: the model is merged (the active adapter is folded into the base "
            "weights); call unmerge_lora(model) first"
        )
    config = config_of(model)
    if config is not None and config.changes_base:
        raise LoRAStateError(
            f"{what}: the active adapter is an unconverted init={config.init!r} adapter, which "
            "rewrote the base weights (W - s·B0 A0), so neither the base model nor another "
            "adapter is exact on this base and its own values cannot be replaced. Save it converted (save_adapter(model, dir, "
            "convert_to_plain_lora=True)), call unload_lora(model, merge=False), and load the "
            "converted directory by name"
        )


def base_restores(
    bank: AdapterBank,
    live: dict[str, torch.Tensor],
    incoming: dict[str, torch.Tensor],
    what: str,
) -> dict[str, torch.Tensor]:
    """The base values to put back into parameters the outgoing adapter trains in full and the
    incoming one does not; refuse if any was never recorded."""
    needed = [n for n in trained_in_full(live) if n not in incoming]
    unknown = [n for n in needed if n not in bank.base_values]
    if unknown:
        raise LoRAStateError(
            f"{what}: the active adapter {bank.active!r} trains {unknown[:4]} in full "
            "(modules_to_save or biases) and the base model's own values of them were never "
            "recorded (it was injected or loaded without a name), so they cannot be put back "
            "exactly. Load every adapter by name into the plain base model (load_adapter(model, "
            "dir, name=...)) instead"
        )
    return {n: bank.base_values[n] for n in needed}


def _same_layout(model: nn.Module, live: dict[str, torch.Tensor], incoming: StoredAdapter) -> bool:
    """True when ``incoming`` can be copied into the installed parameters: the same tensors
    (name, shape, dtype), ranks, alphas, scalings, and forward-relevant config fields."""
    if {n: (t.shape, t.dtype) for n, t in live.items()} != {
        n: (t.shape, t.dtype) for n, t in incoming.tensors.items()
    }:
        return False
    config, new = config_of(model), incoming.config
    if any(getattr(config, f) != getattr(new, f) for f in _FORWARD_FIELDS):
        return False
    for layer_name, _, layer in adapted_layers(model):
        r, alpha = new.rank_for(layer_name), new.alpha_for(layer_name)
        if (layer.r, layer.alpha, layer.scaling) != (r, alpha, new.scaling(r, alpha)):
            return False
    return True


def _check_not_quantized(model: nn.Module, name: str) -> None:
    """Re-injection unloads the active adapter, which dequantizes a QLoRA base for good."""
    quantized = [n for n, m, _ in adapted_layers(model) if quantize.is_quantized(m.weight)]
    if quantized:
        raise LoRAStateError(
            f"set_active_adapter({name!r}): the adapter has another layout than the active one, "
            f"so switching re-injects, and the base weights of {quantized[:3]} are stored "
            "quantized (quantize_base): unloading would leave them dequantized and the base "
            "would no longer be the one the adapters run on. Only adapters of the same layout "
            "(targets, ranks, alphas, modules_to_save) switch in place on a quantized base"
        )


def _checked_plan(model: nn.Module, adapter: StoredAdapter, what: str) -> LoRAPlan:
    """The plan that installs ``adapter`` once the active one is removed, checked now."""
    plan = plan_lora(model, adapter.config, alongside=True)
    check_plan_fits(plan, model, adapter.tensors, what)
    return plan


def _reinstall(
    model: nn.Module,
    bank: AdapterBank,
    plan: LoRAPlan,
    incoming: StoredAdapter,
    restore: dict[str, torch.Tensor],
    outgoing: StoredAdapter,
) -> None:
    """Swap adapters of different layouts: unload the active one, put back base values,
    apply ``plan`` and copy ``incoming``'s values. On an error the outgoing adapter is
    installed again (its values and config; its parameters are new objects)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    try:
        unload_lora(model, merge=False)  # also removes the bank mark
        with torch.no_grad():
            for key, value in restore.items():
                params[key].copy_(value)
        install_adapter(model, plan, incoming.tensors)
    except BaseException:
        if owner_of(model) is not None:
            unload_lora(model, merge=False)
        install_adapter(model, plan_lora(model, outgoing.config), outgoing.tensors)
        set_adapter_bank(model, bank)
        raise
    set_adapter_bank(model, bank)
