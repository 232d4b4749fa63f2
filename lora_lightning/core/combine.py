"""Combining named adapters into a new one: PEFT's ``add_weighted_adapter``.

Owns: :func:`combine_adapters` (``cat``: the exact weighted sum of the deltas; ``linear``:
PEFT's linear combination) and what it refuses because the result would not be exact: every
variant (``core.variants``: DoRA today), adapters that train ``modules_to_save``/biases,
unconverted PiSSA/OLoRA adapters. Must not import: ``core.hotswap``, ``core.mixed``,
Lightning, Hydra, transformers.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter

import torch
from torch import nn

from lora_lightning.core import variants
from lora_lightning.core.bank import (
    A_KEY,
    B_KEY,
    active_adapter,
    bank_or_default,
    check_known,
    check_new_name,
    check_plan_fits,
    model_device,
    trained_in_full,
    uncompiled,
)
from lora_lightning.core.config import DTYPES, LoRAConfig
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.plan import plan_lora
from lora_lightning.core.state import (
    StoredAdapter,
    adapter_bank,
    config_of,
    lora_state_dict,
    set_adapter_bank,
)

#: ``combine_adapters`` combinations.
COMBINATIONS = ("cat", "linear")


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
    model = uncompiled(model)
    if combination not in COMBINATIONS:
        raise LoRAConfigError(
            f"combine_adapters: combination={combination!r} is not known; expected one of "
            f"{list(COMBINATIONS)}"
        )
    check_new_name(model, name, "combine_adapters")
    if not isinstance(weights, dict) or not weights:
        raise LoRAConfigError(
            "combine_adapters: weights must be a non-empty dict {adapter name: weight}, got "
            f"{weights!r}"
        )
    sources = {}
    for source, weight in weights.items():
        check_known(model, source, "combine_adapters")
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
    check_plan_fits(plan, model, tensors, f"combine_adapters({name!r})")
    device = model_device(model)
    bank = bank_or_default(model)
    bank.add(name, StoredAdapter(config, {n: t.to(device) for n, t in tensors.items()}))
    set_adapter_bank(model, bank)
    return plan.names


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
        if extras := trained_in_full(adapter.tensors):
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
                if key.endswith(A_KEY):
                    ranks.setdefault(key[: -len(A_KEY)], set()).add(tensor.shape[0])
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
            if key.endswith(A_KEY):
                layer = key[: -len(A_KEY)]
                r, alpha = config.rank_for(layer), config.alpha_for(layer)
                # PEFT's order of operations: (A * weight) * scaling, weight * scaling.
                b = adapter.tensors[layer + B_KEY]
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
        tensors[layer + A_KEY], tensors[layer + B_KEY] = a.contiguous(), b.contiguous()
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
