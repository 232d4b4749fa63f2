"""Planning: what an injection will do, worked out and checked before the model is touched.

Owns: :class:`LoRAPlan` / :class:`TargetPlan` and :func:`plan_lora`, a pure function of
(model, config, optional target function) that selects targets, resolves each target's rank,
alpha, scaling, dtype, adapter shapes, whether its init rewrites the base weight (PiSSA,
OLoRA) and whether its base is stored quantized (``core.quantize``; with
``quantize_scope=all_linear`` also which other frozen Linears are, and why any stays float),
lists what trains
(``modules_to_save``, biases), and raises on everything that can be wrong: an invalid or mutated config, an entry that matches nothing, an unsupported layer (for
the variant or init too), adapters from another config already in the model. It reads the
model and never changes it. Must not import: ``core.inject``, ``core.adapter``, Lightning.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning.core import quantize, variants
from lora_lightning.core.config import LoRAConfig, NamePattern, compile_patterns, config_diff
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError, UnsupportedModuleError
from lora_lightning.core.inits import find_init
from lora_lightning.core.layers import adapter_shapes, layer_kind, unsupported_reason
from lora_lightning.core.state import (
    adapted_layers,
    adapter_parameter_names,
    owner_of,
    parameter_aliases,
    select_trainable,
)

TargetFn = Callable[[str, nn.Module], bool]
_LORA_PART = re.compile(r"(^|.*\.)lora_(A|B)$")


@dataclass(frozen=True)
class TargetPlan:
    """One layer to adapt: ``W x`` -> ``W x + scaling · B A dropout(x)``."""

    name: str
    kind: str  # core.layers kind: linear, gpt2_conv1d, conv, embedding
    r: int
    alpha: float
    scaling: float
    dtype: torch.dtype  # adapter dtype
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    on_meta: bool  # the base weight has no values (meta device): nothing can be loaded
    variant: str | None = None  # a core.variants name ("dora"), None for plain LoRA
    variant_tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()  # the variant's (name, shape)
    # An init that also rewrites the base weight to W - s·B0 A0 (config.init: pissa,
    # pissa_niter_<k>, olora); None when the base weight is left as it is.
    base_init: str | None = None
    # The scheme the frozen base weight is stored in once applied (config.quantize_base:
    # nf4, int8, see core.quantize); None keeps the float weight.
    quantize: str | None = None


@dataclass(frozen=True)
class LoRAPlan:
    """Everything an injection does, checked: apply it with ``core.inject.apply_plan``."""

    config: LoRAConfig
    targets: tuple[TargetPlan, ...]
    modules_to_save: tuple[str, ...]
    trained_biases: tuple[str, ...]  # adapted layers whose bias trains (bias="lora_only")
    already_applied: bool  # the model holds exactly these adapters from an equal config
    # quantize_scope=all_linear: the frozen nn.Linear layers (not adapted, not in
    # modules_to_save, weight not tied) whose base weight is stored quantized too, as
    # (name, scheme), in model order; empty under quantize_scope=adapted.
    quantized_frozen: tuple[tuple[str, str], ...] = ()
    # quantize_scope=all_linear: the other nn.Linear layers, whose weight stays float, as
    # (name, why): trained in full, tied, or a weight the scheme cannot store (e.g. nf4 and
    # a size not a multiple of 16384). Leaving them float changes no maths, only memory.
    kept_float: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        """Qualified names of the layers to adapt, in model order."""
        return [target.name for target in self.targets]

    def adapter_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``<name>.lora_A.weight`` / ``lora_B`` (and a variant's, e.g. DoRA's
        ``<name>.lora_magnitude_vector``) -> (shape, dtype) of every adapter tensor."""
        specs = {}
        for t in self.targets:
            specs[f"{t.name}.lora_A.weight"] = (t.shape_a, t.dtype)
            specs[f"{t.name}.lora_B.weight"] = (t.shape_b, t.dtype)
            for part, shape in t.variant_tensors:
                specs[f"{t.name}.{part}"] = (shape, t.dtype)
        return specs

    def trainable_tensors(self, model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor that trains once the plan is applied (the
        keys ``lora_state_dict`` will have): adapters, ``modules_to_save``, trained biases."""
        params = dict(getattr(model, "_orig_mod", model).named_parameters(remove_duplicate=False))
        names = select_trainable(
            model,
            saved=list(self.modules_to_save),
            bias_modules=set(self.trained_biases),
            all_biases=self.config.bias == "all",
        )
        # Adapter tensors are this plan's own (not those of adapters already in the model).
        present = adapter_parameter_names(model)
        specs = {n: (tuple(params[n].shape), params[n].dtype) for n in names if n not in present}
        return {**specs, **self.adapter_tensors()}

    def summary(self) -> str:
        """One line per target (name, kind, rank, alpha, scaling, shapes), per module trained
        in full, and with ``quantize_scope=all_linear`` per other frozen Linear (its scheme, or
        why its weight stays float), for people."""
        rows = [
            f"{t.name}  {t.kind}{' ' + t.variant if t.variant else ''}  r={t.r}  "
            f"alpha={t.alpha:g}  scaling={t.scaling:g}  "
            f"A{list(t.shape_a)} B{list(t.shape_b)} {str(t.dtype).removeprefix('torch.')}"
            + (f"  base {t.quantize}" if t.quantize else "")
            for t in self.targets
        ]
        rows += [f"{name}  trained in full" for name in self.modules_to_save]
        rows += [f"{name}  frozen, base {scheme}" for name, scheme in self.quantized_frozen]
        rows += [f"{name}  frozen, base kept float: {why}" for name, why in self.kept_float]
        return "\n".join(rows)


def plan_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    *,
    target_fn: TargetFn | None = None,
    alongside: bool = False,
) -> LoRAPlan:
    """Work out and check what ``inject_lora(model, config, target_fn=...)`` would do.

    Targets are the modules matched by an entry of ``config.target_modules`` (a plain name
    matches as a name suffix, as in PEFT; anything else is a full-match regex), or for which
    ``target_fn(name, module)`` is true, minus ``exclude_modules``, minus modules inside a
    ``modules_to_save`` module, minus those whose ``rank_pattern`` rank is 0.

    With ``alongside`` the plan is made as if the model held no adapters (the adapters
    already there are neither compared nor counted): how ``core.bank`` checks an inactive,
    named adapter while another is installed. Such a plan is applied only once those are
    removed (``apply_plan`` refuses it before).

    Raises:
        LoRAConfigError: an invalid config value; a ``target_modules`` or ``modules_to_save``
            entry that matches no module (with close names among the layers LoRA can adapt);
            no target left.
        UnsupportedModuleError: a target LoRA cannot adapt, or with a variant (``use_dora``)
            a target the variant cannot adapt (DoRA: a convolution or embedding), or a target
            the ``init`` cannot adapt (``core.inits``: PiSSA/OLoRA on a layer kind they do not
            factor, a meta weight, a rank above its smaller dimension, tied weights), or with ``quantize_base`` a target whose base it cannot store (not an
            nn.Linear, meta, a size nf4 cannot block, tied weights; see
            ``core.quantize.unsupported_reason``), or a target or ``modules_to_save`` module
            the model also holds under another name; every such module is listed.
        LoRAConfigError: also ``quantize_base`` without torchao installed.
        LoRAStateError: the model already holds adapters from another config or other
            targets, or from several injections.
    """
    config = (config if config is not None else LoRAConfig()).validate()
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: plan the real model
    modules = [(n, m) for n, m in model.named_modules() if n and not _LORA_PART.fullmatch(n)]
    # A module held under several names (``self.b = self.a``) matches under any of them, so
    # the refusal below names it (named_modules lists only its first name).
    every = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if n and not _LORA_PART.fullmatch(n)
    ]
    excludes = compile_patterns("exclude_modules", config.exclude_modules)
    candidates = [(n, m) for n, m in every if not any(p.matches(n) for p in excludes)]
    chosen = _first_names(modules, _choose_targets(model, every, candidates, config, target_fn))
    saved = _first_names(
        modules,
        _match_every_entry(
            model, every, compile_patterns("modules_to_save", config.modules_to_save)
        ),
    )
    saved_names = [n for n, _ in saved]
    kept = [(n, m) for n, m in chosen if not _inside_any(n, saved_names) and config.rank_for(n) > 0]
    if not kept:
        raise LoRAConfigError(
            f"no module is left to adapt: the targets matched {[n for n, _ in chosen][:6]}, "
            "but each of them is inside lora.modules_to_save or has rank 0 in "
            "lora.rank_pattern; narrow those, or target other modules"
        )
    unsupported = [(n, unsupported_reason(m)) for n, m in kept if unsupported_reason(m)]
    unsupported += _held_under_several_names(every, kept + saved)
    unsupported += _read_directly(modules, kept)
    variant = variants.enabled_variant(config)
    if variant is not None and not unsupported:
        reasons = [(n, variant.unsupported_reason(m, layer_kind(m))) for n, m in kept]
        unsupported = [(n, why) for n, why in reasons if why]
    if not unsupported and (alongside or owner_of(model) is None):
        unsupported = _init_problems(model, kept, config)
    if config.quantize_base != quantize.NONE and not unsupported and owner_of(model) is None:
        quantize.backend()  # a missing library is refused before anything changes
        unsupported = _quantize_problems(model, kept, config.quantize_base)
    if unsupported:
        listed = "; ".join(f"module {n!r} is {why}" for n, why in unsupported[:5])
        more = f" (and {len(unsupported) - 5} more)" if len(unsupported) > 5 else ""
        raise UnsupportedModuleError(
            f"{len(unsupported)} target(s) cannot be adapted: {listed}{more}; adjust "
            "lora.target_modules or lora.exclude_modules"
        )
    targets = tuple(_target_plan(name, module, config, variant) for name, module in kept)
    _warn_about_tied_targets(model, kept)
    biases = tuple(
        n for n, m in kept if config.bias == "lora_only" and getattr(m, "bias", None) is not None
    )
    quantized_frozen: tuple[tuple[str, str], ...] = ()
    kept_float: tuple[tuple[str, str], ...] = ()
    if config.quantize_scope == "all_linear" and owner_of(model) is None:
        quantized_frozen, kept_float = _frozen_linears(model, modules, kept, saved_names, config)
    plan = LoRAPlan(
        config,
        targets,
        tuple(saved_names),
        biases,
        already_applied=False,
        quantized_frozen=quantized_frozen,
        kept_float=kept_float,
    )
    return plan if alongside else _against_existing_adapters(model, plan)


def _frozen_linears(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    targets: list[tuple[str, nn.Module]],
    saved: list[str],
    config: LoRAConfig,
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """``quantize_scope=all_linear``: every nn.Linear that is neither a target nor trained in
    full, split into ``(name, scheme)`` to store quantized and ``(name, why)`` to keep float.
    A layer the scheme cannot store is kept float, not refused: its maths is the same either
    way, only the memory saving is smaller."""
    scheme = config.quantize_base
    adapted = {n for n, _ in targets}
    attention = [n for n, m in modules if isinstance(m, nn.MultiheadAttention)]
    linears = [(n, m) for n, m in modules if n not in adapted and layer_kind(m) == "linear"]
    trained = [
        (n, "trained in full (modules_to_save)") for n, _ in linears if _inside_any(n, saved)
    ]
    # nn.MultiheadAttention reads its out_proj weight itself (its fused fast path included),
    # not through the Linear's F.linear, which is what the quantized tensors implement.
    fused = [
        (n, "read directly by its nn.MultiheadAttention, not through F.linear")
        for n, _ in linears
        if _inside_any(n, attention) and not _inside_any(n, saved)
    ]
    skip = {n for n, _ in trained + fused}
    rest = [(n, m) for n, m in linears if n not in skip]
    problems = dict(
        _weight_problems(
            model,
            rest,
            lambda module: quantize.unsupported_reason(module, "linear", scheme),
            "storing it quantized would untie it from those modules",
        )
    )
    order = {n: i for i, (n, _) in enumerate(modules)}
    kept_float = sorted(trained + fused + list(problems.items()), key=lambda item: order[item[0]])
    quantized = tuple((n, scheme) for n, _ in rest if n not in problems)
    return quantized, tuple(kept_float)


class TiedWeightWarning(UserWarning):
    """A target's weight is shared with another module (e.g. GPT-2's ``lm_head`` and ``wte``)."""


def _warn_about_tied_targets(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn, as PEFT does: training works (the adapter is the target's own), but merging would
    change the other module too, so ``merge_lora`` refuses it."""
    aliases = parameter_aliases(model)
    for name, _ in targets:
        others = aliases.get(f"{name}.weight")
        if others:
            warnings.warn(
                f"LoRA target {name!r} shares its weight with {others[:3]} (tied weights): the "
                "adapter applies to this module only, and merge_lora will refuse to fold it "
                "(merging would change the tied module too); use merged_state_dict for export",
                TiedWeightWarning,
                stacklevel=3,
            )


def _target_plan(
    name: str, module: nn.Module, config: LoRAConfig, variant: variants.Variant | None
) -> TargetPlan:
    kind = layer_kind(module)
    r, alpha = config.rank_for(name), config.alpha_for(name)
    shape_a, shape_b = adapter_shapes(module, kind, r)
    return TargetPlan(
        name=name,
        kind=kind,
        r=r,
        alpha=alpha,
        scaling=config.scaling(r, alpha),
        dtype=config.torch_dtype or module.weight.dtype,
        shape_a=tuple(shape_a),
        shape_b=tuple(shape_b),
        on_meta=module.weight.device.type == "meta",
        variant=variant.name if variant is not None else None,
        variant_tensors=variant.tensor_shapes(module, kind) if variant is not None else (),
        base_init=config.init if config.changes_base else None,
        quantize=config.quantize_base if config.quantize_base != quantize.NONE else None,
    )


def _init_problems(
    model: nn.Module, targets: list[tuple[str, nn.Module]], config: LoRAConfig
) -> list[tuple[str, str]]:
    """Targets the init (``core.inits``) cannot adapt: a layer kind it does not support; for
    an init that factors the weight, no values (meta) or a rank above the layer's smaller
    dimension; for one that changes the base (PiSSA, OLoRA), a weight shared with another
    module (rewriting it would change that module too)."""
    init, entry = config.init, find_init(config.init)
    ranks = {id(module): config.rank_for(name) for name, module in targets}

    def reason(module: nn.Module) -> str | None:
        return entry.unsupported_reason(module, layer_kind(module), init, ranks[id(module)])

    if not entry.changes_base:
        return [(n, why) for n, m in targets if (why := reason(m))]
    return _weight_problems(
        model,
        targets,
        reason,
        f"init={init!r} rewrites the base weight, which would change those modules too",
    )


def _quantize_problems(
    model: nn.Module, targets: list[tuple[str, nn.Module]], scheme: str
) -> list[tuple[str, str]]:
    """Targets whose base weight ``scheme`` cannot store, or which share it with another
    module (the quantized copy would untie them: the other module would keep the float one)."""
    return _weight_problems(
        model,
        targets,
        lambda module: quantize.unsupported_reason(module, layer_kind(module), scheme),
        f"quantize_base={scheme!r} replaces the base weight, which would untie it from those "
        "modules",
    )


def _weight_problems(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    reason: Callable[[nn.Module], str | None],
    tied_consequence: str,
) -> list[tuple[str, str]]:
    """``(name, why)`` for every target whose base weight cannot be replaced or rewritten:
    ``reason(module)`` (a sentence, or None), else a weight tied to other parameters."""
    aliases = parameter_aliases(model)
    problems = []
    for name, module in targets:
        why = reason(module)
        others = aliases.get(f"{name}.weight")
        if why is None and others:
            why = f"tied to {others[:3]}: {tied_consequence}"
        if why:
            problems.append((name, why))
    return problems


def _against_existing_adapters(model: nn.Module, plan: LoRAPlan) -> LoRAPlan:
    """Same config and targets as the adapters already there: a no-op; anything else: refuse."""
    owner = owner_of(model)
    if owner is None:
        return plan
    differ = config_diff(owner.config, plan.config)
    if differ:
        raise LoRAStateError(
            "this model already holds LoRA adapters from a different config (changed: "
            f"{'; '.join(differ)}); call unload_lora(model) first, or inject with the same config"
        )
    present = {name: layer.r for name, _, layer in adapted_layers(model)}
    planned = {t.name: t.r for t in plan.targets}
    if present != planned:
        only_model = sorted(set(present) - set(planned))[:4]
        only_plan = sorted(set(planned) - set(present))[:4]
        raise LoRAStateError(
            "this model already holds LoRA adapters on other layers than this injection would "
            f"adapt (adapted but not targeted now: {only_model}; targeted but not adapted: "
            f"{only_plan}); call unload_lora(model) first"
        )
    return dataclasses.replace(plan, already_applied=True)


def _choose_targets(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    candidates: list[tuple[str, nn.Module]],
    config: LoRAConfig,
    target_fn: TargetFn | None,
) -> list[tuple[str, nn.Module]]:
    if target_fn is not None:
        chosen = [(n, m) for n, m in candidates if target_fn(n, m)]
        if not chosen:
            raise LoRAConfigError(
                "target_fn selected no module; it is called as target_fn(name, module) for "
                f"every module, e.g. names {_adaptable(modules)[:6]}"
            )
        return chosen
    patterns = compile_patterns("target_modules", config.target_modules)
    kept = {n for n, _ in candidates}
    excluded = [n for n, _ in modules if n not in kept]
    return _match_every_entry(model, candidates, patterns, excluded=excluded)


def _match_every_entry(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    patterns: list[NamePattern],
    excluded: list[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules matched by any entry; an entry that matches no module is an error naming it."""
    names = [n for n, _ in modules]
    unmatched = [p for p in patterns if not any(p.matches(n) for n in names)]
    if unmatched:
        field = unmatched[0].field_name
        adaptable = _adaptable(modules) if field == "target_modules" else names
        lines = []
        for p in unmatched:
            hidden = [n for n in excluded or [] if p.matches(n)]
            note = f" (it matches only excluded modules {hidden[:3]})" if hidden else ""
            lines.append(f"{p.entry!r}{note}: {_close_names(adaptable, p.entry)}")
        entries = [p.entry for p in patterns]
        raise LoRAConfigError(
            f"lora.{field}={entries} matched no module of {type(model).__name__} for "
            + "; ".join(lines)
            + ". A plain name matches a module called so or ending in "
            r"'.<name>'; a regex ('.*\.query') is full-matched against module names"
        )
    return [(n, m) for n, m in modules if any(p.matches(n) for p in patterns)]


def _adaptable(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the modules LoRA could adapt (hints point at these, not at metric objects)."""
    return [n for n, m in modules if layer_kind(m) is not None]


#: Why a module inside an ``nn.MultiheadAttention`` cannot be adapted.
READ_DIRECTLY = (
    "inside an nn.MultiheadAttention, which reads its weights directly in "
    "F.multi_head_attention_forward and never calls the module, so a LoRA adapter on it would "
    "silently never run (PEFT wraps the whole attention instead; that is not implemented here)"
)


def _read_directly(
    modules: list[tuple[str, nn.Module]], targets: list[tuple[str, nn.Module]]
) -> list[tuple[str, str]]:
    """Targets whose parent reads their weight itself instead of calling them: the
    ``out_proj`` of an ``nn.MultiheadAttention``. A hook on such a layer never fires."""
    attention = [n for n, m in modules if isinstance(m, nn.MultiheadAttention)]
    return [(n, READ_DIRECTLY) for n, _ in targets if _inside_any(n, attention)]


def _held_under_several_names(
    every: list[tuple[str, nn.Module]], chosen: list[tuple[str, nn.Module]]
) -> list[tuple[str, str]]:
    """``(name, why)`` for every chosen module the model also holds under another name. PEFT
    replaces the attribute of the first name only, so calls through the others run without
    the adapter there and with it here (the hook is on the module): no file could be exact in
    both, and saving would write one tensor under two names."""
    names: dict[int, list[str]] = {}
    for name, module in every:
        names.setdefault(id(module), []).append(name)
    return [
        (
            name,
            f"also held as {names[id(module)][1:4]} (one module under several names): PEFT "
            f"would adapt only calls through {name!r}, this project every call, so the "
            "adapter could not be exact in both; give each name its own module, or exclude it",
        )
        for name, module in chosen
        if len(names[id(module)]) > 1
    ]


def _first_names(
    modules: list[tuple[str, nn.Module]], matched: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """``matched`` with every module once, under its first name, in model order."""
    hit = {id(m) for _, m in matched}
    return [(n, m) for n, m in modules if id(m) in hit]


def _inside_any(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _close_names(names: list[str], entry: str, n: int = 6) -> str:
    """A short hint for an entry that matched nothing: the module names whose last part
    really is close to the entry's (a typo, a part of it), one example path each; else the
    distinct last parts there are to choose from."""
    plain = re.sub(r"[^\w.]", "", entry) or entry
    leaf = plain.rsplit(".", 1)[-1]
    examples: dict[str, str] = {}
    for name in names:
        examples.setdefault(name.rsplit(".", 1)[-1], name)
    close = [part for part in examples if leaf and len(leaf) >= 3 and leaf in part]
    close += difflib.get_close_matches(leaf, list(examples), n=n, cutoff=0.75)
    close = list(dict.fromkeys(close))[:n]
    if close:
        return "did you mean " + ", ".join(f"{part!r} (e.g. {examples[part]})" for part in close)
    return f"no name is close; the adaptable layers are named {list(examples)[: 2 * n]}"
