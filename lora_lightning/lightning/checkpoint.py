"""LoRA checkpoints as pure functions on Lightning checkpoint dicts, testable without a Trainer.

Owns: what a trimmed checkpoint holds (:func:`trim_checkpoint`: trainable tensors only, under
clean names, plus a ``"lora"`` entry made by :func:`lora_metadata`), and every check a
checkpoint must pass before it is resumed (:func:`check_checkpoint_form` on the object a file
held, :func:`validate_checkpoint` against the adapted model, :func:`check_optimizer_states`
against the optimizers built for the resumed run: every malformed, tampered or foreign form is a
:class:`CheckpointMismatchError` saying what is wrong). The base-model fingerprint a checkpoint
carries is ``lightning.fingerprint``'s. Must not import: Lightning (these are plain dict
functions), Hydra, ``app/``.

Names are clean: a wrapper module adds its own component to every name below it
(``torch.compile``: ``_orig_mod``; FSDP1's ``FullyShardedDataParallel``, which Lightning's
``strategy=fsdp`` puts around each wrapped block: ``_fsdp_wrapped_module``; activation
checkpointing's ``CheckpointWrapper``: ``_checkpoint_wrapped_module``). :func:`clean_name`
drops every such component (:data:`WRAPPER_COMPONENTS`), so checkpoints, fingerprints and
adapter keys are the same for a wrapped and an unwrapped model (and the same as the full state
dicts the strategies gather, which carry clean names), and :func:`without_wrappers` shows a
model unwrapped while it is planned, injected (adapter init is seeded by module name) or
exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from lora_lightning.core import LoRAConfig, adapted_layers, config_diff, trainable_names
from lora_lightning.core.errors import CheckpointMismatchError, LoRAConfigError
from lora_lightning.core.tensor_checks import (
    DTYPE,
    NON_FINITE,
    NOT_TENSOR,
    SHAPE,
    tensor_problems,
)

CHECKPOINT_KEY = "lora"
#: 2: clean names, and a base fingerprint over every value (1 sampled 64 values per tensor).
FORMAT = 2
#: Module-path components that wrappers insert (their wrapped module's attribute name):
#: ``torch.compile``'s ``OptimizedModule``, FSDP1's ``FullyShardedDataParallel``
#: (``torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE``), ``CheckpointWrapper``
#: (``torch.distributed.algorithms._checkpoint.checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE``).
FSDP_WRAPPED = "_fsdp_wrapped_module"
WRAPPER_COMPONENTS = ("_orig_mod", FSDP_WRAPPED, "_checkpoint_wrapped_module")
_METADATA_TYPES = {
    "config": (Mapping, "a mapping of LoRA config fields"),
    "base_fingerprint": (str, "a string"),
    "adapted_modules": (list, "a list of module names"),
    "export_root": (str, "a string"),
    "format": (int, "an integer"),
}


def clean_name(name: str) -> str:
    """``name`` without the components wrappers insert (:data:`WRAPPER_COMPONENTS`)."""
    if not any(component in name for component in WRAPPER_COMPONENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, or None when ``module`` is no wrapper."""
    for component in WRAPPER_COMPONENTS:
        inner = module._modules.get(component)
        if inner is not None:
            return inner
    return None


@contextlib.contextmanager
def without_wrappers(module: nn.Module) -> Iterator[None]:
    """Within the block, every wrapper below ``module`` (``torch.compile``, FSDP1, activation
    checkpointing: :data:`WRAPPER_COMPONENTS`) is replaced by the module it wraps, so every
    name is the unwrapped model's (the names LoRA seeds adapter init with, and the keys adapter
    files carry); the wrappers are put back after. The wrapped modules are the same objects
    either way: what is attached to them inside the block stays. Nothing may run the model
    inside the block (an FSDP1 unit's hooks are on its wrapper)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    seen: set[int] = set()
    stack = [module]
    try:
        while stack:
            parent = stack.pop()
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            for key, child in list(parent._modules.items()):
                inner = child
                while inner is not None and (held := _wrapped(inner)) is not None:
                    inner = held
                if inner is not child:
                    swapped.append((parent, key, child))
                    parent._modules[key] = inner
                if inner is not None:
                    stack.append(inner)
        yield
    finally:
        for parent, key, child in reversed(swapped):
            parent._modules[key] = child


def adapter_dir_for(checkpoint_path: str | Path) -> Path:
    """The adapter directory kept beside a checkpoint: ``epoch=1.ckpt`` -> ``epoch=1_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_adapter")


def adapted_module_names(model: nn.Module) -> list[str]:
    """Clean names of the adapted layers of ``model``, in model order."""
    return [clean_name(name) for name, _, _ in adapted_layers(model)]


def lora_metadata(
    config: LoRAConfig, fingerprint: str, adapted: list[str], export_root: str
) -> dict[str, Any]:
    """The ``checkpoint["lora"]`` entry: enough to refuse resuming into another setup."""
    return {
        "config": config.to_dict(),
        "base_fingerprint": fingerprint,
        "adapted_modules": [clean_name(name) for name in adapted],
        "export_root": clean_name(export_root),
        "format": FORMAT,
    }


def trim_checkpoint(checkpoint: dict[str, Any], keep: Iterable[str], metadata: dict) -> None:
    """Keep only the ``keep`` tensors in ``checkpoint["state_dict"]``, under clean names, and
    add the LoRA entry (in place; the state dict keeps its mapping type)."""
    keep = {clean_name(k) for k in keep}  # a wrapped model's names: the state dict's may be clean
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = type(state)(
        (clean_name(k), v) for k, v in state.items() if clean_name(k) in keep
    )
    checkpoint[CHECKPOINT_KEY] = metadata


# ------------------------------------------------------------------------------- validation
def check_checkpoint_form(checkpoint: Any, source: Any = "the checkpoint") -> None:
    """Check that an object read from a checkpoint file is a Lightning checkpoint dict at all
    (what Lightning itself indexes before any hook runs).

    Raises:
        CheckpointMismatchError: not a dict (a bare tensor, a list, ...), an empty dict, or no
            valid ``"pytorch-lightning_version"``.
    """
    advice = (
        "resume from a .ckpt written by Trainer.save_checkpoint or ModelCheckpoint (a plain "
        "torch.save of a model or state dict is not one)"
    )
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f"{source} holds {_describe(checkpoint)}, not a Lightning checkpoint dict; {advice}"
        )
    if not checkpoint:
        raise CheckpointMismatchError(f"{source} holds an empty dict; {advice}")
    version = checkpoint.get("pytorch-lightning_version")
    if not isinstance(version, str) or not _is_version(version):
        raise CheckpointMismatchError(
            f"{source} has no valid 'pytorch-lightning_version' (found {_short(version)}; "
            f"keys {sorted(map(str, checkpoint))[:8]}), so it was not written by Lightning or "
            f"was edited; {advice}"
        )


def validate_checkpoint(
    checkpoint: Any,
    model: nn.Module,
    config: LoRAConfig,
    fingerprint: str,
    *,
    training: bool = False,
) -> None:
    """Check that ``checkpoint`` resumes ``model`` (adapted with ``config``) exactly, and keep
    only its trainable tensors (renamed to ``model``'s own names) so that the resume loads
    nothing else: frozen base weights always come from the base model.

    With ``training`` (``fit``) the optimizer, scheduler and loop state a resume restores must
    be present and well formed too; :func:`check_optimizer_states` checks them against the
    optimizers once they exist.

    Raises:
        CheckpointMismatchError: not a checkpoint dict; no or a malformed ``"lora"`` entry
            (not written by a LoRA run, or tampered with); another format, LoRA config,
            adapted modules or base model; missing, unexpected, non-tensor, wrongly-shaped or
            non-finite trainable tensors; missing or malformed training state.
    """
    check_checkpoint_form(checkpoint)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise CheckpointMismatchError(
            "the checkpoint was not written by a run with LoRACallback (it has no 'lora' "
            "entry), so resuming from it would silently drop LoRA state; to start LoRA from "
            "full-model weights, load them into the model before fit() instead of passing "
            "ckpt_path"
        )
    _check_metadata(meta)
    _check_setup(meta, model, config, fingerprint)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint's 'state_dict' is {_describe(state)}, not a mapping of tensors"
        )
    checkpoint["state_dict"] = _trainable_tensors(state, model)
    if training:
        _check_training_state(checkpoint)


def check_optimizer_states(
    optimizer_states: Any, optimizers: Sequence[torch.optim.Optimizer], schedulers: Any, count: int
) -> None:
    """Check that a checkpoint's optimizer and scheduler states fit the optimizers and the
    ``count`` schedulers built for the resumed run (Lightning pairs them up with ``zip``:
    a missing or extra state would be dropped without a word).

    Raises:
        CheckpointMismatchError: another number of optimizers or schedulers, or of parameter
            groups or parameters in a group.
    """
    if len(optimizer_states) != len(optimizers):
        raise CheckpointMismatchError(
            f"the checkpoint holds the state of {len(optimizer_states)} optimizer(s), the run "
            f"built {len(optimizers)}: configure_optimizers changed since it was written; "
            "resume with the same optimizers or start a new run without ckpt_path"
        )
    for index, (state, optimizer) in enumerate(zip(optimizer_states, optimizers, strict=True)):
        built = [len(group["params"]) for group in optimizer.param_groups]
        groups = state.get("param_groups")
        if not built:  # no parameters (Lightning's stand-in when there is no optimizer)
            continue
        if (
            not isinstance(state.get("state"), Mapping)
            or not isinstance(groups, list)
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
        ):
            raise CheckpointMismatchError(
                f"the checkpoint's state of optimizer {index} ({type(optimizer).__name__}) is "
                "not an optimizer state_dict (a 'state' dict and 'param_groups', each with a "
                "'params' list); it was edited or written by an incompatible version: resume "
                "from another checkpoint"
            )
        saved = [len(group["params"]) for group in groups]
        if saved != built:
            raise CheckpointMismatchError(
                f"optimizer {index} ({type(optimizer).__name__}) has parameter groups of "
                f"sizes {built}, its state in the checkpoint {saved}: the trainable "
                "parameters or the optimizer's groups changed since it was written; resume "
                "with the same setup or start a new run without ckpt_path"
            )
    if len(schedulers) != count:
        raise CheckpointMismatchError(
            f"the checkpoint holds the state of {len(schedulers)} learning-rate scheduler(s), "
            f"the run built {count}: configure_optimizers changed since it was written"
        )


def _check_metadata(meta: Any) -> None:
    if not isinstance(meta, Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint's 'lora' entry is {_describe(meta)}, not a dict with "
            f"{sorted(_METADATA_TYPES)}; it was edited or written by an incompatible "
            "version: resume from another checkpoint"
        )
    problems = []
    for key, (kind, description) in _METADATA_TYPES.items():
        if key not in meta:
            problems.append(f"'{key}' is missing")
        elif not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            problems.append(f"'{key}' is {_describe(meta[key])}, expected {description}")
    adapted = meta.get("adapted_modules")
    if isinstance(adapted, list) and not all(isinstance(name, str) for name in adapted):
        problems.append("'adapted_modules' holds non-string entries")
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint's 'lora' entry is malformed: "
            + "; ".join(problems)
            + ". It was edited or written by an incompatible version: resume from another "
            "checkpoint"
        )
    if meta["format"] != FORMAT:
        newer = meta["format"] > FORMAT
        raise CheckpointMismatchError(
            f"the checkpoint's LoRA entry has format {meta['format']}, this version reads "
            f"format {FORMAT}: "
            + (
                "it was written by a newer lora_lightning; upgrade to resume it"
                if newer
                else "it was written by an older lora_lightning, whose base fingerprint "
                "sampled values and cannot vouch for this base; resume it with that version, "
                "or start a new run and load its adapter directory with load_adapter"
            )
        )


def _check_setup(meta: Mapping, model: nn.Module, config: LoRAConfig, fingerprint: str) -> None:
    try:
        differ = config_diff(dict(meta["config"]), config, labels=("checkpoint", "now"))
    except LoRAConfigError as err:
        raise CheckpointMismatchError(
            f"the checkpoint's LoRA config is not a valid config ({err}); it was edited or "
            "written by an incompatible version"
        ) from None
    if differ:
        raise CheckpointMismatchError(
            "the checkpoint was trained with another LoRA config; differing fields: "
            + "; ".join(differ)
            + ". Resume with the checkpoint's config, or start "
            "a new run without ckpt_path"
        )
    adapted = adapted_module_names(model)
    if list(meta["adapted_modules"]) != adapted:
        saved = list(meta["adapted_modules"])
        only_saved = [name for name in saved if name not in adapted]
        only_now = [name for name in adapted if name not in saved]
        raise CheckpointMismatchError(
            f"the checkpoint adapted {len(saved)} module(s), this model {len(adapted)}: only "
            f"in the checkpoint {only_saved[:6]}, only now {only_now[:6]}"
            + ("" if only_saved or only_now else " (same modules, another order)")
            + "; the model's structure changed or the entry was edited: resume with the model "
            "the checkpoint was trained on"
        )
    if meta["base_fingerprint"] != fingerprint:
        raise CheckpointMismatchError(
            f"the checkpoint belongs to another base model (fingerprint "
            f"{meta['base_fingerprint']!r} vs this model's {fingerprint!r}): its frozen "
            "weights differ in names, shapes, dtypes or values; load the same pretrained base"
        )


def _trainable_tensors(state: Mapping, model: nn.Module) -> Any:
    """``state``'s trainable tensors under ``model``'s names, checked; nothing else."""
    # Names only: model.state_dict() would be a collective under FSDP. Every alias of a
    # shared (tied) tensor is a state-dict key: keep duplicates.
    params = dict(model.named_parameters(remove_duplicate=False))
    actual = {clean_name(name): name for name in params}
    actual.update({clean_name(name): name for name, _ in model.named_buffers()})
    trainable = {clean_name(name): name for name in trainable_names(model)}
    given = {}
    for key in state:
        given.setdefault(clean_name(key) if isinstance(key, str) else key, key)
    missing = sorted(set(trainable) - set(given))
    unexpected = sorted(map(str, set(given) - set(actual)))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit the adapted model: missing {len(missing)} "
            f"trainable tensor(s) {missing[:6]}, unexpected {len(unexpected)} "
            f"{unexpected[:6]}; frozen base weights may be absent, adapters may not"
        )
    # Loading casts a float of another dtype; a model built on meta accepts meta tensors.
    found = {name: state[given[name]] for name in trainable}
    expected = {name: (tuple(params[p].shape), params[p].dtype) for name, p in trainable.items()}
    problems = [
        {
            NOT_TENSOR: f"{name} is {_describe(value)}",
            SHAPE: f"{name} has shape {value}, model {want}",
            DTYPE: f"{name} has dtype {value}, model {want}",
            NON_FINITE: f"{name} holds NaN or Inf values (the run diverged before it)",
        }[rule]
        for name, rule, value, want in tensor_problems(
            found, expected, dtype_changes=True, meta=True
        )
    ]
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint's trainable tensors do not fit the model: "
            + "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + "; resume from another (e.g. an earlier) checkpoint"
        )
    # Frozen base weights and buffers in the file (a full checkpoint, an edited one) are
    # dropped: the base model's own values are the ones that were fingerprinted.
    return type(state)((trainable[name], state[given[name]]) for name in trainable)


def _check_training_state(checkpoint: Mapping) -> None:
    problems = []
    states = checkpoint.get("optimizer_states")
    if "optimizer_states" not in checkpoint or "lr_schedulers" not in checkpoint:
        raise CheckpointMismatchError(
            "the checkpoint has no optimizer or learning-rate scheduler state (written with "
            "ModelCheckpoint(save_weights_only=True) or trimmed by hand), so training cannot "
            "resume from it; resume from a full checkpoint, or start a new run without "
            "ckpt_path and load the adapter written beside it (load_adapter)"
        )
    if not isinstance(states, list):
        problems.append(f"'optimizer_states' is {_describe(states)}, not a list")
    else:
        for index, state in enumerate(states):
            if not isinstance(state, Mapping):
                problems.append(f"optimizer state {index} is {_describe(state)}, not a dict")
    schedulers = checkpoint.get("lr_schedulers")
    if not isinstance(schedulers, list) or not all(isinstance(s, Mapping) for s in schedulers):
        problems.append(f"'lr_schedulers' is {_describe(schedulers)}, not a list of dicts")
    loops = checkpoint.get("loops")
    if loops is not None and not (
        isinstance(loops, Mapping) and isinstance(loops.get("fit_loop"), Mapping)
    ):
        problems.append(f"'loops' is {_describe(loops)} without a 'fit_loop' dict")
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint's training state is malformed: "
            + "; ".join(problems[:6])
            + ". It was edited or written by an incompatible version: resume from another "
            "checkpoint"
        )


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def _short(value: Any) -> str:
    return repr(value)[:40] if isinstance(value, (str, int, float)) else _describe(value)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if value is None:
        return "None"
    if isinstance(value, dict) and not value:
        return "an empty dict"
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
