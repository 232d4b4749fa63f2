"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns faster than A.

Owns: which learning-rate class each trained tensor falls in (:func:`loraplus_kinds`), the
optimizer groups PEFT's ``create_loraplus_optimizer`` builds (:func:`loraplus_param_groups`),
and :func:`apply_loraplus`, which splits an optimizer someone else built, in place, and keeps
its learning-rate schedulers consistent. ``LoRAConfig.loraplus_lr_ratio`` turns it on in the
Lightning callback. Must not import: ``core.inject``, ``core.adapter``, Lightning.

The classes are PEFT's (``peft/optimizers/loraplus.py``), read from the model and never from
a name alone where PEFT reads a type::

    class        which trained tensors                               lr            weight decay
    a            everything else (lora_A, 2-D modules_to_save)       lr            the group's
    embedding    both matrices of an adapted nn.Embedding            lr_embedding  the group's
    b            lora_B, and 1-D tensors (DoRA magnitude, ...)       lr x ratio    the group's
    b_no_decay   class b tensors named ``*bias*`` or in a LayerNorm  lr x ratio    0
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lora_lightning.core.config import non_negative_number, positive_number
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.layers import EMBEDDING
from lora_lightning.core.state import adapted_layers

#: The classes, in the order PEFT lists its groups.
KINDS = ("a", "embedding", "b", "b_no_decay")
#: PEFT's default ``loraplus_lr_embedding``.
DEFAULT_LR_EMBEDDING = 1e-6
#: Per-group settings that are learning rates (scaled with the group's ``lr``); ``initial_lr``
#: is set by every torch scheduler, ``max_lr``/``min_lr`` by ``OneCycleLR``.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")

_APPLIED = "_lora_loraplus_applied"  # on an optimizer apply_loraplus has split
_SCHEDULERS = torch.optim.lr_scheduler
#: Schedulers whose per-group state is ``base_lrs``/``_last_lr`` (and lambdas): split with the
#: groups. Others (``CyclicLR``: its learning rates are the scheduler's, not the groups';
#: custom classes, whose state this module cannot know) are refused by name.
SUPPORTED_SCHEDULERS = (
    _SCHEDULERS.LambdaLR, _SCHEDULERS.MultiplicativeLR, _SCHEDULERS.StepLR,
    _SCHEDULERS.MultiStepLR, _SCHEDULERS.ConstantLR, _SCHEDULERS.LinearLR,
    _SCHEDULERS.ExponentialLR, _SCHEDULERS.PolynomialLR, _SCHEDULERS.CosineAnnealingLR,
    _SCHEDULERS.CosineAnnealingWarmRestarts, _SCHEDULERS.OneCycleLR,
    _SCHEDULERS.ReduceLROnPlateau, _SCHEDULERS.SequentialLR, _SCHEDULERS.ChainedScheduler,
)  # fmt: skip


def loraplus_kinds(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> LoRA+ class (see :data:`KINDS`) of every parameter of ``model``."""
    model = getattr(model, "_orig_mod", model)
    embedding = set()
    for _, module, layer in adapted_layers(model):
        if layer.kind == EMBEDDING:
            embedding |= {id(module.lora_A.weight), id(module.lora_B.weight)}
    kinds: dict[int, str] = {}
    for name, param, in_layer_norm in _named_parameters(model):
        if id(param) in kinds:
            continue
        if id(param) in embedding:
            kinds[id(param)] = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            # PEFT's decay rule: transformers' get_parameter_names(model, [LayerNorm]) minus
            # every name with "bias" in it.
            kinds[id(param)] = "b_no_decay" if in_layer_norm or "bias" in name else "b"
        else:
            kinds[id(param)] = "a"
    return kinds


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    *,
    weight_decay: float = 0.0,
    lr_embedding: float = DEFAULT_LR_EMBEDDING,
) -> list[dict[str, Any]]:
    """The four parameter groups of PEFT's ``create_loraplus_optimizer`` for the trainable
    parameters of ``model`` (groups may be empty): pass them to any optimizer class.

    Args:
        lr: the learning rate of A (and of ``modules_to_save`` matrices).
        ratio: ``lr_B / lr_A`` (> 0; the paper uses 2 to 16).
        weight_decay: PEFT's ``loraplus_weight_decay``: every group's but ``b_no_decay`` (0).
        lr_embedding: the learning rate of embedding adapters (absolute, PEFT's 1e-6).

    Raises:
        LoRAConfigError: if ``lr``, ``ratio`` or ``lr_embedding`` is not a finite number > 0,
            or ``weight_decay`` not a finite number >= 0.
    """
    lr, ratio, lr_embedding = _check_rates(ratio, lr_embedding, lr=lr)
    weight_decay = non_negative_number("LoRA+ weight_decay", weight_decay)
    kinds = loraplus_kinds(model)
    params: dict[str, list[nn.Parameter]] = {kind: [] for kind in KINDS}
    for param in getattr(model, "_orig_mod", model).parameters():
        if param.requires_grad:
            params[kinds[id(param)]].append(param)
    rates = {"a": lr, "embedding": lr_embedding, "b": lr * ratio, "b_no_decay": lr * ratio}
    return [
        {
            "params": params[kind],
            "weight_decay": 0.0 if kind == "b_no_decay" else weight_decay,
            "lr": rates[kind],
        }
        for kind in KINDS
    ]


def apply_loraplus(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    ratio: float,
    *,
    lr_embedding: float = DEFAULT_LR_EMBEDDING,
    schedulers: Iterable[Any] = (),
) -> None:
    """Split every param group of ``optimizer`` into LoRA+ groups, in place.

    Each group becomes up to four (its class ``a`` tensors stay first, then ``embedding``,
    ``b``, ``b_no_decay``; classes with no tensor are left out; an empty group stays). A new
    group copies the group's settings, with every learning rate (``lr``, ``initial_lr``,
    ``max_lr``, ``min_lr``) scaled by ``ratio`` for B, to ``lr_embedding`` (times the
    scheduler's current factor) for embedding adapters, and ``weight_decay`` 0 for
    ``b_no_decay``. On one group of an optimizer built from ``model``'s trainable parameters
    this gives PEFT's groups. Call it before the optimizer steps (its state is per tensor and
    is kept).

    ``schedulers`` built on ``optimizer`` already are split the same way (``base_lrs``,
    ``_last_lr``, per-group lambdas and ``min_lrs``), so they go on as if built after.

    Raises:
        LoRAConfigError: a ``ratio``/``lr_embedding`` that is not a finite number > 0 (the
            check ``LoRAConfig.loraplus_lr_ratio`` gets); a scheduler of a type not in
            :data:`SUPPORTED_SCHEDULERS` (nothing is changed then); a group with learning
            rate 0 holding embedding adapters.
        LoRAStateError: ``optimizer`` was split already (B would get ``ratio²``).
    """
    ratio, lr_embedding = _check_rates(ratio, lr_embedding)
    if optimizer.__dict__.get(_APPLIED):
        raise LoRAStateError(
            f"apply_loraplus: {type(optimizer).__name__} was split into LoRA+ groups already; "
            "splitting again would scale B's learning rate twice. Build a new optimizer (in "
            "configure_optimizers: return a new one each call)"
        )
    schedulers = [s for s in _flatten(schedulers) if getattr(s, "optimizer", None) is optimizer]
    unsupported = [s for s in _flatten(schedulers) if type(s) not in SUPPORTED_SCHEDULERS]
    if unsupported:
        raise LoRAConfigError(
            f"LoRA+ (loraplus_lr_ratio={ratio:g}) cannot split the param groups under "
            f"scheduler {type(unsupported[0]).__name__}: its per-group state is not known "
            f"here. Supported: {', '.join(s.__name__ for s in SUPPORTED_SCHEDULERS)}; or build "
            "the optimizer from lora_lightning.loraplus_param_groups(model, lr, ratio) and "
            "set loraplus_lr_ratio to null"
        )
    kinds = loraplus_kinds(model)
    groups: list[dict[str, Any]] = []
    origin: list[tuple[int, float]] = []  # per new group: (old group index, lr factor)
    for index, group in enumerate(optimizer.param_groups):
        split = _split_group(group, kinds, ratio, lr_embedding)
        groups += [new for new, _ in split]
        origin += [(index, factor) for _, factor in split]
    optimizer.param_groups[:] = groups
    optimizer.__dict__[_APPLIED] = True
    for scheduler in schedulers:
        _split_scheduler(scheduler, origin)


def _split_group(
    group: dict[str, Any], kinds: dict[int, str], ratio: float, lr_embedding: float
) -> list[tuple[dict[str, Any], float]]:
    by_kind: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for param in group["params"]:
        by_kind[kinds.get(id(param), "a")].append(param)
    present = [kind for kind in KINDS if by_kind[kind]]
    if not present:
        return [(group, 1.0)]
    split = []
    for kind in present:
        factor = _factor(group, kind, ratio, lr_embedding)
        new = {key: value for key, value in group.items() if key != "params"}
        new["params"] = by_kind[kind]
        for key in LR_KEYS:
            if isinstance(new.get(key), (int, float, torch.Tensor)) and key in new:
                new[key] = new[key] * factor
        if kind == "b_no_decay" and "weight_decay" in new:
            new["weight_decay"] = 0.0
        split.append((new, factor))
    return split


def _factor(group: dict[str, Any], kind: str, ratio: float, lr_embedding: float) -> float:
    if kind in ("b", "b_no_decay"):
        return ratio
    if kind == "a":
        return 1.0
    base = group.get("initial_lr", group["lr"])  # the unscheduled learning rate
    if not base:
        raise LoRAConfigError(
            "LoRA+ cannot give embedding adapters loraplus_lr_embedding in a param group whose "
            "learning rate is 0; put them in a group with a learning rate > 0"
        )
    return lr_embedding / float(base)


def _split_scheduler(scheduler: Any, origin: list[tuple[int, float]]) -> None:
    """Make ``scheduler``'s per-group lists follow the new groups (children first)."""
    for child in getattr(scheduler, "_schedulers", []):
        _split_scheduler(child, origin)
    for key in ("base_lrs", "_last_lr"):  # learning rates: scaled
        values = getattr(scheduler, key, None)
        if isinstance(values, list):
            setattr(scheduler, key, [values[i] * f for i, f in origin])
    for key in ("lr_lambdas", "min_lrs"):  # per-group settings: copied
        values = getattr(scheduler, key, None)
        if isinstance(values, list):
            setattr(scheduler, key, [values[i] for i, _ in origin])


def _flatten(schedulers: Iterable[Any]) -> list[Any]:
    found = []
    for scheduler in schedulers:
        found.append(scheduler)
        found += _flatten(getattr(scheduler, "_schedulers", []))
    return found


def _named_parameters(model: nn.Module, prefix: str = "", in_norm: bool = False):
    """``(name, parameter, inside a LayerNorm)`` for every parameter, children first as
    transformers' ``get_parameter_names`` walks them."""
    for name, child in model.named_children():
        yield from _named_parameters(
            child, f"{prefix}{name}.", in_norm or isinstance(child, nn.LayerNorm)
        )
    for name, param in model._parameters.items():
        if param is not None:
            yield prefix + name, param, in_norm


def _check_rates(ratio: Any, lr_embedding: Any, **others: Any) -> tuple[float, ...]:
    """The rates as floats, each checked by the one validator ``LoRAConfig`` uses too:
    ``(*others.values(), ratio, lr_embedding)``."""
    rates = {**others, "loraplus_lr_ratio": ratio, "loraplus_lr_embedding": lr_embedding}
    return tuple(positive_number(f"LoRA+ {name}", value) for name, value in rates.items())
