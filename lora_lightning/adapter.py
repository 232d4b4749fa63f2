"""Adapter directories in Hugging Face PEFT's format: `save_adapter` and `load_adapter`.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``) and ``base_model.model.<name>`` for
``modules_to_save`` parameters and trained biases. PEFT reads what is written here and this
module reads what PEFT writes. Nothing is ever unpickled: weights are safetensors only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lightning.config import DTYPES, LoRAConfig
from lora_lightning.errors import AdapterFileError, LoRAStateError
from lora_lightning.inject import adapted_modules, inject_lora, lora_config_of, saved_modules
from lora_lightning.layers import EMBEDDING, GPT2_CONV1D
from lora_lightning.merge import unload_lora
from lora_lightning.state import lora_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(
    r"(?P<path>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))"
)


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``model``'s adapter as a PEFT-format directory, atomically.

    Args:
        model: the adapted model; saved paths are relative to it (pass the Hugging Face model
            itself, not a wrapper holding it, for an adapter PEFT loads onto the stock model).
        directory: created if missing; an adapter already there is replaced only once the new
            files are complete on disk.
        state_dict: take tensors from this mapping (keys relative to ``model``) instead of the
            live parameters, e.g. from a checkpoint gathered under FSDP.
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.

    Returns:
        The directory.

    Raises:
        LoRAStateError: if the model has no adapters or is merged (unmerge first).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: save clean names
    modules = list(adapted_modules(model))
    config = lora_config_of(model)
    if not modules or config is None:
        raise LoRAStateError(
            "save_adapter: the model has no LoRA adapters; call inject_lora(model, config) first"
        )
    if any(spec.merged for _, _, spec in modules):
        raise LoRAStateError(
            "save_adapter: the model is merged, so its base weights already contain the "
            "adapters; call unmerge_lora(model) before saving, or save the merged weights"
        )
    tensors = lora_state_dict(model)
    if state_dict is not None:
        missing = sorted(set(tensors) - set(state_dict))
        if missing:
            raise LoRAStateError(f"save_adapter: state_dict lacks adapter tensors {missing[:8]}")
        tensors = {name: state_dict[name] for name in tensors}
    kinds = {name: spec.kind for name, _, spec in modules}
    peft_tensors = {
        _to_peft_key(name, kinds): t.detach().to("cpu").contiguous() for name, t in tensors.items()
    }
    peft_config = _peft_config(config, modules, [n for n, _ in saved_modules(model)])
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Both files are written and fsynced in a hidden sibling folder first: a full disk or a
    # crash while writing never touches an adapter already at ``directory``.
    staging = directory.resolve().with_name(f".{directory.resolve().name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _atomic_write(staging / WEIGHTS_FILE, lambda tmp: save_file(peft_tensors, str(tmp)))
        _atomic_write(
            staging / CONFIG_FILE,
            lambda tmp: tmp.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n"),
        )
        if directory.is_dir() and any(directory.iterdir()):
            # Then renames only, weights first, config last. A crash between the two renames
            # leaves the new weights beside the old config: exactly the new adapter when the
            # config did not change (the callback's repeated per-checkpoint exports); a rank
            # change is caught by load_adapter's rank check.
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(staging / name, directory / name)
            _fsync_directory(directory)
        else:
            # A new adapter appears whole (an empty folder is replaced).
            os.replace(staging, directory)
            _fsync_directory(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Load a PEFT-format LoRA adapter into ``model``, injecting adapters first if needed.

    Targets and ranks come from the tensors themselves; alpha, dropout, rslora, bias and
    ``modules_to_save`` from ``adapter_config.json`` (PEFT's pattern semantics). If the model
    already has adapters they must be exactly the file's. Names, shapes and dtypes are checked
    against the model and every mismatch is reported at once; nothing is loaded on a mismatch.

    Returns:
        The qualified names of the adapted modules.

    Raises:
        AdapterFileError: missing or unreadable files, a pickle-only ``adapter_model.bin``, a
            non-LoRA adapter, or tensors that do not fit the model.
        LoRAStateError: if the model is merged.
    """
    model = getattr(model, "_orig_mod", model)
    directory = Path(directory)
    peft_config = read_adapter_config(directory)
    tensors = _read_weights(directory)
    file_modules = _file_modules(tensors, directory)
    if any(spec.merged for _, _, spec in adapted_modules(model)):
        raise LoRAStateError(
            "load_adapter: the model is merged; call unmerge_lora(model) before loading"
        )
    existing = {name: spec.r for name, _, spec in adapted_modules(model)}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    if not existing:
        config = _config_from_peft(peft_config, file_modules, tensors, model, directory)
        inject_lora(model, config, target_fn=lambda name, _: name in file_modules)
    elif existing != file_modules:
        raise AdapterFileError(
            f"adapter {directory} does not match the adapters already in the model: "
            + _diff(existing, file_modules)
            + "; load it into a model without adapters, or one injected with the same targets"
        )
    else:
        # Same modules and ranks, but alpha/rslora decide the output too: never load silently
        # under another scaling than the one the adapter was trained with.
        config = _config_from_peft(peft_config, file_modules, tensors, model, directory)
        scalings = [
            f"{n} (model {s.scaling:g}, file {config.scaling(s.r, config.alpha_for(n)):g})"
            for n, _, s in adapted_modules(model)
            if not math.isclose(s.scaling, config.scaling(s.r, config.alpha_for(n)))
        ]
        if scalings:
            raise AdapterFileError(
                f"adapter {directory} was trained with another scaling (lora_alpha / r, or "
                f"alpha / sqrt(r) with use_rslora) than the model's adapters: {scalings[:5]}; "
                "load it into a model without adapters, or inject with the file's alpha"
            )
    kinds = {name: spec.kind for name, _, spec in adapted_modules(model)}
    expected = {_to_peft_key(n, kinds): t for n, t in lora_state_dict(model).items()}
    try:
        _check_fit(expected, tensors, directory)
    except AdapterFileError:
        if not existing:  # undo our injection: a failed load leaves the model as it was
            unload_lora(model, merge=False)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad[name])
        raise
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return list(kinds)


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """Read and type-check ``adapter_config.json``; a non-LoRA adapter is an error.

    Raises:
        AdapterFileError: naming the file, the field and what would be valid.
    """
    if not directory.is_dir():
        state = "is a file, not a folder" if directory.exists() else "does not exist"
        raise AdapterFileError(
            f"adapter directory {directory} {state}; expected a folder with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"{path} is a {config.get('peft_type')!r} adapter; only peft_type 'LORA' is supported"
        )
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag) is not None and config.get(flag) is not False:
            raise AdapterFileError(
                f"{path}: {flag}={config[flag]!r} is not supported; expected false"
            )
    _expect(path, config, "r", int, lambda v: v >= 1, "an integer >= 1")
    _expect(path, config, "lora_alpha", (int, float), lambda v: math.isfinite(v) and v > 0,
            "a number > 0")  # fmt: skip
    _expect(path, config, "lora_dropout", (int, float), lambda v: 0 <= v < 1,
            "a number in [0, 1)", default=0.0)  # fmt: skip
    _expect(path, config, "use_rslora", bool, lambda v: True, "true or false", default=False)
    _expect(path, config, "bias", str, lambda v: v in ("none", "lora_only", "all"),
            "one of none, lora_only, all", default="none")  # fmt: skip
    for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        patterns = config.get(name)
        patterns = {} if patterns is None else patterns
        if not isinstance(patterns, dict) or not all(
            isinstance(k, str)
            and isinstance(v, kind)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
            for k, v in patterns.items()
        ):
            raise AdapterFileError(
                f"{path}: {name}={patterns!r} is invalid; expected an object mapping regex "
                f"strings to {'integers' if kind is int else 'finite numbers'} > 0"
            )
        for key in patterns:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as err:
                raise AdapterFileError(
                    f"{path}: {name} key {key!r} is not a valid regular expression ({err})"
                ) from None
    saved = config.get("modules_to_save")
    saved = [] if saved is None else saved
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise AdapterFileError(
            f"{path}: modules_to_save={saved!r} is invalid; expected a list of module names or null"
        )
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{directory} holds only adapter_model.bin, a pickle file that can run "
                "arbitrary code when loaded, so it is refused; convert it to "
                f"{WEIGHTS_FILE} in a trusted environment"
            )
        raise AdapterFileError(f"{path} is missing; an adapter directory needs {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err})") from None


def _file_modules(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, int]:
    """Module path -> rank for every adapter in the file (rank = ``lora_A`` rows)."""
    outside = [k for k in tensors if not k.startswith(PREFIX)]
    if outside:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: keys must start with {PREFIX!r} (PEFT's format); "
            f"got {outside[:5]}"
        )
    ranks = {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.fullmatch(key[len(PREFIX) :])
        if match and (match["ab"] or match["eab"]) == "A":
            ranks[match["path"]] = int(tensor.shape[0])
    if not ranks:
        raise AdapterFileError(f"{directory / WEIGHTS_FILE} holds no lora_A tensors")
    return ranks


def _config_from_peft(
    peft: dict[str, Any],
    file_modules: dict[str, int],
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    directory: Path,
) -> LoRAConfig:
    """A LoRAConfig that injects exactly the file's modules with PEFT's alpha semantics."""
    names = dict(model.named_modules())
    unknown = sorted(set(file_modules) - set(names))
    if unknown:
        raise AdapterFileError(
            f"adapter {directory} targets modules the model does not have: {unknown[:8]}; "
            "was it saved for another base model (or for a wrapper around this one)?"
        )
    alpha_pattern = peft.get("alpha_pattern") or {}
    dtype_names = {v: k for k, v in DTYPES.items() if v is not None}
    dtypes = {t.dtype for key, t in tensors.items() if ".lora_" in key}
    if len(dtypes) != 1 or next(iter(dtypes)) not in dtype_names:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: adapter tensors must share one float dtype of "
            f"{sorted(dtype_names.values())}, found {sorted(map(str, dtypes))}"
        )
    dtype = dtype_names[dtypes.pop()]
    r = int(peft["r"])
    alpha = float(peft["lora_alpha"])
    # The scaling depends on each module's rank as the config states it (PEFT's rule): a file
    # whose tensors disagree with its own config is inconsistent, not something to guess at.
    rank_config = peft.get("rank_pattern") or {}
    inconsistent = [
        f"{n} (tensors r={rank}, config r={_peft_pattern_value(rank_config, n, r)})"
        for n, rank in file_modules.items()
        if _peft_pattern_value(rank_config, n, r) != rank
    ]
    if inconsistent:
        raise AdapterFileError(
            f"{directory}: the ranks in {WEIGHTS_FILE} disagree with r / rank_pattern in "
            f"{CONFIG_FILE} for {inconsistent[:5]}; the scaling lora_alpha / r would be wrong. "
            "Expected lora_A of shape [r, ...] with r from rank_pattern, else r"
        )
    rank_pattern = {re.escape(n): rank for n, rank in file_modules.items() if rank != r}
    alphas = {n: float(_peft_pattern_value(alpha_pattern, n, alpha)) for n in file_modules}
    return LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(peft.get("lora_dropout", 0.0)),
        dtype=dtype,
        target_modules=[re.escape(n) for n in file_modules],
        rank_pattern=rank_pattern,
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
        use_rslora=bool(peft.get("use_rslora", False)),
        bias=peft.get("bias", "none"),
        modules_to_save=[rf"(.*\.)?{re.escape(m)}" for m in peft.get("modules_to_save") or []],
    )


def _peft_config(
    config: LoRAConfig, modules: list[tuple[str, nn.Module, Any]], saved: list[str]
) -> dict[str, Any]:
    """``adapter_config.json`` contents that make PEFT adapt exactly ``modules``."""
    r = Counter(spec.r for _, _, spec in modules).most_common(1)[0][0]
    alpha = Counter(spec.alpha for _, _, spec in modules).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(config.dropout),
        # A list means "exact name or suffix after a dot" to PEFT: exact names adapt exactly
        # the modules adapted here, whatever regexes selected them.
        "target_modules": sorted(name for name, _, _ in modules),
        "rank_pattern": {re.escape(n): s.r for n, _, s in modules if s.r != r},
        "alpha_pattern": {
            re.escape(n): _number(s.alpha) for n, _, s in modules if s.alpha != alpha
        },
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": any(s.kind == GPT2_CONV1D for _, _, s in modules),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "inference_mode": True,
        "use_dora": False,
    }


def _to_peft_key(name: str, kinds: dict[str, str]) -> str:
    path, _, leaf = name.rpartition(".")
    owner, _, part = path.rpartition(".")
    if leaf == "weight" and part in ("lora_A", "lora_B") and kinds.get(owner) == EMBEDDING:
        return f"{PREFIX}{owner}.lora_embedding_{part[-1]}"
    return PREFIX + name


def _check_fit(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], directory: Path
) -> None:
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    for key in sorted(set(expected) & set(found)):
        want, got = expected[key], found[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} in file, model expects "
                            f"{tuple(want.shape)}")  # fmt: skip
        elif want.dtype != got.dtype:
            problems.append(f"{key}: dtype {got.dtype} in file, model expects {want.dtype}")
    if problems:
        listed = "\n  ".join(problems)
        raise AdapterFileError(
            f"adapter {directory} does not fit the model ({len(problems)} problem(s)):\n  {listed}"
        )


def _diff(have: dict[str, int], want: dict[str, int]) -> str:
    parts = []
    if only_model := sorted(set(have) - set(want)):
        parts.append(f"adapted in the model but not in the file: {only_model[:5]}")
    if only_file := sorted(set(want) - set(have)):
        parts.append(f"in the file but not adapted in the model: {only_file[:5]}")
    both = sorted(set(have) & set(want))
    if ranks := [f"{n} (model r={have[n]}, file r={want[n]})" for n in both if have[n] != want[n]]:
        parts.append(f"rank differs for {ranks[:5]}")
    return "; ".join(parts)


def _peft_pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _expect(path: Path, config: dict[str, Any], field: str, kind: Any, ok: Any, allowed: str,
            default: Any = None) -> None:  # fmt: skip
    if field not in config and default is not None:
        config[field] = default
    value = config.get(field)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not ok(value):
        raise AdapterFileError(f"{path}: {field}={value!r} is invalid; expected {allowed}")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a hidden temp file in the same folder, fsync, then rename over ``path``.

    A failure (disk full, a crash) leaves the previous ``path`` untouched and at most a
    hidden ``.<name>.tmp-<pid>`` file (removed on errors; only a kill can leave one).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
