"""Mixed batches: each row of one batch computed by its own named adapter (or the base).

Owns: :func:`mixed_batch_forward` (PEFT's ``model(..., adapter_names=[...])``): rows grouped by
adapter, each group run with its adapter active (``core.switch``) or with every layer off
(``"__base__"``), the outputs put back in row order. Must not import: ``core.hotswap``,
``core.combine``, Lightning, Hydra, transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lora_lightning.core.bank import (
    BASE,
    DEFAULT,
    active_adapter,
    list_adapters,
    trained_in_full,
    uncompiled,
)
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.state import (
    AdapterBank,
    adapter_bank,
    is_merged,
    lora_state_dict,
    owner_of,
    set_adapters_disabled,
)
from lora_lightning.core.switch import base_restores, check_switchable, set_active_adapter


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
    root = uncompiled(model)
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
        check_switchable(root, "mixed_batch_forward (rows of other adapters or '__base__')")
    if BASE in names and owner_of(root) is not None:
        live = lora_state_dict(root)
        bank = adapter_bank(root) or AdapterBank(active=DEFAULT, order=[DEFAULT])
        base_restores(bank, live, {}, "mixed_batch_forward('__base__' rows)")
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


@contextmanager
def _base_model(model: nn.Module) -> Iterator[None]:
    """The base model for a while: every layer off, trained-in-full parameters at their
    recorded base values (checked beforehand); everything back afterwards."""
    live = lora_state_dict(model)
    bank = adapter_bank(model)
    extras = {n: live[n] for n in trained_in_full(live)}
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
