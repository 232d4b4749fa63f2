"""Hugging Face PEFT's adapter format: file names, tensor keys, and ``adapter_config.json``.

Owns: the translation between this project's state (module names, :class:`LoRAConfig`, layer
kinds) and PEFT's on-disk form, in both directions, and the validation of what a file says.
Pure functions on dicts and tensors: reading bytes is ``core.files``' job (here only
``safetensors.load_file``), changing a model is ``core.adapter``'s. Must not import:
``core.inject``, ``core.adapter``, Lightning. ``docs/peft-format.md`` is the field-by-field
table of what PEFT writes and what this project does with it.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``) and ``base_model.model.<name>`` for
``modules_to_save`` parameters and trained biases.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.core.config import DTYPES, LoRAConfig
from lora_lightning.core.errors import AdapterFileError
from lora_lightning.core.files import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402 - re-exported
from lora_lightning.core.layers import EMBEDDING, GPT2_CONV1D
from lora_lightning.core.state import LoRALayer

PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(
    r"(?P<path>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))"
)


def parse_adapter_config(text: str, path: Path) -> dict[str, Any]:
    """Parse and type-check the text of ``adapter_config.json`` (read from ``path``); a
    non-LoRA adapter or a PEFT feature this project does not implement is an error.

    Raises:
        AdapterFileError: naming the file, the field and what would be valid.
    """
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from None
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


def file_modules(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, int]:
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


def config_from_peft(
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
        f"{n} (tensors r={rank}, config r={pattern_value(rank_config, n, r)})"
        for n, rank in file_modules.items()
        if pattern_value(rank_config, n, r) != rank
    ]
    if inconsistent:
        raise AdapterFileError(
            f"{directory}: the ranks in {WEIGHTS_FILE} disagree with r / rank_pattern in "
            f"{CONFIG_FILE} for {inconsistent[:5]}; the scaling lora_alpha / r would be wrong. "
            "Expected lora_A of shape [r, ...] with r from rank_pattern, else r"
        )
    rank_pattern = {re.escape(n): rank for n, rank in file_modules.items() if rank != r}
    alphas = {n: float(pattern_value(alpha_pattern, n, alpha)) for n in file_modules}
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
        # PEFT lists its task's usual heads (``classifier``, ``score``) whether the model has
        # them or not: keep the entries that name a module here; the tensors decide the rest.
        modules_to_save=[
            rf"(.*\.)?{re.escape(m)}"
            for m in peft.get("modules_to_save") or []
            if any(n == m or n.endswith("." + m) for n in names)
        ],
    )


def peft_config(
    config: LoRAConfig, modules: list[tuple[str, nn.Module, LoRALayer]], saved: list[str]
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


def to_peft_key(name: str, kinds: dict[str, str]) -> str:
    path, _, leaf = name.rpartition(".")
    owner, _, part = path.rpartition(".")
    if leaf == "weight" and part in ("lora_A", "lora_B") and kinds.get(owner) == EMBEDDING:
        return f"{PREFIX}{owner}.lora_embedding_{part[-1]}"
    return PREFIX + name


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
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
