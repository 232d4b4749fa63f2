"""Many adapters on one base: the named adapters themselves (load by name, list, active,
delete) and the checks every multi-adapter operation shares.

Owns: :func:`load_named_adapter` (``load_adapter(model, dir, name=...)``), :func:`list_adapters`,
:func:`active_adapter`, :func:`delete_adapter`. The operations on named adapters live one per
module: ``core.switch`` (:func:`~lora_lightning.core.switch.set_active_adapter`),
``core.hotswap``, ``core.combine``, ``core.mixed``; they share this module's helpers. The bank
itself (:class:`~lora_lightning.core.state.AdapterBank`) is a piece of ``core.state``; only
these five modules use it. Must not import: the four operation modules, Lightning, Hydra,
transformers.

Design: the ACTIVE adapter lives in the layers, exactly as a single adapter does (its
``lora_A``/``lora_B``/variant parameters, hooks and marks), so the single-adapter fast path
is untouched; the others wait in the bank as a config and detached tensors::

    model ─ layers: lora_A, lora_B, hooks, marks ── the active adapter ("a")
      └─ (root) bank: active="a", stored={"b": (config, tensors), ...},
                      base_values={"classifier.weight": <the base's own values>, ...}

Every operation checks everything first; on an error the model is as before.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lora_lightning.core import variants
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.loading import install_adapter, read_adapter
from lora_lightning.core.plan import LoRAPlan
from lora_lightning.core.state import (
    AdapterBank,
    StoredAdapter,
    adapter_bank,
    lora_state_dict,
    owner_of,
    set_adapter_bank,
)

#: The name an adapter injected or loaded without a name gets.
DEFAULT = "default"
#: Reserved row name in :func:`~lora_lightning.core.mixed.mixed_batch_forward`: the base model,
#: no adapter (PEFT's name); no adapter may take it.
BASE = "__base__"
#: Key suffixes of a Linear-style adapter's two matrices.
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


# ------------------------------------------------------------------------------------ queries
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added (active included);
    ``["default"]`` for a model adapted without names, ``[]`` for a plain model."""
    model = uncompiled(model)
    bank = adapter_bank(model)
    if bank is not None:
        return list(bank.order)
    return [DEFAULT] if owner_of(model) is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in the layers (``"default"`` without names), None if none."""
    model = uncompiled(model)
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
    model = uncompiled(model)
    check_new_name(model, name, "load_adapter")
    params = dict(model.named_parameters(remove_duplicate=False))
    if owner_of(model) is None:
        checked = read_adapter(model, directory)
        base = {n: params[n].detach().clone() for n in trained_in_full(checked.tensors)}
        install_adapter(model, checked.plan, checked.tensors)
        bank = AdapterBank(active=name, order=[name])
        bank.remember_base(base)
        set_adapter_bank(model, bank)
        return checked.plan.names
    checked = read_adapter(model, directory, alongside=True)
    live = lora_state_dict(model)
    bank = bank_or_default(model)
    # A parameter the active adapter does not train holds the base's values now.
    bank.remember_base(
        {n: params[n].detach().clone() for n in trained_in_full(checked.tensors) if n not in live}
    )
    device = model_device(model)
    tensors = {n: t.detach().to(device, copy=True) for n, t in checked.tensors.items()}
    bank.add(name, StoredAdapter(checked.config, tensors))
    set_adapter_bank(model, bank)
    return checked.plan.names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the inactive adapter ``name`` from the bank.

    Raises:
        LoRAStateError: an unknown name, or the active adapter (set another one active first
            with :func:`set_active_adapter`, or remove every adapter with ``unload_lora``).
    """
    model = uncompiled(model)
    check_known(model, name, "delete_adapter")
    if name == active_adapter(model):
        others = [n for n in list_adapters(model) if n != name]
        raise LoRAStateError(
            f"delete_adapter: {name!r} is the active adapter; make another one active first "
            f"(set_active_adapter(model, name) with one of {others}), or call "
            "unload_lora(model) to remove every adapter"
        )
    adapter_bank(model).remove(name)


# ------------------------------------------------------------- shared by the operations
def uncompiled(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper holds (the bank and marks are on it), else
    ``model``."""
    return getattr(model, "_orig_mod", model)


def bank_or_default(model: nn.Module) -> AdapterBank:
    """The model's bank, or a new one whose active adapter is the unnamed ``default``."""
    return adapter_bank(model) or AdapterBank(active=DEFAULT, order=[DEFAULT])


def model_device(model: nn.Module) -> torch.device:
    """Where stored adapter tensors go: the device of the model's first parameter."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def trained_in_full(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not adapters: ``modules_to_save`` parameters, biases."""
    return [n for n in tensors if not variants.is_adapter_tensor(n)]


def check_new_name(model: nn.Module, name: Any, what: str) -> None:
    """Refuse ``name`` for a new adapter (``what``: the operation, starting the message).

    Raises:
        LoRAConfigError: not a non-empty string, or the reserved :data:`BASE`.
        LoRAStateError: the model holds an adapter of that name already.
    """
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


def check_known(model: nn.Module, name: Any, what: str) -> None:
    """Refuse a name the model holds no adapter of.

    Raises:
        LoRAStateError: naming ``what`` and the adapters the model holds.
    """
    names = list_adapters(model)
    if name not in names:
        hint = (
            "; load one with load_adapter(model, directory, name=...)"
            if not names
            else f"; the model holds {names}"
        )
        raise LoRAStateError(f"{what}: no adapter named {name!r}{hint}")


def check_plan_fits(
    plan: LoRAPlan, model: nn.Module, tensors: dict[str, torch.Tensor], what: str
) -> None:
    """Check that a stored adapter's ``tensors`` are exactly what ``plan`` installs.

    Raises:
        LoRAStateError: a tensor missing, extra, or of another shape or dtype (the model
            changed after the adapter was stored).
    """
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
