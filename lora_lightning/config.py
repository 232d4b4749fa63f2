"""`LoRAConfig`: every LoRA hyperparameter, validated at construction.

The dataclass is also the Hydra structured-config schema of the ``lora`` config group, so its
field types stay within what OmegaConf supports (no callables: ``target_fn`` is an argument of
:func:`lora_lightning.inject_lora` instead).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_lightning.errors import LoRAConfigError

#: Names accepted by ``LoRAConfig.dtype`` (``auto`` = the dtype of the adapted base weight).
DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "auto": None,
}
INITS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "lora_only", "all")

#: Attention query/key/value projections of BERT-, RoBERTa-, Llama- and Mistral-style models.
DEFAULT_TARGETS = [r"(.*\.)?(query|key|value|q_proj|k_proj|v_proj)"]


def _default_targets() -> list[str]:
    return list(DEFAULT_TARGETS)


@dataclass
class LoRAConfig:
    """LoRA hyperparameters. A frozen layer ``W x`` becomes ``W x + s · B A dropout(x)``.

    Args:
        r: rank of ``A`` (``r x in``) and ``B`` (``out x r``); int >= 1.
        alpha: scaling numerator: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter input, in [0, 1); 0 adds no dropout op.
        seed: seeds A's initialisation per module (seed + module name), so every rank and
            every run builds the same adapters whatever else is targeted.
        dtype: adapter parameter dtype: float32, float16, bfloat16, float64, or ``auto``.
        target_modules: regexes full-matched against module qualified names.
        exclude_modules: regexes of modules never adapted.
        rank_pattern: regex -> rank overriding ``r``; 0 means "no adapter on this module".
        alpha_pattern: regex -> alpha overriding ``alpha``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: A's init, ``kaiming`` (uniform, a=sqrt(5)) or ``gaussian`` (std 1/r).
        bias: which biases train: ``none``, ``lora_only`` (of adapted modules), ``all``.
        modules_to_save: regexes of modules trained in full and saved with the adapter.
        fuse_shared_input: adapted Linear siblings reading the same input (query/key/value)
            run their A matrices as one matmul behind one dropout mask, and dropout masks on
            CPU come from 16-bit uniform draws (the drop probability rounded to a multiple of
            2**-16: 0.1 -> 0.1000061), both faster. ``False`` reproduces PEFT draw for draw: a
            ``torch.nn.Dropout`` mask per module. Same maths either way when dropout is 0.

    Raises:
        LoRAConfigError: on any invalid value, naming the field, the value and what is allowed.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    target_modules: list[str] = field(default_factory=_default_targets)
    exclude_modules: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    fuse_shared_input: bool = True

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig/DictConfig: normalise to plain containers first.
        self.target_modules = _as_str_list("target_modules", self.target_modules)
        self.exclude_modules = _as_str_list("exclude_modules", self.exclude_modules)
        self.modules_to_save = _as_str_list("modules_to_save", self.modules_to_save)
        self.rank_pattern = _as_dict("rank_pattern", self.rank_pattern)
        self.alpha_pattern = _as_dict("alpha_pattern", self.alpha_pattern)
        self._validate()

    def _validate(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_positive_number("alpha", self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= float(self.dropout) < 1.0)
        ):
            raise LoRAConfigError(
                f"lora.dropout={self.dropout!r} is invalid: expected a number in [0, 1)"
            )
        _check_int("seed", self.seed, minimum=0)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("init", self.init, INITS)
        _check_choice("bias", self.bias, BIAS_MODES)
        for flag in ("use_rslora", "fuse_shared_input"):
            if not isinstance(getattr(self, flag), bool):
                raise LoRAConfigError(
                    f"lora.{flag}={getattr(self, flag)!r} is invalid: expected true or false"
                )
        if not self.target_modules:
            raise LoRAConfigError(
                "lora.target_modules=[] is invalid: give at least one regex "
                f"(default: {DEFAULT_TARGETS})"
            )
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            for pattern in getattr(self, name):
                compile_pattern(name, pattern)
        for pattern, rank in self.rank_pattern.items():
            compile_pattern("rank_pattern", pattern)
            _check_int(f"rank_pattern[{pattern!r}]", rank, minimum=0)
        for pattern, alpha in self.alpha_pattern.items():
            compile_pattern("alpha_pattern", pattern)
            _check_positive_number(f"alpha_pattern[{pattern!r}]", alpha)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The adapter dtype, or None for ``auto`` (follow the base weight)."""
        return DTYPES[self.dtype]

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first full-matching ``rank_pattern`` entry, else r."""
        return _first_match(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: the first full-matching ``alpha_pattern``, else alpha."""
        return float(_first_match(self.alpha_pattern, name, self.alpha))

    def scaling(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        """Build from a mapping; unknown keys are an error naming them and the valid fields."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoRAConfigError(
                f"unknown LoRA config field(s) {unknown}: valid fields are {sorted(known)}"
            )
        return cls(**values)


def compile_pattern(field_name: str, pattern: Any) -> re.Pattern[str]:
    """Compile one module regex, or raise an error naming the field and the regex."""
    if not isinstance(pattern, str):
        raise LoRAConfigError(
            f"lora.{field_name} entry {pattern!r} is invalid: expected a regex string"
        )
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LoRAConfigError(
            f"lora.{field_name} regex {pattern!r} does not compile ({err}); "
            "expected a Python regular expression full-matched against module names "
            r"such as '.*\.query'"
        ) from None


def _first_match(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.fullmatch(pattern, name):
            return value
    return default


def _as_str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected a list of regex strings"
        ) from None
    return items


def _as_dict(name: str, value: Any) -> dict[str, Any]:
    try:
        return {key: value[key] for key in value.keys()}
    except (AttributeError, TypeError):
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected a mapping of regex -> number"
        ) from None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LoRAConfigError(f"lora.{name}={value!r} is invalid: expected an integer >= {minimum}")


def _check_positive_number(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise LoRAConfigError(f"lora.{name}={value!r} is invalid: expected a number > 0")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected one of {', '.join(allowed)}"
        )
