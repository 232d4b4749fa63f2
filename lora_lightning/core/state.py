"""The LoRA state of a model: the one owner of every mark LoRA puts on modules.

Owns: the marks (plain ``__dict__`` attributes, so they add no state-dict keys) and every query
about them: which layers are adapted and with what rank/alpha/scaling (:class:`LoRALayer`),
the config the model was adapted with (:class:`AdapterSet`, stored once and referenced by every
mark of one injection), which modules train in full, which biases train, what is trainable,
and the parameter counts and state dicts that follow, plus the bank of named adapters
(:class:`AdapterBank` on the root: the active name, the inactive adapters, the base's own values
of what they train in full; used by ``core.bank`` and its operation modules only, cleared with
the marks). No other module reads or writes a mark.
Must not import: ``core.layers``/``core.inject`` (they build on this), Lightning, Hydra.

::

    model ─┬─ encoder.layer.0.attention.self.query   mark: LoRALayer(r, alpha, scaling, ─┐
           ├─ encoder.layer.0.attention.self.key     mark: LoRALayer(...)  ───────────────┤
           ├─ encoder.layer.0.output.dense           mark: quantized (all_linear) ────────┤
           ├─ classifier                             mark: saved ─────────────────────────┤
           └─ (root)                                 mark: root ──────────────────────────┤
                                                                 AdapterSet(config) <─────┘
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.errors import LoRAStateError

_LAYER = "_lora_layer"  # on an adapted layer: its LoRALayer
_SAVED = "_lora_saved"  # on a module trained in full: the AdapterSet
_BIAS = "_lora_bias"  # on an adapted layer whose bias trains (bias="lora_only"): the AdapterSet
_ROOT = "_lora_root"  # on the module inject_lora was called on: the AdapterSet
_BANK = "_lora_bank"  # on the root of a model holding named adapters: its AdapterBank
# On a frozen, not adapted layer whose base weight the injection stored quantized
# (quantize_scope=all_linear): the AdapterSet.
_QUANTIZED = "_lora_quantized"
_MARKS = (_LAYER, _SAVED, _BIAS, _ROOT, _QUANTIZED)

#: Names of LoRA's own child modules, never targets themselves.
LORA_PARTS = ("lora_A", "lora_B")


@dataclass(eq=False)
class AdapterSet:
    """One injection: the config it used. Every mark it placed refers to this one object."""

    config: LoRAConfig


@dataclass(eq=False)
class LoRALayer:
    """Runtime state of one adapted layer (kept in the layer's ``__dict__``).

    ``r``, ``alpha`` and ``scaling`` are this layer's values from the plan; the dropout
    probability and mask generator are the owning :class:`AdapterSet`'s config's (held once).
    """

    kind: str
    r: int
    alpha: float
    scaling: float
    owner: AdapterSet
    merged: bool = False
    handle: Any = None  # the forward hook's RemovableHandle
    group: Any = None  # a core.fusion.SharedInput when siblings share one A product
    # A layer variant (core.variants; DoRA's core.dora.DoRA) owning forward and merge and
    # naming the tensors it added (``variant.tensors``); None: plain LoRA.
    variant: Any = None
    # (A0, B0) of an init that changed the base weight to W - s·B0 A0 (PiSSA, OLoRA): what
    # conversion to plain LoRA and unload subtract/restore. None for every other init.
    initial: Any = None
    # True while core.mixed runs the base model (a mixed batch's "__base__" rows): the
    # forward hook then adds nothing.
    disabled: bool = False

    @property
    def dropout(self) -> float:
        """The configured dropout probability (applied only while the layer trains)."""
        return self.owner.config.dropout


def active_dropout(module: nn.Module, layer: LoRALayer) -> float:
    """The LoRA dropout probability ``module`` applies now: the config's in train mode, else 0."""
    return layer.dropout if module.training else 0.0


@dataclass(eq=False)
class StoredAdapter:
    """An inactive named adapter: its config and its tensors, keyed as :func:`lora_state_dict`
    would key them once installed (adapters, ``modules_to_save`` parameters, trained biases)."""

    config: LoRAConfig
    tensors: dict[str, torch.Tensor]


@dataclass(eq=False)
class AdapterBank:
    """The named adapters of one model (used by ``core.bank`` and its operation modules only).

    The active adapter lives in the layers (its values are the model's ``lora_A``/``lora_B``
    parameters, its config the :class:`AdapterSet`'s); ``stored`` holds the inactive ones.
    ``base_values`` keeps the base model's own values of every parameter some adapter trains
    in full (``modules_to_save``, biases), recorded before an adapter first replaced them, so
    switching to an adapter that does not train them can put them back.
    """

    active: str
    order: list[str]  # every name, active included, in the order they were added
    stored: dict[str, StoredAdapter] = field(default_factory=dict)
    base_values: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, adapter: StoredAdapter) -> None:
        """Store ``adapter`` (inactive) under a new ``name``."""
        self.stored[name] = adapter
        self.order.append(name)

    def remove(self, name: str) -> None:
        """Forget the inactive adapter ``name``."""
        del self.stored[name]
        self.order.remove(name)

    def activate(self, name: str, outgoing: StoredAdapter) -> None:
        """Record that ``name`` is now in the layers and ``outgoing`` (the adapter that was)
        waits in the bank under the previous active name."""
        self.stored[self.active] = outgoing
        del self.stored[name]
        self.active = name

    def remember_base(self, values: dict[str, torch.Tensor]) -> None:
        """Record base values of parameters not recorded yet (the first record wins)."""
        for name, value in values.items():
            self.base_values.setdefault(name, value)


# ------------------------------------------------------------------------------ writing marks
def set_layer(module: nn.Module, layer: LoRALayer) -> None:
    module.__dict__[_LAYER] = layer


def mark_saved(module: nn.Module, owner: AdapterSet) -> None:
    module.__dict__[_SAVED] = owner


def mark_trained_bias(module: nn.Module, owner: AdapterSet) -> None:
    module.__dict__[_BIAS] = owner


def mark_root(module: nn.Module, owner: AdapterSet) -> None:
    module.__dict__[_ROOT] = owner


def mark_quantized(module: nn.Module, owner: AdapterSet) -> None:
    """Record that ``owner``'s injection stored the frozen base weight of ``module`` (a layer
    it does not adapt; ``quantize_scope=all_linear``) quantized, for ``unload_lora``."""
    module.__dict__[_QUANTIZED] = owner


def pop_layer(module: nn.Module) -> LoRALayer:
    """Remove and return the layer mark of ``module``."""
    return module.__dict__.pop(_LAYER)


def clear_marks(model: nn.Module) -> None:
    """Remove every LoRA mark in ``model`` (its layers must be detached already), the adapter
    bank included: a model without adapters holds no named ones either."""
    for module in model.modules():
        for mark in (*_MARKS, _BANK):
            module.__dict__.pop(mark, None)


def set_adapter_bank(model: nn.Module, bank: AdapterBank | None) -> None:
    """Place (or with None remove) the named-adapter bank of ``model``."""
    if bank is None:
        model.__dict__.pop(_BANK, None)
    else:
        model.__dict__[_BANK] = bank


def rebind_config(model: nn.Module, config: LoRAConfig) -> None:
    """Make ``config`` the config of ``model``'s one injection (every mark sees it at once).
    For ``core.switch``'s in-place switch, whose adapters have the same layers, ranks and
    scalings."""
    owner = owner_of(model)
    if owner is None:
        raise LoRAStateError("rebind_config: the model holds no adapters")
    owner.config = config


def set_adapters_disabled(model: nn.Module, disabled: bool) -> None:
    """Switch every adapted layer of ``model`` off (its forward adds nothing) or on again."""
    for _, _, layer in adapted_layers(model):
        layer.disabled = disabled


# ------------------------------------------------------------------------------------ queries
def layer_state(module: nn.Module) -> LoRALayer | None:
    """The :class:`LoRALayer` of ``module``, or None if it is not adapted."""
    return module.__dict__.get(_LAYER)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRALayer]]:
    """Yield ``(name, module, layer)`` for every adapted layer, in model order."""
    for name, module in model.named_modules():
        layer = module.__dict__.get(_LAYER)
        if layer is not None:
            yield name, module, layer


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module in ``modules_to_save``."""
    for name, module in model.named_modules():
        if module.__dict__.get(_SAVED) is not None:
            yield name, module


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every frozen layer the injection stored quantized without
    adapting it (``quantize_scope=all_linear``); adapted layers are not included."""
    for name, module in model.named_modules():
        if module.__dict__.get(_QUANTIZED) is not None:
            yield name, module


def adapter_sets(model: nn.Module) -> list[AdapterSet]:
    """The distinct injections whose marks are in ``model`` (normally zero or one)."""
    found: dict[int, AdapterSet] = {}
    for module in model.modules():
        for mark in _MARKS:
            value = module.__dict__.get(mark)
            if value is not None:
                owner = value.owner if isinstance(value, LoRALayer) else value
                found.setdefault(id(owner), owner)
    return list(found.values())


def owner_of(model: nn.Module) -> AdapterSet | None:
    """The one injection in ``model``, or None.

    Raises:
        LoRAStateError: if parts of the model were adapted by different injections.
    """
    owners = adapter_sets(model)
    if len(owners) > 1:
        raise LoRAStateError(
            f"the model holds adapters from {len(owners)} separate inject_lora/load_adapter "
            "calls with different configs; call unload_lora(model) and inject once"
        )
    return owners[0] if owners else None


def adapter_bank(model: nn.Module) -> AdapterBank | None:
    """The named-adapter bank of ``model`` (see ``core.bank``), or None."""
    return model.__dict__.get(_BANK)


def config_of(model: nn.Module) -> LoRAConfig | None:
    """The config ``model`` (or any submodule of it) was adapted with, or None."""
    owner = owner_of(model)
    return owner.config if owner is not None else None


def is_merged(model: nn.Module) -> bool:
    """True if any adapted layer of ``model`` holds its adapter folded into the weight."""
    return any(layer.merged for _, _, layer in adapted_layers(model))


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor (tied weights, e.g. GPT-2's
    ``lm_head.weight`` and ``transformer.wte.weight``); empty lists for untied parameters."""
    params = list(model.named_parameters(remove_duplicate=False))
    by_tensor: dict[int, list[str]] = {}
    for name, param in params:
        by_tensor.setdefault(id(param), []).append(name)
    return {n: [o for o in by_tensor[id(p)] if o != n] for n, p in params}


def adapter_tensor_names(name: str, layer: LoRALayer) -> list[str]:
    """The qualified names of the adapter tensors of layer ``name``: its two matrices and
    whatever its variant added (the layer says, nothing matches names by string)."""
    prefix = f"{name}." if name else ""
    parts = [f"{part}.weight" for part in LORA_PARTS]
    parts += list(layer.variant.tensors) if layer.variant is not None else []
    return [prefix + part for part in parts]


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every adapter tensor in ``model`` (see :func:`adapter_tensor_names`),
    under every name a layer is held by (an aliased layer's tensors have several)."""
    names: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        layer = module.__dict__.get(_LAYER)
        if layer is not None:
            names.update(adapter_tensor_names(name, layer))
    return names


def trainable_names(model: nn.Module) -> list[str]:
    """Qualified names of the parameters LoRA trains: adapters, modules_to_save, chosen biases.

    Every alias of a shared (tied) parameter is listed, in model order, each name once.
    """
    config = config_of(model)
    return select_trainable(
        model,
        saved=[name for name, _ in saved_modules(model)],
        bias_modules={n for n, m in model.named_modules() if m.__dict__.get(_BIAS) is not None},
        all_biases=config is not None and config.bias == "all",
    )


def select_trainable(
    model: nn.Module, *, saved: list[str], bias_modules: set[str], all_biases: bool
) -> list[str]:
    """The rule behind :func:`trainable_names`, on explicit inputs (so a plan can apply it
    before any mark exists): adapter matrices, every parameter under a ``saved`` module, and
    the bias of each module in ``bias_modules`` (or every bias with ``all_biases``)."""
    names = []
    adapters = adapter_parameter_names(model)
    saved_prefixes = [f"{n}." if n else "" for n in saved]
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        trained_bias = all_biases or module_name in bias_modules
        for param_name, _ in module.named_parameters(recurse=False):
            full = prefix + param_name
            if (
                full in adapters
                or any(full.startswith(p) for p in saved_prefixes)
                or (param_name == "bias" and trained_bias)
            ):
                names.append(full)
    return list(dict.fromkeys(names))


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` True exactly on :func:`trainable_names`, False elsewhere."""
    trainable = set(trainable_names(model))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    # A parameter shared with a trained one trains (it is the same tensor).
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in trainable:
        params[name].requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a LoRA run produces, keyed as in ``model.state_dict()``.

    That is ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` of every adapted module (and
    its variant's tensors, e.g. DoRA's ``<path>.lora_magnitude_vector``), the
    parameters of ``modules_to_save``, and the biases that ``config.bias`` trains. Frozen base
    weights are never included. Tensors are detached and share storage with the model.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: clean names
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name].detach() for name in trainable_names(model)}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model (each shared parameter counted once)."""

    trainable: int
    total: int
    adapter: int
    adapted_modules: int

    @property
    def trainable_percent(self) -> float:
        """``100 * trainable / total`` (0 for an empty model)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count trainable, total and adapter (A/B, a variant's) parameters; works on ``meta``
    models too."""
    trainable = total = adapter = 0
    adapters = adapter_parameter_names(model)
    for name, param in model.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        adapter += param.numel() if name in adapters else 0
    return ParameterCounts(
        trainable=trainable,
        total=total,
        adapter=adapter,
        adapted_modules=sum(1 for _ in adapted_layers(model)),
    )


def export_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The submodule whose module paths an adapter file should use, and its attribute path.

    The outermost Hugging Face model (an object with ``config`` and ``save_pretrained``)
    holding every adapter and every other trained tensor (``modules_to_save``, biases), so
    PEFT loads the adapter onto the stock model; otherwise ``model`` itself (path ``""``).
    """
    names = [name for name, _, _ in adapted_layers(model)] + trainable_names(model)
    for name, module in model.named_modules():
        if name and hasattr(module, "save_pretrained") and hasattr(module, "config"):
            if all(n.startswith(name + ".") for n in names):
                return name, module
    return "", model
