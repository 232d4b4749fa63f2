"""`inject_lora`: apply a checked plan to a model, all or nothing.

Owns: :func:`inject_lora` (plan with ``core.plan``, then apply) and :func:`apply_plan`, which
attaches every planned adapter (and its variant's tensors, ``core.variants``: DoRA's
magnitude; a PiSSA/OLoRA init rewrites the base weight; ``quantize_base`` stores the base weight quantized, see ``core.quantize``,
and with ``quantize_scope=all_linear`` that of the plan's other frozen Linears too),
groups shared inputs, places the marks and freezes what should not train. If anything fails
while applying, every change is rolled back: the model keeps its parameters (the same
objects, base weight values bit for bit), hooks, ``requires_grad`` flags and attributes
exactly. Must not import: ``core.adapter``, ``core.merge``, Lightning, Hydra.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_lightning.core import quantize, variants
from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.fusion import group_shared_inputs
from lora_lightning.core.inits import PrepareRequest, find_init
from lora_lightning.core.layers import MATMUL_KINDS, attach, detach, layer_kind
from lora_lightning.core.plan import LoRAPlan, TargetFn, plan_lora
from lora_lightning.core.state import (
    AdapterSet,
    clear_marks,
    layer_state,
    mark_only_lora_as_trainable,
    mark_quantized,
    mark_root,
    mark_saved,
    mark_trained_bias,
)

#: ``forward(model, batch)``: how a data-dependent init runs the model on one batch.
Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (a tokenizer's output: PEFT's default), else
    ``model(batch)``; an ``(inputs, labels)`` pair needs its own ``forward``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


@dataclass(frozen=True)
class PreparedPlan:
    """A plan whose data-dependent init has seen its batches (:func:`prepare_lora`): apply it
    with ``apply_plan(model, prepared.plan, prepared.values)``. ``plan.config`` holds the ranks
    and alphas the init chose (exact-name ``rank_pattern``/``alpha_pattern`` entries); ``values``
    maps each target to what the init function reads for it."""

    plan: LoRAPlan
    values: dict[str, Any]


def prepare_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    batches: Iterable[Any] = (),
    *,
    forward: Forward | None = None,
    target_fn: TargetFn | None = None,
) -> PreparedPlan:
    """The first of the two steps of a data-dependent init (EVA, LoRA-GA): plan, run the base
    model on ``batches`` (the init's ``prepare`` decides how: EVA in eval mode without
    gradients, LoRA-GA in train mode with a backward pass per batch), and plan again with the
    ranks it chose. The model's parameters and flags are as before afterwards (LoRA-GA leaves
    no gradient behind). For any other init this is ``plan_lora`` (``values`` empty;
    ``batches`` are not run).

    Args:
        batches: the batches to learn from (moved to nothing: they must sit on the model's
            device already). Every process must pass the same values (or gather its own:
            ``LoRACallback`` broadcasts rank zero's result).
        forward: ``forward(model, batch)``; default :func:`default_forward`.

    Raises:
        LoRAConfigError: as ``plan_lora``; no batches for an init that needs them.
        UnsupportedModuleError, LoRAStateError: as ``plan_lora``.
    """
    config = (config if config is not None else LoRAConfig()).validate()
    plan = plan_lora(model, config, target_fn=target_fn)
    entry = find_init(config.init)
    if entry.prepare is None or plan.already_applied:
        return PreparedPlan(plan, {})
    batches = list(batches)
    if not batches:
        raise LoRAConfigError(
            f"lora.init={config.init!r} initialises the adapters from the model's activations "
            "on real batches, and none were given: pass batches (prepare_lora(model, config, "
            "batches) or inject_lora(model, config, batches=...)), or train with LoRACallback, "
            "which feeds it the first training batches"
        )
    root = getattr(model, "_orig_mod", model)
    modules = dict(root.named_modules())
    run = forward or default_forward
    request = PrepareRequest(
        targets=tuple((t.name, modules[t.name], t.r) for t in plan.targets),
        batches=batches,
        run=lambda batch: run(model, batch),
        config=config,
        model=root,
    )
    prepared = entry.prepare(request)
    resolved = dataclasses.replace(
        config,
        rank_pattern={**{_exact(n): r for n, r in prepared.ranks.items()}, **config.rank_pattern},
        alpha_pattern={
            **{_exact(n): a for n, a in prepared.alphas.items()},
            **config.alpha_pattern,
        },
    )
    plan = plan_lora(model, resolved, target_fn=target_fn)
    return PreparedPlan(plan, {t.name: prepared.values[t.name] for t in plan.targets})


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def inject_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    *,
    target_fn: TargetFn | None = None,
    batches: Iterable[Any] | None = None,
    forward: Forward | None = None,
) -> list[str]:
    """Add LoRA adapters to ``model`` in place and freeze everything that should not train.

    Targets are the modules matched by ``config.target_modules`` (a plain name such as
    ``q_proj`` matches as a name suffix, as in PEFT; anything else is a full-match regex), or
    for which ``target_fn(name, module)`` is true, minus ``exclude_modules`` and modules whose
    ``rank_pattern`` rank is 0. After injection only the adapter matrices, the
    ``modules_to_save`` and the biases selected by ``config.bias`` require grad.

    Everything is checked before the model is changed (see :func:`lora_lightning.core.plan.
    plan_lora`); on any error the model is exactly as before. Idempotent: calling it again
    with an equal config adds nothing and returns the same names. On a ``meta``-device model
    no memory is allocated and nothing is initialised.

    A data-dependent init (``init="eva"``) needs ``batches`` (and optionally ``forward``):
    both steps of :func:`prepare_lora` and :func:`apply_plan` run here. The config the model
    then holds (``config_of(model)``) carries the ranks it chose.

    Returns:
        The qualified names of the adapted modules, in model order.

    Raises:
        LoRAConfigError: invalid config values, or an entry of ``target_modules`` /
            ``modules_to_save`` that matches no module (the message lists close names).
        UnsupportedModuleError: if a target is not a supported layer type.
        LoRAStateError: if the model already holds adapters from a different config.
    """
    prepared = prepare_lora(model, config, batches or (), forward=forward, target_fn=target_fn)
    return apply_plan(model, prepared.plan, prepared.values)


def apply_plan(
    model: nn.Module,
    plan: LoRAPlan,
    init_values: Mapping[str, Any] | None = None,
    *,
    values_follow: bool = False,
) -> list[str]:
    """Apply a plan made by ``plan_lora`` (or ``prepare_lora``) for this model; all or nothing.

    Args:
        init_values: target name -> what a data-dependent init's ``prepare`` found for it
            (``PreparedPlan.values``); needed for such an init, ignored for the others.
        values_follow: the caller copies every adapter value right after (loading an adapter
            file): a data-dependent init then needs no ``init_values``, its layers are built
            with kaiming values that are overwritten at once.

    Raises:
        LoRAConfigError: a data-dependent init without ``init_values`` for every target.
        LoRAStateError: if the model changed since the plan was made (a target is gone,
            another module now sits there, or it is adapted already; a frozen Linear the plan
            stores quantized is gone, replaced, or quantized already).
    """
    model = getattr(model, "_orig_mod", model)
    if plan.already_applied:
        mark_only_lora_as_trainable(model)
        return plan.names
    modules = dict(model.named_modules())
    stale = [t.name for t in plan.targets if t.name not in modules or layer_state(modules[t.name])]
    stale += [
        n
        for n, _ in plan.quantized_frozen
        if n not in modules
        or quantize.unsupported_reason(
            modules[n], layer_kind(modules[n]), plan.config.quantize_base
        )
    ]
    if stale:
        raise LoRAStateError(
            f"the plan no longer fits the model: {stale[:5]} are missing, already adapted or "
            "already quantized; "
            "make a new plan with plan_lora(model, config)"
        )
    entry = find_init(plan.config.init)
    values = dict(init_values or {})
    missing = [t.name for t in plan.targets if t.name not in values and not t.on_meta]
    if entry.prepare is not None and missing and not values_follow:
        raise LoRAConfigError(
            f"apply_plan: lora.init={plan.config.init!r} needs the values its prepare step "
            f"found for every target, and {missing[:4]} have none; make the plan with "
            "prepare_lora(model, config, batches) and pass its values"
        )
    owner = AdapterSet(plan.config)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    # PiSSA/OLoRA rewrite the base weight: keep the original bits for a rollback.
    originals = {
        t.name: modules[t.name].weight.detach().clone() for t in plan.targets if t.base_init
    }
    attached: list[nn.Module] = []
    floats: dict[str, nn.Parameter] = {}  # quantized layers' float weights, for a rollback
    ddp_ignore = quantize.ddp_ignore_state(model)
    try:
        for target in plan.targets:
            module = modules[target.name]
            layer = attach(module, target.name, kind=target.kind, r=target.r,
                           alpha=target.alpha, scaling=target.scaling, dtype=target.dtype,
                           owner=owner, prepared=values.get(target.name))  # fmt: skip
            if target.variant is not None:
                variants.variant_named(target.variant).attach(module, layer, target.dtype)
            attached.append(module)
        for target in plan.targets:
            if target.quantize:
                floats[target.name] = quantize.quantize_layer(modules[target.name], target.quantize)
        for name, scheme in plan.quantized_frozen:  # quantize_scope=all_linear
            floats[name] = quantize.quantize_layer(modules[name], scheme)
            mark_quantized(modules[name], owner)
        if floats:
            quantize.update_ddp_ignore(model)
        if plan.config.group_shared_input:
            group_shared_inputs(
                model, [(t.name, modules[t.name]) for t in plan.targets], MATMUL_KINDS
            )
        for name in plan.modules_to_save:
            mark_saved(modules[name], owner)
        for name in plan.trained_biases:
            mark_trained_bias(modules[name], owner)
        mark_root(model, owner)
        mark_only_lora_as_trainable(model)
    except BaseException:
        for module in attached:
            if layer_state(module) is not None:
                detach(module)
        clear_marks(model)
        for name, weight in floats.items():
            quantize.restore_layer(modules[name], weight)
        quantize.restore_ddp_ignore(model, ddp_ignore)
        with torch.no_grad():
            for name, weight in originals.items():
                modules[name].weight.copy_(weight)
        for param in model.parameters():
            if id(param) in flags:
                param.requires_grad_(flags[id(param)])
        raise
    return plan.names
