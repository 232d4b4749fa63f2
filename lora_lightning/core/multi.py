"""Many adapters on one base: named adapters, switching, hot-swap, combination, mixed batches.

Owns: :func:`load_named_adapter` (``load_adapter(model, dir, name=...)``),
:func:`set_active_adapter`, :func:`list_adapters`, :func:`active_adapter`,
:func:`delete_adapter`, :func:`hotswap_adapter`, :func:`combine_adapters` and
:func:`mixed_batch_forward`. The bank itself (:class:`~lora_lightning.core.state.AdapterBank`)
is a piece of ``core.state``; this module is the only one that uses it. Must not import:
Lightning, Hydra, transformers.

Design: the ACTIVE adapter lives in the layers, exactly as a single adapter does (its
``lora_A``/``lora_B``/variant parameters, hooks and marks), so the single-adapter fast path
is untouched; the others wait in the bank as a config and detached tensors::

    model ─ layers: lora_A, lora_B, hooks, marks ── the active adapter ("a")
      └─ (root) bank: active="a", stored={"b": (config, tensors), ...},
                      base_values={"classifier.weight": <the base's own values>, ...}

Switching to an adapter whose layout equals the installed one's (same tensors by name,
shape and dtype, same ranks, alphas and scalings, same dropout/bias/variant flags) copies
its values into the live parameters in place (parameter identity kept, no recompile of a
``torch.compile``'d model) and stores the outgoing values in the bank; any other switch
unloads the active adapter and applies the incoming adapter's plan (checked before anything
changes). Every operation checks everything first; on an error the model is as before.

Refused by name, because the result would not be exact: switching away from (or hot-swapping
into) an unconverted PiSSA/OLoRA adapter (it rewrote the base weights), switching on a merged
model, restoring a ``modules_to_save`` parameter whose base values were never seen (an
adapter injected or loaded without a name, before the bank existed, trained it), combining
DoRA adapters or adapters that train ``modules_to_save``/biases.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lora_lightning.core import quantize, variants
from lora_lightning.core.config import DTYPES, LoRAConfig
from lora_lightning.core.errors import AdapterFileError, LoRAConfigError, LoRAStateError
from lora_lightning.core.loading import install_adapter, read_adapter
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
    set_adapters_disabled,
)

#: The name an adapter injected or loaded without a name gets.
DEFAULT = "default"
#: Reserved row name in :func:`mixed_batch_forward`: the base model, no adapter (PEFT's name).
BASE = "__base__"
#: ``combine_adapters`` combinations.
COMBINATIONS = ("cat", "linear")
#: Config fields that change the forward pass beyond ranks and scalings: an in-place switch
#: needs them equal (every variant's flag among them, ``core.variants``).
_FORWARD_FIELDS = (
    "dropout",
    "dropout_masks",
    "group_shared_input",
    *variants.config_fields(),
    "bias",
)
_A, _B = ".lora_A.weight", ".lora_B.weight"


# ------------------------------------------------------------------------------------ queries
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added (active included);
    ``["default"]`` for a model adapted without names, ``[]`` for a plain model."""
    model = _root(model)
    bank = adapter_bank(model)
    if bank is not None:
        return list(bank.order)
    return [DEFAULT] if owner_of(model) is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in the layers (``"default"`` without names), None if none."""
    model = _root(model)
    bank = adapter_bank(model)
    if bank is not None:
        return bank.active
    return DEFAULT if owner_of(model) is not None else None


# -------------------------------------------------------------------------------- operations
def load_named_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str) -> list[str]:
    """``load_adapter(model, directory, name=name)``: see :func:`lora_lightning.load_adapter`.

    Into a plain model the adapter is installed and becomes the active one; into a model with
    adapters it is checked in full against its own plan and stored inactive.

    Returns:
        The qualified names of the modules the adapter adapts.

    Raises:
        AdapterFileError: as ``load_adapter``.
        LoRAConfigError: ``name`` is not a non-empty string or is the reserved ``"__base__"``.
        LoRAStateError: ``name`` is in use already (hot-swap it with :func:`hotswap_adapter`).
    """
    model = _root(model)
    _check_new_name(model, name, "load_adapter")
    params = dict(model.named_parameters(remove_duplicate=False))
    if owner_of(model) is None:
        checked = read_adapter(model, directory)
        base = {n: params[n].detach().clone() for n in _extras(checked.tensors)}
        install_adapter(model, checked.plan, checked.tensors)
        bank = AdapterBank(active=name, order=[name])
        bank.remember_base(base)
        set_adapter_bank(model, bank)
        return checked.plan.names
    checked = read_adapter(model, directory, alongside=True)
    live = lora_state_dict(model)
    bank = _bank(model)
    # A parameter the active adapter does not train holds the base's values now.
    bank.remember_base(
        {n: params[n].detach().clone() for n in _extras(checked.tensors) if n not in live}
    )
    device = _device(model)
    tensors = {n: t.detach().to(device, copy=True) for n, t in checked.tensors.items()}
    bank.add(name, StoredAdapter(checked.config, tensors))
    set_adapter_bank(model, bank)
    return checked.plan.names


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
    model = _root(model)
    _check_known(model, name, "set_active_adapter")
    if name == active_adapter(model):
        return
    bank = adapter_bank(model)
    _check_switchable(model, "set_active_adapter")
    incoming = bank.stored[name]
    live = lora_state_dict(model)
    restore = _base_restores(bank, live, incoming.tensors, f"set_active_adapter({name!r})")
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


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the inactive adapter ``name`` from the bank.

    Raises:
        LoRAStateError: an unknown name, or the active adapter (set another one active first
            with :func:`set_active_adapter`, or remove every adapter with ``unload_lora``).
    """
    model = _root(model)
    _check_known(model, name, "delete_adapter")
    if name == active_adapter(model):
        others = [n for n in list_adapters(model) if n != name]
        raise LoRAStateError(
            f"delete_adapter: {name!r} is the active adapter; make another one active first "
            f"(set_active_adapter(model, name) with one of {others}), or call "
            "unload_lora(model) to remove every adapter"
        )
    adapter_bank(model).remove(name)


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str) -> None:
    """Load the values of the adapter in ``directory`` into the existing adapter ``name``, in
    place: no re-injection, the same ``Parameter`` objects, so a ``torch.compile``'d model
    does not recompile.

    The file is checked in full against its own plan, then against the installed layout:
    the same adapted modules, ``modules_to_save`` and trained biases, dtypes and shapes, the
    same variant flags (``use_dora``) and ``bias``. Two differences are absorbed because the result is exact:

    - a smaller rank: ``A`` is zero-padded to the installed rows and ``B`` to its columns
      (``[B, 0] [A; 0] = B A``);
    - another scaling (alpha, rank or rsLoRA): the ratio ``k = s_file / s_installed`` is
      folded into ``B`` only when ``k`` is a power of two (multiplying by it is exact, and
      checked to be); any other ratio is refused, since ``k·B`` would be rounded.

    PEFT's ``hotswap_adapter`` instead pads ranks and turns the scalings into tensors after
    ``prepare_model_for_compiled_hotswap``; here the scaling stays a Python float of the
    layer, so a scaling change that is not exact in ``B`` is refused. The adapter keeps its
    installed config (ranks, alphas, dropout): saving it writes the installed layout with the
    new values, which computes the file's adapter.

    Raises:
        LoRAStateError: an unknown name; hot-swapping the active adapter of a merged model or
            an unconverted PiSSA/OLoRA one.
        AdapterFileError: the file does not load (as ``load_adapter``) or does not fit the
            installed adapter; every mismatch is listed with the installed and the file's
            shape. The model is then unchanged.
    """
    model = _root(model)
    _check_known(model, name, "hotswap_adapter")
    active = name == active_adapter(model)
    if active:
        _check_switchable(model, "hotswap_adapter")
        config, slot = config_of(model), lora_state_dict(model)
    else:
        stored = adapter_bank(model).stored[name]
        config, slot = stored.config, stored.tensors
    checked = read_adapter(model, directory, alongside=True)
    values = _fit_to_slot(checked.config, checked.tensors, config, slot, directory, name)
    with torch.no_grad():
        for key, value in values.items():
            slot[key].copy_(value)


def combine_adapters(
    model: nn.Module, weights: dict[str, float], name: str, combination: str = "cat"
) -> list[str]:
    """Add the inactive adapter ``name``, a weighted combination of existing adapters.

    - ``cat``: the exact weighted sum of the deltas, ``ΔW = Σ w_i s_i B_i A_i``: per module
      ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` (rank ``Σ r_i``), ``B = [B_1, B_2, ...]``,
      scaling 1. PEFT's ``add_weighted_adapter(combination_type="cat")`` computes the same
      tensors (it pads modules of a smaller rank with zeros; here each module has its own
      rank), except with ``use_rslora``, where PEFT's result gets scaling ``sqrt(Σ r)``
      instead of 1; here the sum stays exact.
    - ``linear``: PEFT's ``add_weighted_adapter(combination_type="linear")`` exactly:
      ``A = Σ sign(w_i s_i) sqrt(|w_i s_i|) A_i``, ``B = Σ sqrt(|w_i s_i|) B_i`` (weights
      rounded to float32 as PEFT does), scaling 1. This is NOT the weighted sum of the deltas
      (``B A`` gains the cross terms ``B_i A_j``); every adapter must have the same rank on a
      module. Refused with ``use_rslora``, where PEFT's result would scale by ``sqrt(r)``.

    A module adapted by only some of the adapters combines those. The new adapter's dropout,
    dtype and fusion settings are the first adapter's.

    Returns:
        The qualified names of the modules the new adapter adapts.

    Raises:
        LoRAConfigError: an unknown combination, empty or non-finite weights, a bad name.
        LoRAStateError: an unknown adapter in ``weights`` or a name in use; DoRA adapters,
            adapters that train ``modules_to_save`` or biases, unconverted PiSSA/OLoRA,
            mixed dtypes, or (``linear``) different ranks on one module. The model is then
            unchanged.
    """
    model = _root(model)
    if combination not in COMBINATIONS:
        raise LoRAConfigError(
            f"combine_adapters: combination={combination!r} is not known; expected one of "
            f"{list(COMBINATIONS)}"
        )
    _check_new_name(model, name, "combine_adapters")
    if not isinstance(weights, dict) or not weights:
        raise LoRAConfigError(
            "combine_adapters: weights must be a non-empty dict {adapter name: weight}, got "
            f"{weights!r}"
        )
    sources = {}
    for source, weight in weights.items():
        _check_known(model, source, "combine_adapters")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
            raise LoRAConfigError(
                f"combine_adapters: weight of {source!r} is {weight!r}, not a number"
            )
        if not math.isfinite(float(weight)):
            raise LoRAConfigError(f"combine_adapters: weight of {source!r} is {weight}, not finite")
        sources[source] = _adapter(model, source)
    _check_combinable(sources, combination)
    layers, tensors = _combined(sources, weights, combination)
    first = next(iter(sources.values())).config
    config = _combined_config(first, layers, next(iter(tensors.values())).dtype)
    plan = plan_lora(model, config, alongside=True)
    _check_plan_fits(plan, model, tensors, f"combine_adapters({name!r})")
    device = _device(model)
    bank = _bank(model)
    bank.add(name, StoredAdapter(config, {n: t.to(device) for n, t in tensors.items()}))
    set_adapter_bank(model, bank)
    return plan.names


def mixed_batch_forward(
    model: nn.Module, adapter_names: Sequence[str], *args: Any, **kwargs: Any
) -> Any:
    """Run ``model(*args, **kwargs)`` with row ``i`` of the batch computed by the adapter
    ``adapter_names[i]`` (``"__base__"``: no adapter), as PEFT's
    ``model(..., adapter_names=[...])``.

    Rows are grouped by adapter; each adapter is made active in turn and runs its rows, and
    the outputs are put back in the original row order. Every tensor argument (nested in
    tuples, lists and dicts too) whose first dimension is the batch size is split by rows;
    anything else is passed to every call unchanged. Outputs may be tensors, tuples, lists
    and dicts (``ModelOutput`` included) of tensors with one row per input row, or None.
    The adapter active before is active again afterwards, also after an error.

    Raises:
        LoRAStateError: the model is in train mode (rows must be independent: batch norm
            and dropout are not) or merged; an unknown name; rows of another adapter or
            ``"__base__"`` while the active adapter is an unconverted PiSSA/OLoRA one (it
            rewrote the base weights; as :func:`set_active_adapter`); ``"__base__"`` rows while
            the active adapter trains parameters whose base values were never recorded; an output
            that is not one row per input row (a loss: pass no labels) or of a type that
            cannot be split (a cache object: pass ``use_cache=False``).
        LoRAConfigError: ``adapter_names`` is not a sequence of strings.
    """
    root = _root(model)
    if root.training:
        raise LoRAStateError(
            "mixed_batch_forward: the model is in train mode; rows of a mixed batch must be "
            "independent (dropout, batch norm), so call model.eval() first"
        )
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise LoRAConfigError(
            "mixed_batch_forward: adapter_names must be a list with one adapter name (or "
            f"'{BASE}') per row, got {adapter_names!r}"
        )
    names = list(adapter_names)
    unknown = sorted(set(names) - set(list_adapters(root)) - {BASE})
    if unknown:
        raise LoRAStateError(
            f"mixed_batch_forward: no adapter named {unknown}; the model holds "
            f"{list_adapters(root)} (and '{BASE}' means no adapter)"
        )
    if is_merged(root):
        raise LoRAStateError(
            "mixed_batch_forward: the model is merged, so its weights hold one adapter for "
            "every row; call unmerge_lora(model) first"
        )
    previous = active_adapter(root)
    if owner_of(root) is not None and any(n != previous for n in names):
        # The base rows and other adapters' rows need what a switch needs: one rule for both.
        _check_switchable(root, "mixed_batch_forward (rows of other adapters or '__base__')")
    if BASE in names and owner_of(root) is not None:
        live = lora_state_dict(root)
        bank = adapter_bank(root) or AdapterBank(active=DEFAULT, order=[DEFAULT])
        _base_restores(bank, live, {}, "mixed_batch_forward('__base__' rows)")
    if owner_of(root) is None:  # a plain model: every row is a base row
        return model(*args, **kwargs)
    # The active adapter first (no switch), the base next (no switch either), then the rest.
    groups = sorted(dict.fromkeys(names), key=lambda n: (n != previous, n != BASE))
    rows = {g: [i for i, n in enumerate(names) if n == g] for g in groups}
    outputs = []
    try:
        for group in groups:
            index = torch.tensor(rows[group], dtype=torch.long)
            sub_args, sub_kwargs = _take((args, kwargs), index, len(names))
            if group == BASE:
                with _base_model(root):
                    outputs.append(model(*sub_args, **sub_kwargs))
            else:
                set_active_adapter(root, group)
                outputs.append(model(*sub_args, **sub_kwargs))
    finally:
        if previous is not None and active_adapter(root) != previous:
            set_active_adapter(root, previous)
    order = torch.tensor([i for g in groups for i in rows[g]], dtype=torch.long)
    return _join(outputs, [len(rows[g]) for g in groups], order, "output")


# ------------------------------------------------------------------------------------ helpers
def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper: the real model


def _bank(model: nn.Module) -> AdapterBank:
    """The model's bank, or a new one whose active adapter is the unnamed ``default``."""
    return adapter_bank(model) or AdapterBank(active=DEFAULT, order=[DEFAULT])


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _extras(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not adapters: ``modules_to_save`` parameters, biases."""
    return [n for n in tensors if not variants.is_adapter_tensor(n)]


def _check_new_name(model: nn.Module, name: Any, what: str) -> None:
    if not isinstance(name, str) or not name or name == BASE:
        raise LoRAConfigError(
            f"{what}: adapter name {name!r} is invalid; expected a non-empty string other than "
            f"the reserved {BASE!r}"
        )
    if name in list_adapters(model):
        raise LoRAStateError(
            f"{what}: the model holds an adapter named {name!r} already (adapters: "
            f"{list_adapters(model)}); load new values into it with hotswap_adapter(model, "
            f"directory, {name!r}), or delete_adapter(model, {name!r}) first"
        )


def _check_known(model: nn.Module, name: Any, what: str) -> None:
    names = list_adapters(model)
    if name not in names:
        hint = (
            "; load one with load_adapter(model, directory, name=...)"
            if not names
            else f"; the model holds {names}"
        )
        raise LoRAStateError(f"{what}: no adapter named {name!r}{hint}")


def _check_switchable(model: nn.Module, what: str) -> None:
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


def _base_restores(
    bank: AdapterBank,
    live: dict[str, torch.Tensor],
    incoming: dict[str, torch.Tensor],
    what: str,
) -> dict[str, torch.Tensor]:
    """The base values to put back into parameters the outgoing adapter trains in full and the
    incoming one does not; refuse if any was never recorded."""
    needed = [n for n in _extras(live) if n not in incoming]
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
    _check_plan_fits(plan, model, adapter.tensors, what)
    return plan


def _check_plan_fits(
    plan: LoRAPlan, model: nn.Module, tensors: dict[str, torch.Tensor], what: str
) -> None:
    expected = plan.trainable_tensors(model)
    found = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    if expected != found:
        differ = sorted(set(expected) ^ set(found)) or [
            n for n in expected if expected[n] != found[n]
        ]
        raise LoRAStateError(
            f"{what}: the stored tensors no longer fit the model ({differ[:4]}); was the model "
            "changed after the adapter was loaded? Load the adapter again"
        )


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


def _fit_to_slot(
    file_config: LoRAConfig,
    found: dict[str, torch.Tensor],
    config: LoRAConfig,
    slot: dict[str, torch.Tensor],
    directory: str | os.PathLike[str],
    name: str,
) -> dict[str, torch.Tensor]:
    """The file's values in the installed adapter's layout (zero-padded ranks, a power-of-two
    scaling ratio folded into B), or every reason they cannot be, raised at once."""
    problems = [
        f"missing {n} (the installed adapter has it)" for n in sorted(set(slot) - set(found))
    ]
    problems += [f"unexpected {n} (not in the installed adapter)" for n in sorted(set(found) - set(slot))]  # fmt: skip
    for field in (*variants.config_fields(), "bias"):
        if getattr(file_config, field) != getattr(config, field):
            problems.append(
                f"{field} differs (installed {getattr(config, field)!r}, file "
                f"{getattr(file_config, field)!r})"
            )
    values = {}
    for key in sorted(set(slot) & set(found)):
        have, got = slot[key], found[key]
        if got.dtype != have.dtype:
            problems.append(f"{key}: dtype {got.dtype} in the file, installed {have.dtype}")
            continue
        dim = 0 if key.endswith(_A) else 1 if key.endswith(_B) else None
        padded = _padded(got, tuple(have.shape), dim)
        if padded is None:
            problems.append(
                f"{key}: shape {tuple(got.shape)} in the file, installed {tuple(have.shape)}"
                + (" (a rank can only grow into a larger slot, by zero padding)" if dim is not None else "")
            )  # fmt: skip
            continue
        values[key] = padded
    for key in [k for k in values if k.endswith(_B)]:
        layer = key[: -len(_B)]
        r_file, alpha_file = file_config.rank_for(layer), file_config.alpha_for(layer)
        r_slot, alpha_slot = config.rank_for(layer), config.alpha_for(layer)
        s_file = file_config.scaling(r_file, alpha_file)
        s_slot = config.scaling(r_slot, alpha_slot)
        if s_file == s_slot:
            continue
        ratio = s_file / s_slot
        folded = values[key] * ratio
        exact = (
            math.frexp(ratio)[0] == 0.5
            and ratio * s_slot == s_file
            and bool(torch.isfinite(folded).all())
            and torch.equal(folded / ratio, values[key])
        )
        if not exact:
            problems.append(
                f"{layer}: scaling {s_file:g} in the file (r={r_file}, alpha={alpha_file:g}), "
                f"installed {s_slot:g} (r={r_slot}, alpha={alpha_slot:g}); their ratio {ratio:g} "
                "is not a power of two, so folding it into lora_B would round the values"
            )
            continue
        values[key] = folded
    if problems:
        listed = "\n  ".join(problems[:10])
        raise AdapterFileError(
            f"hotswap_adapter: adapter {directory} does not fit the installed adapter {name!r} "
            f"({len(problems)} problem(s); nothing was changed):\n  {listed}\nHot-swapping keeps "
            "the installed parameters, so it needs the same modules, dtypes and shapes (a "
            "smaller rank is zero-padded); load it under a new name instead "
            "(load_adapter(model, directory, name=...))"
        )
    return values


def _padded(tensor: torch.Tensor, shape: tuple[int, ...], dim: int | None) -> torch.Tensor | None:
    """``tensor`` zero-padded along ``dim`` to ``shape``; None if it does not fit."""
    if tuple(tensor.shape) == shape:
        return tensor
    if dim is None or tensor.dim() != len(shape) or tensor.shape[dim] > shape[dim]:
        return None
    if any(tensor.shape[d] != shape[d] for d in range(len(shape)) if d != dim):
        return None
    out = torch.zeros(shape, dtype=tensor.dtype)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


def _adapter(model: nn.Module, name: str) -> StoredAdapter:
    """The config and tensors of the adapter ``name``, active (live tensors) or stored."""
    if name == active_adapter(model):
        return StoredAdapter(config_of(model), lora_state_dict(model))
    return adapter_bank(model).stored[name]


def _check_combinable(sources: dict[str, StoredAdapter], combination: str) -> None:
    problems = []
    for source, adapter in sources.items():
        config = adapter.config
        # No variant combines yet: each one enabled is refused, never dropped from the result.
        problems += [
            f"{source!r} {v.combine_refusal}"
            for v in variants.VARIANTS.values()
            if v.enabled(config)
        ]
        if config.changes_base:
            problems.append(f"{source!r} is an unconverted init={config.init!r} adapter")
        if extras := _extras(adapter.tensors):
            problems.append(
                f"{source!r} trains {extras[:3]} in full (modules_to_save or biases, which "
                "have no weighted sum of deltas)"
            )
        if combination == "linear" and config.use_rslora:
            problems.append(
                f"{source!r} uses rsLoRA: PEFT's linear combination would give the result "
                "scaling sqrt(r) instead of 1"
            )
    dtypes = {t.dtype for a in sources.values() for t in a.tensors.values()}
    if len(dtypes) > 1:
        problems.append(f"the adapters have different dtypes {sorted(map(str, dtypes))}")
    if combination == "linear" and not problems:
        ranks: dict[str, set[int]] = {}
        for adapter in sources.values():
            for key, tensor in adapter.tensors.items():
                if key.endswith(_A):
                    ranks.setdefault(key[: -len(_A)], set()).add(tensor.shape[0])
        differ = {m: sorted(r) for m, r in ranks.items() if len(r) > 1}
        if differ:
            problems.append(
                f"combination='linear' needs one rank per module, got {dict(list(differ.items())[:3])}"
                " (use combination='cat')"
            )
    if problems:
        raise LoRAStateError(
            "combine_adapters: cannot combine exactly: " + "; ".join(problems) + "; nothing was "
            "changed"
        )


def _combined(
    sources: dict[str, StoredAdapter], weights: dict[str, float], combination: str
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Per module: the new rank, and the new ``lora_A``/``lora_B`` tensors."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, float]]] = {}
    for source, adapter in sources.items():
        config = adapter.config
        for key, a in adapter.tensors.items():
            if key.endswith(_A):
                layer = key[: -len(_A)]
                r, alpha = config.rank_for(layer), config.alpha_for(layer)
                # PEFT's order of operations: (A * weight) * scaling, weight * scaling.
                b = adapter.tensors[layer + _B]
                parts.setdefault(layer, []).append(
                    (a.detach(), b.detach(), float(weights[source]), config.scaling(r, alpha))
                )
    ranks, tensors = {}, {}
    for layer, items in parts.items():
        if combination == "cat":
            a = torch.cat([(a * w) * s for a, _, w, s in items], dim=0)
            b = torch.cat([b for _, b, _, _ in items], dim=1)
        else:  # PEFT's _generalized_task_arithmetic_weighted_adapter + task_arithmetic
            signs = [1 if w * s >= 0 else -1 for _, _, w, s in items]
            w_a = torch.tensor(
                [math.sqrt(abs(w * s)) * g for (_, _, w, s), g in zip(items, signs, strict=True)]
            )
            w_b = torch.tensor([math.sqrt(abs(w * s)) for _, _, w, s in items])
            a = _weighted_sum([a for a, _, _, _ in items], w_a)
            b = _weighted_sum([b for _, b, _, _ in items], w_b)
        ranks[layer] = a.shape[0]
        tensors[layer + _A], tensors[layer + _B] = a.contiguous(), b.contiguous()
    return ranks, tensors


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """PEFT's ``task_arithmetic``: ``Σ w_i t_i`` over a stacked tensor, cast back."""
    stacked = torch.stack(tensors, dim=0)
    weights = weights.to(stacked.device).view(weights.shape + (1,) * (stacked.dim() - 1))
    return (stacked * weights).sum(dim=0).to(tensors[0].dtype)


def _combined_config(first: LoRAConfig, ranks: dict[str, int], dtype: torch.dtype) -> LoRAConfig:
    """Exactly the combined modules, each with ``alpha = r`` (scaling 1), no rsLoRA."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    return LoRAConfig(
        r=r,
        alpha=float(r),
        dropout=first.dropout,
        seed=first.seed,
        dtype=next(k for k, v in DTYPES.items() if v == dtype),
        target_modules=[_exact(m) for m in ranks],
        rank_pattern={_exact(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={_exact(m): float(k) for m, k in ranks.items() if k != r},
        group_shared_input=first.group_shared_input,
        dropout_masks=first.dropout_masks,
    )


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


@contextmanager
def _base_model(model: nn.Module) -> Iterator[None]:
    """The base model for a while: every layer off, trained-in-full parameters at their
    recorded base values (checked beforehand); everything back afterwards."""
    live = lora_state_dict(model)
    bank = adapter_bank(model)
    extras = {n: live[n] for n in _extras(live)}
    saved = {n: t.clone() for n, t in extras.items()}
    try:
        with torch.no_grad():
            for key, target in extras.items():
                target.copy_(bank.base_values[key])
        set_adapters_disabled(model, True)
        yield
    finally:
        set_adapters_disabled(model, False)
        with torch.no_grad():
            for key, target in extras.items():
                target.copy_(saved[key])


def _take(value: Any, index: torch.Tensor, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is ``batch`` cut to rows ``index``."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_take(v, index, batch) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    return value


def _join(parts: list[Any], sizes: list[int], order: torch.Tensor, where: str) -> Any:
    """Concatenate per-group outputs along dim 0 and put the rows back in input order
    (``order[j]`` is the input row of concatenated row ``j``)."""
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise LoRAStateError(f"mixed_batch_forward: {where} is None for some rows only")
        return None
    if isinstance(first, torch.Tensor):
        bad = [
            tuple(p.shape)
            for p, n in zip(parts, sizes, strict=True)
            if not isinstance(p, torch.Tensor) or p.dim() == 0 or p.shape[0] != n
        ]
        if bad:
            raise LoRAStateError(
                f"mixed_batch_forward: {where} has shape {bad[0]}, not one row per input row "
                "(a loss over the batch, say); call the model without labels and compute it "
                "from the joined outputs"
            )
        joined = torch.cat(parts, dim=0)
        return torch.empty_like(joined).index_copy_(0, order.to(joined.device), joined)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_join([p[i] for p in parts], sizes, order, f"{where}[{i}]") for i in range(len(first))))  # fmt: skip
    if isinstance(first, (tuple, list)):
        return type(first)(
            _join([p[i] for p in parts], sizes, order, f"{where}[{i}]") for i in range(len(first))
        )
    if isinstance(first, dict):
        joined = {k: _join([p[k] for p in parts], sizes, order, f"{where}[{k!r}]") for k in first}
        return type(first)(**joined) if type(first) is not dict else joined
    raise LoRAStateError(
        f"mixed_batch_forward: {where} is a {type(first).__name__}, which cannot be split into "
        "rows (a cache of past keys and values: pass use_cache=False)"
    )
