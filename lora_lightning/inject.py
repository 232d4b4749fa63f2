"""`inject_lora`: find the target layers, attach adapters, freeze everything else."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator

from torch import nn

from lora_lightning.config import LoRAConfig, compile_pattern
from lora_lightning.errors import LoRAConfigError, LoRAStateError
from lora_lightning.layers import (
    LoRASpec,
    attach,
    check_supported,
    get_spec,
    group_shared_inputs,
)

TargetFn = Callable[[str, nn.Module], bool]

# Marks kept in a module's __dict__ (plain attributes: they add no state-dict keys).
_SAVE_MARK = "_lora_modules_to_save"
_BIAS_MARK = "_lora_train_bias"
_CONFIG_ATTR = "_lora_config"


def inject_lora(
    model: nn.Module, config: LoRAConfig | None = None, *, target_fn: TargetFn | None = None
) -> list[str]:
    """Add LoRA adapters to ``model`` in place and freeze everything that should not train.

    Targets are the modules whose qualified name full-matches a ``config.target_modules`` regex
    (or for which ``target_fn(name, module)`` is true, when given), minus ``exclude_modules``
    and minus those whose ``rank_pattern`` rank is 0. After injection only the adapter
    matrices, the ``modules_to_save`` and the biases selected by ``config.bias`` require grad.

    Idempotent: calling it again with the same config adds nothing and returns the same names.
    On a ``meta``-device model no memory is allocated and nothing is initialised.

    Returns:
        The qualified names of the adapted modules, in model order.

    Raises:
        LoRAConfigError: if targets or ``modules_to_save`` match no module (the message lists
            real module names that look close).
        UnsupportedModuleError: if a target is not a supported layer type.
        LoRAStateError: if the model already holds adapters from a different config.
    """
    config = config or LoRAConfig()
    existing = model.__dict__.get(_CONFIG_ATTR)
    if existing is not None and existing != config:
        differ = [
            f"{key}: {value!r} -> {getattr(config, key)!r}"
            for key, value in vars(existing).items()
            if getattr(config, key) != value
        ]
        raise LoRAStateError(
            "this model already holds LoRA adapters from a different config (changed: "
            f"{'; '.join(differ)}); call unload_lora(model) first, or inject with the same "
            "config"
        )
    names = [name for name, _ in model.named_modules() if name]
    targets = _select_targets(model, config, target_fn)
    # Check every target before attaching anything: an error leaves the model untouched.
    for name, module in targets:
        check_supported(module, name)
    for name, module in targets:
        if get_spec(module) is not None:
            continue
        r, alpha = config.rank_for(name), config.alpha_for(name)
        attach(
            module,
            name,
            r=r,
            alpha=alpha,
            scaling=config.scaling(r, alpha),
            dropout=float(config.dropout),
            dtype=config.torch_dtype,
            init=config.init,
            seed=config.seed,
            config=config,
        )
        if config.bias == "lora_only" and getattr(module, "bias", None) is not None:
            module.__dict__[_BIAS_MARK] = True
    if config.fuse_shared_input:
        group_shared_inputs(targets)
    for _, module in _match_modules(model, names, config.modules_to_save, "modules_to_save"):
        module.__dict__[_SAVE_MARK] = True
    model.__dict__[_CONFIG_ATTR] = config
    mark_only_lora_as_trainable(model)
    return [name for name, _ in targets]


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The config that adapted ``model`` or any of its submodules (None if none was)."""
    config = model.__dict__.get(_CONFIG_ATTR)
    if config is None:
        config = next((spec.config for _, _, spec in adapted_modules(model)), None)
    return config


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRASpec]]:
    """Yield ``(name, module, spec)`` for every adapted module, in model order."""
    for name, module in model.named_modules():
        spec = get_spec(module)
        if spec is not None:
            yield name, module, spec


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module in ``modules_to_save``."""
    for name, module in model.named_modules():
        if module.__dict__.get(_SAVE_MARK):
            yield name, module


def is_lora_parameter(name: str) -> bool:
    """True for the qualified name of an adapter matrix (``...lora_A.weight``/``lora_B``)."""
    return name.endswith(("lora_A.weight", "lora_B.weight"))


def trainable_names(model: nn.Module) -> list[str]:
    """Qualified names of the parameters LoRA trains: adapters, modules_to_save, chosen biases."""
    config = lora_config_of(model)
    train_all_biases = config is not None and config.bias == "all"
    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        saved = module.__dict__.get(_SAVE_MARK, False)
        for param_name, _ in module.named_parameters(recurse=False):
            full = prefix + param_name
            if (
                is_lora_parameter(full)
                or saved
                or (param_name == "bias" and (train_all_biases or module.__dict__.get(_BIAS_MARK)))
            ):
                names.append(full)
    # A module_to_save nested in another shares parameters: keep each name once, in order.
    return list(dict.fromkeys(names))


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` True exactly on :func:`trainable_names`, False elsewhere."""
    trainable = set(trainable_names(model))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    # A module_to_save under a module that is not saved: mark its subtree trainable too.
    for _, module in saved_modules(model):
        for param in module.parameters():
            param.requires_grad_(True)


def _select_targets(
    model: nn.Module, config: LoRAConfig, target_fn: TargetFn | None
) -> list[tuple[str, nn.Module]]:
    excludes = [compile_pattern("exclude_modules", p) for p in config.exclude_modules]
    modules = [
        (name, module)
        for name, module in model.named_modules()
        if name and not _is_lora_part(name) and not any(p.fullmatch(name) for p in excludes)
    ]
    if target_fn is not None:
        chosen = [(n, m) for n, m in modules if target_fn(n, m)]
        if not chosen:
            raise LoRAConfigError(
                "target_fn selected no module; it is called as target_fn(name, module) for "
                f"every module, e.g. names {_sample([n for n, _ in modules])}"
            )
    else:
        names = [n for n, _ in modules]
        chosen = _match_modules(model, names, config.target_modules, "target_modules")
        chosen = [(n, m) for n, m in chosen if not any(p.fullmatch(n) for p in excludes)]
    # Like PEFT, never adapt inside a module trained in full: its weights already train.
    saved = [compile_pattern("modules_to_save", p) for p in config.modules_to_save]
    kept = [(n, m) for n, m in chosen if not _inside_any(n, saved) and config.rank_for(n) > 0]
    if not kept:
        raise LoRAConfigError(
            f"no module is left to adapt: the targets matched {[n for n, _ in chosen][:6]}, "
            "but each of them is inside lora.modules_to_save or has rank 0 in "
            "lora.rank_pattern; narrow those, or target other modules"
        )
    return kept


def _inside_any(name: str, patterns: list[re.Pattern[str]]) -> bool:
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(p.fullmatch(prefix) for prefix in prefixes for p in patterns)


def _match_modules(
    model: nn.Module, names: list[str], patterns: list[str], field_name: str
) -> list[tuple[str, nn.Module]]:
    """Modules whose name full-matches any pattern; a pattern matching nothing is an error."""
    if not patterns:
        return []
    compiled = [compile_pattern(field_name, p) for p in patterns]
    unmatched = [p for p in compiled if not any(p.fullmatch(n) for n in names)]
    if len(unmatched) == len(compiled):
        hints = _close_names(names, [p.pattern for p in unmatched])
        raise LoRAConfigError(
            f"lora.{field_name}={patterns} matched no module of {type(model).__name__}; "
            "each regex is full-matched against module names. Names that look close: "
            f"{hints}"
        )
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in names if any(p.fullmatch(n) for p in compiled)]


def _is_lora_part(name: str) -> bool:
    return bool(re.search(r"(^|\.)lora_(A|B|dropout)$", name))


def _close_names(names: list[str], patterns: list[str], n: int = 6) -> list[str]:
    plain = [re.sub(r"[^\w.]", "", p) or p for p in patterns]
    leaves = {name: name.rsplit(".", 1)[-1] for name in names}
    found: list[str] = []
    for p in plain:
        leaf = p.rsplit(".", 1)[-1]
        # Most likely meant: modules whose last name part contains, or nearly spells, the
        # pattern's last part (``query`` -> ``...self.query``, ``c_atn`` -> ``...c_attn``).
        found += [name for name in names if leaf and leaf in leaves[name]]
        near = set(difflib.get_close_matches(leaf, sorted(set(leaves.values())), n=n))
        found += [name for name in names if leaves[name] in near]
        found += difflib.get_close_matches(p, names, n=n, cutoff=0.0)
    return list(dict.fromkeys(found))[:n] or _sample(names, n)


def _sample(names: list[str], n: int = 6) -> list[str]:
    return names[:n]
