"""`LoRAConfig`: every LoRA hyperparameter, and the one place that says what is valid.

Owns: the config dataclass, its validation and normalisation (:meth:`LoRAConfig.validate`,
run at construction *and* again by every operation that uses a config, so a mutated dataclass
cannot slip through), module-name patterns (:class:`NamePattern`) and config comparison
(:func:`config_diff`). Must not import: anything outside ``torch``, ``core.errors`` and the
init registry ``core.inits`` (which names the valid ``init`` values).

The dataclass is also the Hydra structured-config schema of the ``lora`` config group, so its
field types stay within what OmegaConf supports (no callables: ``target_fn`` is an argument of
:func:`lora_lightning.inject_lora` instead).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lora_lightning.core.errors import LoRAConfigError
from lora_lightning.core.eva import EvaConfig
from lora_lightning.core.inits import find_init, init_names
from lora_lightning.core.lora_ga import LoraGAConfig

#: Names accepted by ``LoRAConfig.dtype`` (``auto`` = the dtype of the adapted base weight).
DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "auto": None,
}
#: Names accepted by ``LoRAConfig.init``: the init registry's (``core.inits``).
INITS = init_names()
BIAS_MODES = ("none", "lora_only", "all")
DROPOUT_MASKS = ("fast", "torch")
#: Values of ``quantize_base`` (``core.quantize.SCHEMES``; kept here so config imports only torch).
#: The largest rank accepted: above every layer's smaller dimension in today's models, and far
#: below the sizes that overflow inside torch (``r=10**20``) or exhaust memory at allocation.
MAX_RANK = 65536
QUANTIZE_BASE = ("none", "nf4", "int8")
#: Values of ``quantize_scope``: which frozen ``nn.Linear`` weights ``quantize_base`` stores.
QUANTIZE_SCOPES = ("adapted", "all_linear")

#: ``dataclasses.field`` metadata of a forward variant's flag (``use_dora``): the variant
#: itself (its tensors, forward, files) is ``core.variants``' business; the config knows only
#: that such a flag is a boolean and that a forward variant computes on the float base weight
#: it was given, so it refuses a base-changing ``init`` and ``quantize_base`` with one on.
#: Every flag so marked must be some registered variant's ``config_field`` (``core.variants``
#: refuses one that is not, never dropping it).
VARIANT_FLAG = {"variant_flag": True}

#: Attention query/key/value projections of BERT-, RoBERTa-, Llama- and Mistral-style models.
DEFAULT_TARGETS = [r"(.*\.)?(query|key|value|q_proj|k_proj|v_proj)"]

#: An entry made only of these characters is a plain module name (PEFT's rule: it matches a
#: module whose name is the entry or ends with ``.<entry>``); anything else is a regex.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _default_targets() -> list[str]:
    return list(DEFAULT_TARGETS)


@dataclass
class LoRAConfig:
    """LoRA hyperparameters. A frozen layer ``W x`` becomes ``W x + s · B A dropout(x)``.

    Args:
        r: rank of ``A`` (``r x in``) and ``B`` (``out x r``); int in [1, MAX_RANK] (65536).
        alpha: scaling numerator: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter input, in [0, 1); 0 adds no dropout op.
        seed: seeds A's initialisation per module (seed + module name), so every rank and
            every run builds the same adapters whatever else is targeted.
        dtype: adapter parameter dtype: float32, float16, bfloat16, float64, or ``auto``.
        target_modules: module names; a plain name (``q_proj``, ``layer.0.query``) matches a
            module called so or whose name ends with ``.<name>`` (as in PEFT), anything else
            is a regex full-matched against the qualified name. Every entry must match.
        exclude_modules: names or regexes (same rule) of modules never adapted.
        rank_pattern: name/regex -> rank overriding ``r``; 0 means "no adapter on this module".
        alpha_pattern: name/regex -> alpha overriding ``alpha``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: A's init (the names of ``core.inits``' registry), ``kaiming`` (uniform,
            a=sqrt(5)) or ``gaussian`` (std 1/r); ``eva`` (PEFT's EVA: A from the principal
            components of each layer's inputs on the first training batches, ranks
            redistributed, see ``eva_config`` and ``core.eva``); ``lora_ga`` (PEFT's LoRA-GA:
            A0, B0 from the SVD of each layer's weight gradient on the first training
            batches, the base weight becoming ``W - s·B0 A0``; see ``core.lora_ga``); or an init
            that also changes the base weight, as PEFT: ``pissa`` (A, B from the top ``r``
            singular vectors of W), ``pissa_niter_<k>`` (the same by randomised SVD with
            ``k`` iterations, seeded per module), ``olora`` (A, B from W's QR); the base
            weight becomes ``W - s·B0 A0``. Linear (PiSSA also GPT-2 Conv1D) targets only; an
            adapter file of such a run is correct on the stock base only converted
            (``save_adapter(..., convert_to_plain_lora=True)``).
        bias: which biases train: ``none``, ``lora_only`` (of adapted modules), ``all``.
        modules_to_save: names/regexes of modules trained in full and saved with the adapter.
        group_shared_input: adapted Linear siblings reading the same input (query/key/value)
            run their A matrices as one matmul behind one dropout mask. Same maths as
            per-module adapters when dropout is 0; with dropout the siblings share a mask.
        dropout_masks: how CPU dropout masks are drawn: ``fast`` cuts 16-bit uniforms from
            random 64-bit words (the drop probability rounded to a multiple of 2**-16:
            0.1 -> 0.1000061), ``torch`` draws ``torch.nn.Dropout``'s exact masks. With
            ``group_shared_input=False`` and ``torch`` masks the draws are PEFT's, mask for mask.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): the adapted weight
            becomes ``m ⊙ (W + s·B A) / ||W + s·B A||_row`` with a trained magnitude ``m``
            per output feature (``lora_magnitude_vector``, initialised to ``||W||_row``).
            Linear and GPT-2 Conv1D targets only (see ``core.dora``).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024, PEFT's ``create_loraplus_optimizer``):
            B matrices (and other 1-D trained tensors) learn at ``lr x ratio``; number > 0,
            or None (off). Optimizer-only: the adapters are the same (see ``core.loraplus``).
        loraplus_lr_embedding: with LoRA+, the learning rate of embedding adapters (both
            matrices), absolute as in PEFT; number > 0 (PEFT's default 1e-6).
        quantize_base: QLoRA: the frozen base weights of adapted layers stored quantized,
            ``none`` (default), ``nf4`` (4-bit NormalFloat, blocks of 64, double-quantized
            scales, as QLoRA) or ``int8`` (symmetric, per output row); the adapters compute in
            ``dtype`` on top. nn.Linear targets only; needs torchao (``pip install
            'lora-lightning[quant]'``). ``merge_lora`` refuses a quantized base (use
            ``merged_state_dict``); not with ``use_dora`` or a PiSSA/OLoRA ``init``. Other
            frozen layers stay as they are unless ``quantize_scope`` says otherwise (see
            ``core.quantize``).
        quantize_scope: which base weights ``quantize_base`` stores quantized: ``adapted``
            (default) the adapted layers' only; ``all_linear`` also every other frozen
            ``nn.Linear`` (not adapted, not in ``modules_to_save``, weight not tied), as QLoRA
            does. A frozen Linear the scheme cannot store (nf4: a size not a multiple of
            16384; a tied or meta weight) stays float and is listed in the plan
            (``LoRAPlan.kept_float``); only the weight is quantized, a bias stays float.
            Needs ``quantize_base`` other than ``none``. Not written to adapter files.
        eva_config: the options of ``init="eva"`` (PEFT's ``EvaConfig``: ``rho``, ``tau``,
            ``use_label_mask``, ``label_mask_value``, ``whiten``, ``adjust_scaling_factors``;
            see ``core.eva``), a mapping or an ``EvaConfig``; unused by the other inits.
        lora_ga_config: the options of ``init="lora_ga"`` (PEFT's ``LoraGAConfig``:
            ``direction``, ``scale``, ``stable_gamma``; see ``core.lora_ga``).
        fuse_shared_input: deprecated (configs before 0.2): ``true`` means
            ``group_shared_input=true, dropout_masks=fast``; ``false`` means ``false, torch``.

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
    group_shared_input: bool = True
    dropout_masks: str = "fast"
    use_dora: bool = field(default=False, metadata=VARIANT_FLAG)
    loraplus_lr_ratio: Optional[float] = None  # noqa: UP045 - OmegaConf needs Optional
    loraplus_lr_embedding: float = 1e-6
    quantize_base: str = "none"
    quantize_scope: str = "adapted"
    eva_config: EvaConfig = field(default_factory=EvaConfig)
    lora_ga_config: LoraGAConfig = field(default_factory=LoraGAConfig)
    fuse_shared_input: Optional[bool] = None  # noqa: UP045 - OmegaConf needs Optional

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> LoRAConfig:
        """Check every field and normalise it in place (plain containers, Python numbers).

        Called at construction and again by every operation that uses the config, so a field
        changed after construction (``config.r = -1``) is caught before it is used. Integral
        and real numbers of any type (``numpy.int64(4)``) are accepted and stored as
        ``int``/``float``.

        Returns:
            ``self``, for chaining.

        Raises:
            LoRAConfigError: naming the field, the bad value and what is allowed.
        """
        self.r = _integer("r", self.r, minimum=1, maximum=MAX_RANK)
        self.alpha = _positive_number("alpha", self.alpha)
        self.dropout = _number_in("dropout", self.dropout, 0.0, 1.0)
        self.seed = _integer("seed", self.seed, minimum=0)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        find_init(self.init)  # raises on a name the registry does not know
        self.eva_config = _sub_config("eva_config", self.eva_config, EvaConfig)
        self.lora_ga_config = _sub_config("lora_ga_config", self.lora_ga_config, LoraGAConfig)
        _check_choice("bias", self.bias, BIAS_MODES)
        _check_choice("dropout_masks", self.dropout_masks, DROPOUT_MASKS)
        self.use_rslora = _flag("use_rslora", self.use_rslora)
        self.group_shared_input = _flag("group_shared_input", self.group_shared_input)
        flags = variant_flags()
        for name in flags:
            setattr(self, name, _flag(name, getattr(self, name)))
        variant = next((f"lora.{n}=true" for n in flags if getattr(self, n)), None)
        if variant and self.changes_base:
            raise LoRAConfigError(
                f"lora.init={self.init!r} with {variant} is not supported: use one of them "
                f"(init={self.init!r} rewrites the base weight the variant's forward reads; "
                "that combination is not implemented)"
            )
        _check_choice("quantize_base", self.quantize_base, QUANTIZE_BASE)
        if self.quantize_base != "none" and (variant or self.changes_base):
            other = variant or f"lora.init={self.init!r}"
            raise LoRAConfigError(
                f"lora.quantize_base={self.quantize_base!r} with {other} is not supported: "
                "a forward variant (its weight norm) and a base-rewriting init (PiSSA/OLoRA) "
                "need the float base; use quantize_base=none, or plain LoRA (every variant "
                "flag false, init=kaiming/gaussian)"
            )
        _check_choice("quantize_scope", self.quantize_scope, QUANTIZE_SCOPES)
        if self.quantize_scope != "adapted" and self.quantize_base == "none":
            raise LoRAConfigError(
                f"lora.quantize_scope={self.quantize_scope!r} with lora.quantize_base='none' "
                "quantizes nothing: set quantize_base to nf4 or int8, or quantize_scope=adapted"
            )
        if self.loraplus_lr_ratio is not None:
            self.loraplus_lr_ratio = _positive_number("loraplus_lr_ratio", self.loraplus_lr_ratio)
        self.loraplus_lr_embedding = _positive_number(
            "loraplus_lr_embedding", self.loraplus_lr_embedding
        )
        if self.fuse_shared_input is not None:
            legacy = _flag("fuse_shared_input", self.fuse_shared_input)
            self.group_shared_input = legacy
            self.dropout_masks = "fast" if legacy else "torch"
            self.fuse_shared_input = None
        self.target_modules = _pattern_list("target_modules", self.target_modules)
        self.exclude_modules = _pattern_list("exclude_modules", self.exclude_modules)
        self.modules_to_save = _pattern_list("modules_to_save", self.modules_to_save)
        if not self.target_modules:
            raise LoRAConfigError(
                "lora.target_modules=[] is invalid: give at least one regex or module name "
                f"(default: {DEFAULT_TARGETS})"
            )
        self.rank_pattern = {
            key: _integer(f"rank_pattern[{key!r}]", value, minimum=0, maximum=MAX_RANK)
            for key, value in _pattern_dict("rank_pattern", self.rank_pattern).items()
        }
        self.alpha_pattern = {
            key: _positive_number(f"alpha_pattern[{key!r}]", value)
            for key, value in _pattern_dict("alpha_pattern", self.alpha_pattern).items()
        }
        return self

    @property
    def changes_base(self) -> bool:
        """True if ``init`` also changes the adapted base weights (PiSSA, OLoRA)."""
        return find_init(self.init).changes_base

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The adapter dtype, or None for ``auto`` (follow the base weight)."""
        return DTYPES[self.dtype]

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first matching ``rank_pattern`` entry, else r."""
        return int(_first_match("rank_pattern", self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: the first matching ``alpha_pattern``, else alpha."""
        return float(_first_match("alpha_pattern", self.alpha_pattern, name, self.alpha))

    def scaling(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of every field (after validation)."""
        self.validate()
        values = dataclasses.asdict(self)
        values.pop("fuse_shared_input")  # always folded into the two fields it stood for
        return values

    @classmethod
    def from_dict(cls, values: Any) -> LoRAConfig:
        """Build from a mapping; unknown keys are an error naming them and the valid fields."""
        if not hasattr(values, "keys"):
            raise LoRAConfigError(
                f"a LoRA config must be a mapping of field -> value, got {type(values).__name__}"
            )
        values = {key: values[key] for key in values.keys()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise LoRAConfigError(
                f"unknown LoRA config field(s) {unknown}: valid fields are {sorted(known)}"
            )
        return cls(**values)


def variant_flags() -> tuple[str, ...]:
    """The ``LoRAConfig`` fields marked :data:`VARIANT_FLAG` (``use_dora``...), in order."""
    return tuple(f.name for f in dataclasses.fields(LoRAConfig) if f.metadata.get("variant_flag"))


def config_diff(
    old: LoRAConfig | dict[str, Any],
    new: LoRAConfig | dict[str, Any],
    labels: tuple[str, str] | None = None,
) -> list[str]:
    """Human-readable ``field: old -> new`` for every field that differs (empty when equal);
    with ``labels=("checkpoint", "now")``: ``field: checkpoint old vs now new``.

    Both sides are normalised first (dicts through :meth:`LoRAConfig.from_dict`, which also
    reads configs written before a field was renamed), so ``4`` equals ``4.0`` and a list
    equals a tuple.

    Raises:
        LoRAConfigError: if either side is not a valid config.
    """
    before = _as_config(old).to_dict()
    after = _as_config(new).to_dict()
    first, second = labels or ("", "")
    sep = f" vs {second} " if labels else " -> "
    return [
        f"{key}: {first + ' ' if first else ''}{before[key]!r}{sep}{after[key]!r}"
        for key in after
        if before[key] != after[key]
    ]


def _as_config(value: LoRAConfig | dict[str, Any]) -> LoRAConfig:
    if isinstance(value, LoRAConfig):
        return value.validate()
    return LoRAConfig.from_dict(value)


class NamePattern:
    """One entry of ``target_modules``/``exclude_modules``/``modules_to_save``/patterns.

    A plain name (letters, digits, ``_``, ``.``, ``-``) matches a module called exactly so or
    whose qualified name ends with ``.<entry>`` (PEFT's rule for list entries: ``q_proj``
    matches ``model.layers.0.self_attn.q_proj``); anything else is a regex full-matched
    against the qualified name.
    """

    def __init__(self, field_name: str, entry: Any) -> None:
        if not isinstance(entry, str):
            raise LoRAConfigError(
                f"lora.{field_name} entry {entry!r} ({type(entry).__name__}) is invalid: "
                "expected a module name or regex string"
            )
        self.field_name = field_name
        self.entry = entry
        self.plain = bool(_PLAIN_NAME.fullmatch(entry))
        try:
            self._regex = re.compile(entry)
        except re.error as err:
            raise LoRAConfigError(
                f"lora.{field_name} regex {entry!r} does not compile ({err}); expected a module "
                r"name such as 'query' or a Python regular expression full-matched against "
                r"module names such as '.*\.query'"
            ) from None

    def matches(self, name: str) -> bool:
        """True if module ``name`` is selected by this entry."""
        if self.plain:
            return name == self.entry or name.endswith("." + self.entry)
        return self._regex.fullmatch(name) is not None

    def __repr__(self) -> str:
        return repr(self.entry)


def compile_patterns(field_name: str, entries: list[str]) -> list[NamePattern]:
    """:class:`NamePattern` of every entry, or an error naming the field and the entry."""
    return [NamePattern(field_name, entry) for entry in entries]


def _first_match(field_name: str, patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if NamePattern(field_name, key).matches(name):
            return value
    return default


def _pattern_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, bytearray)) or not _iterable(value) or hasattr(value, "keys"):
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected a list of regex strings or module names"
        )
    items = list(value)
    for entry in items:
        NamePattern(name, entry)
    return items


def _pattern_dict(name: str, value: Any) -> dict[str, Any]:
    if not hasattr(value, "keys"):
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected a mapping of regex -> number (or module name -> number)"
        )
    items = {key: value[key] for key in value.keys()}
    for key in items:
        NamePattern(name, key)
    return items


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise LoRAConfigError(f"lora.{name}={value!r} is invalid: expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected an integer in [{minimum}, {maximum}] "
            "(a rank above a layer's smaller dimension adds nothing a full-rank update has not)"
        )
    return int(value)


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def positive_number(label: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number > 0: the one check behind every
    alpha, learning rate and LoRA+ ratio, wherever it enters (config field or function
    argument), so no entry point lets ``inf`` or NaN through.

    Raises:
        LoRAConfigError: ``"<label>=<value> is invalid: expected a finite number > 0"``.
    """
    number = _real(value)
    if number is None or number <= 0:
        raise LoRAConfigError(f"{label}={value!r} is invalid: expected a finite number > 0")
    return number


def non_negative_number(label: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number >= 0 (a weight decay, say).

    Raises:
        LoRAConfigError: ``"<label>=<value> is invalid: expected a finite number >= 0"``.
    """
    number = _real(value)
    if number is None or number < 0:
        raise LoRAConfigError(f"{label}={value!r} is invalid: expected a finite number >= 0")
    return number


def _positive_number(name: str, value: Any) -> float:
    return positive_number(f"lora.{name}", value)


def _number_in(name: str, value: Any, low: float, high: float) -> float:
    number = _real(value)
    if number is None or not low <= number < high:
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected a number in [{low:g}, {high:g})"
        )
    return number


def _sub_config(name: str, value: Any, kind: type) -> Any:
    """An init's options (``eva_config``...) as a validated ``kind``, from an instance (copied,
    so configs never share one) or a mapping of its fields."""
    known = [f.name for f in dataclasses.fields(kind)]
    if isinstance(value, kind):
        value = dataclasses.asdict(value)
    if not hasattr(value, "keys"):
        raise LoRAConfigError(f"lora.{name}={value!r} is invalid: expected a mapping of {known}")
    values = {key: value[key] for key in value.keys()}
    if unknown := sorted(map(str, set(values) - set(known))):
        raise LoRAConfigError(f"unknown lora.{name} field(s) {unknown}: valid fields are {known}")
    return kind(**values).validate()


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LoRAConfigError(f"lora.{name}={value!r} is invalid: expected true or false")
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise LoRAConfigError(
            f"lora.{name}={value!r} is invalid: expected one of {', '.join(allowed)}"
        )
