"""Hugging Face PEFT's adapter format: file names, tensor keys, and ``adapter_config.json``.

Owns: the translation between this project's state (module names, :class:`LoRAConfig`, layer
kinds) and PEFT's on-disk form, in both directions, and the validation of what a file says:
every PEFT feature whose maths this project does not implement is refused by name, never
loaded as plain LoRA. Pure functions on dicts, tensors and a read-only model: reading bytes is
``core.files``' job (here only ``safetensors.load_file``), changing a model is
``core.adapter``'s. Must not import: ``core.inject``, ``core.adapter``, Lightning.
``docs/peft-format.md`` is the field-by-field table of what PEFT writes and what this project
does with it (ground truth: ``peft/utils/save_and_load.py`` and ``peft/tuners/lora/`` of the
installed PEFT).

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Key forms, all
under ``base_model.model.`` (PEFT's adapter name is not in the keys)::

    <path>.lora_A.weight / .lora_B.weight        adapter of a Linear, Conv1D or ConvNd
    <path>.lora_embedding_A / .lora_embedding_B  adapter of an Embedding
    <path>.<variant tensor>                      a variant's (core.variants), e.g. DoRA's
                                                 lora_magnitude_vector (use_dora: true)
    <path>.base_layer.bias                       bias of an adapted layer (bias != "none")
    <path>.bias                                  any other trained bias (bias="all")
    <module>.<param>                             modules_to_save parameters
    <path>.base_layer.weight, <embedding>.weight base weights PEFT adds (save_embedding_layers,
                                                 resized vocabulary): checked equal to the
                                                 model's, then dropped
    <module>.original_module.* / .modules_to_save.*   duplicates PEFT writes with bias="all"
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.core import variants
from lora_lightning.core.config import DTYPES, LoRAConfig
from lora_lightning.core.errors import AdapterFileError
from lora_lightning.core.files import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402 - re-exported
from lora_lightning.core.inits import find_init
from lora_lightning.core.layers import EMBEDDING, GPT2_CONV1D
from lora_lightning.core.model_checks import check_model_features, tied_elsewhere
from lora_lightning.core.state import LoRALayer

PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(
    r"(?P<path>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))"
)

#: LoraConfig fields that switch on maths this project does not implement: field ->
#: (the feature's name, what to do instead). A file with any of them set is refused.
UNSUPPORTED_FIELDS: dict[str, tuple[str, str]] = {
    "lora_bias": ("a bias on lora_B (lora_bias)", "merge it in PEFT (merge_and_unload), or "
                  "train with lora_bias=False"),
    "alora_invocation_tokens": ("activated LoRA (aLoRA: the adapter applies only from the "
                                "invocation tokens on)", "use PEFT to run it"),
    "target_parameters": ("LoRA on raw nn.Parameters (target_parameters, e.g. MoE experts)",
                          "use PEFT, or target nn.Linear modules"),
    "layer_replication": ("layer replication (layer_replication: layers are stacked again, "
                          "each copy with its own adapter)", "use PEFT to run it"),
    "trainable_token_indices": ("trainable tokens (trainable_token_indices: a delta on chosen "
                                "embedding rows)", "merge it in PEFT (merge_and_unload), or "
                                "train without trainable_token_indices"),
    "megatron_config": ("Megatron parallel layers (megatron_config)", "gather the adapter into "
                        "plain nn.Linear LoRA weights with Megatron, then write a plain file"),
    "use_qalora": ("QA-LoRA (use_qalora: pooled adapter input)", "use PEFT to run it"),
    "velora_config": ("VeLoRA (velora_config)", "train with velora_config=None"),
    "monteclora_config": ("MonteCLoRA (monteclora_config)", "use PEFT to run it"),
    "use_bdlora": ("block-diagonal LoRA (use_bdlora)", "use PEFT to run it"),
    "arrow_config": ("Arrow routing between adapters (arrow_config)", "use PEFT to run it"),
    "kasa_config": ("KaSA (kasa_config: lora_diag and a truncated base weight)",
                    "use PEFT to run it"),
}  # fmt: skip
#: init_lora_weights values whose adapter is plain LoRA on the unmodified base model.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
#: init_lora_weights values (prefixes) that also change the base weights: such a file is
#: correct only on the modified base model, unless PEFT converted it on saving.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: LoraConfig fields (with PeftConfig's) that a file may hold with any value: read by the
#: mapping (r, lora_alpha, patterns, dropout, rslora, bias, modules_to_save, use_dora,
#: init_lora_weights, ensure_weight_tying; fan_in_fan_out: the layer type decides), describing the file only (task_type...), choosing
#: modules at injection time where the file's tensors name the modules (target_modules,
#: exclude_modules, layers_to_transform, layers_pattern), used only to initialise (eva, corda,
#: lora_ga, loftq configs: base-changing inits are refused through init_lora_weights), meaningful
#: only with a refused field (megatron_core, qalora_group_size), or never saved (runtime_config:
#: PEFT's to_dict drops it and its loader ignores it).
SUPPORTED_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "ensure_weight_tying", "runtime_config",
    *variants.peft_fields(),
})  # fmt: skip
#: LoraConfig fields refused by name when set (:data:`UNSUPPORTED_FIELDS`).
REFUSED_FIELDS = frozenset(UNSUPPORTED_FIELDS)
#: Every field PEFT 0.21's LoraConfig has; any other field with a value is refused: a newer
#: PEFT feature might change the maths.
KNOWN_FIELDS = SUPPORTED_FIELDS | REFUSED_FIELDS
#: Tensor-name parts that only PEFT features this project refuses write: part -> feature.
_FEATURE_KEYS = {
    "lora_B.bias": "a bias on lora_B (lora_bias)",
    "lora_embedding_B.bias": "a bias on lora_B (lora_bias)",
    "trainable_tokens_": "trainable tokens (trainable_token_indices)",
    "lora_velora_": "VeLoRA (velora_config)",
    "lora_diag": "KaSA (kasa_config)",
    "lora_E": "AdaLoRA",
    "lora_ranknum": "AdaLoRA",
}
_LORA_PART = re.compile(r"\.lora_\w+")
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                  *variants.tensor_parts()}  # fmt: skip


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
    check_supported_features(config, path)
    _expect(path, config, "r", int, lambda v: v >= 1, "an integer >= 1")
    _expect(path, config, "lora_alpha", (int, float), lambda v: math.isfinite(v) and v > 0,
            "a number > 0")  # fmt: skip
    _expect(path, config, "lora_dropout", (int, float), lambda v: 0 <= v < 1,
            "a number in [0, 1)", default=0.0)  # fmt: skip
    _expect(path, config, "use_rslora", bool, lambda v: True, "true or false", default=False)
    for field in variants.peft_fields():
        if not isinstance(config.get(field, False), (bool, type(None))):
            raise AdapterFileError(
                f"{path}: {field}={config[field]!r} is invalid; expected true or false"
            )
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
    """Module path -> rank for every adapter in the file (rank = ``lora_A`` rows).

    Raises:
        AdapterFileError: a key outside ``base_model.model.``, no adapter at all, an adapter
            matrix with fewer than 2 dimensions or no values, or tensors only a refused PEFT
            feature writes (``lora_B.bias``, ``lora_diag``...), naming
            the feature.
    """
    outside = [k for k in tensors if not k.startswith(PREFIX)]
    if outside:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: keys must start with {PREFIX!r} (PEFT's format); "
            f"got {outside[:5]}"
        )
    features = _refused_features(tensors)
    if features:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE} holds tensors of PEFT features this project does not "
            f"implement: {'; '.join(features)}; loading it as plain LoRA would compute something "
            "else, so it is refused (see docs/peft-format.md for what to do instead)"
        )
    # A matrix is at least 2-D and holds values; a 0-d, 1-D or empty one is a damaged file or
    # one FSDP rank's slice (PEFT refuses those too), never something to read a rank from.
    flat = [
        f"{key} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
        for key, t in tensors.items()
        if _ADAPTER_KEY.fullmatch(key[len(PREFIX) :])
        and not (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.numel() > 0)
    ]
    if flat:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: adapter matrices must be non-empty tensors of 2 or more "
            f"dimensions ([r, in] / [out, r]); got {flat[:4]}. The file is damaged or holds one "
            "rank's slice of a sharded save; save it again from the gathered model"
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
    """A LoRAConfig that injects exactly the file's modules with PEFT's alpha semantics.

    Every name in it is an exact full-match pattern (``^<name>$``), so no module of another
    name is selected; ``modules_to_save`` follows PEFT's rule (a module whose name ends with
    an entry, see :func:`peft_modules_to_save`). Each feature is read, and refused where this
    project would compute something else, by its own helper below.

    Raises:
        AdapterFileError: modules the model lacks; mixed or non-float dtypes; ranks that
            disagree with the config; a model feature PEFT computes differently
            (``core.model_checks``); ``ensure_weight_tying`` on tied modules; a
            variant's tensors without its flag (DoRA magnitudes without ``use_dora: true``),
            or the flag without them.
    """
    names = dict(model.named_modules())
    _check_targets_exist(file_modules, names, directory)
    dtype = _adapter_dtype(tensors, directory)
    r, alpha = int(peft["r"]), float(peft["lora_alpha"])
    _check_ranks(peft, file_modules, r, directory)
    saved = _modules_to_save(peft, file_modules, model, list(names), directory)
    alphas = {
        n: float(pattern_value(peft.get("alpha_pattern") or {}, n, alpha)) for n in file_modules
    }
    return LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(peft.get("lora_dropout", 0.0)),
        dtype=dtype,
        target_modules=[_exact(n) for n in file_modules],
        rank_pattern={_exact(n): rank for n, rank in file_modules.items() if rank != r},
        alpha_pattern={_exact(n): a for n, a in alphas.items() if a != alpha},
        use_rslora=bool(peft.get("use_rslora", False)),
        bias=peft.get("bias", "none"),
        modules_to_save=[_exact(n) for n in saved],
        **_variant_flags(peft, tensors, directory),
    )


def _check_targets_exist(file_modules: dict[str, int], names: dict, directory: Path) -> None:
    unknown = sorted(set(file_modules) - set(names))
    if unknown:
        raise AdapterFileError(
            f"adapter {directory} targets modules the model does not have: {unknown[:8]}; "
            "was it saved for another base model (or for a wrapper around this one)?"
        )


def _adapter_dtype(tensors: dict[str, torch.Tensor], directory: Path) -> str:
    """The ``LoRAConfig.dtype`` name of the file's adapter tensors (one float dtype)."""
    dtype_names = {v: k for k, v in DTYPES.items() if v is not None}
    dtypes = {t.dtype for key, t in tensors.items() if ".lora_" in key}
    if len(dtypes) != 1 or next(iter(dtypes)) not in dtype_names:
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: adapter tensors must share one float dtype of "
            f"{sorted(dtype_names.values())}, found {sorted(map(str, dtypes))}"
        )
    return dtype_names[dtypes.pop()]


def _check_ranks(
    peft: dict[str, Any], file_modules: dict[str, int], r: int, directory: Path
) -> None:
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


def _modules_to_save(
    peft: dict[str, Any],
    file_modules: dict[str, int],
    model: nn.Module,
    names: list[str],
    directory: Path,
) -> list[str]:
    """The modules trained in full, once the model's adapted and saved modules are checked
    (``core.model_checks``) and ``ensure_weight_tying`` is refused on tied ones."""
    # PEFT lists its task's usual heads (``classifier``, ``score``) whether the model has them
    # or not: entries naming no module here select nothing; the tensors decide the rest.
    saved = peft_modules_to_save(peft.get("modules_to_save") or [], names)
    _check_saved_entries_exist(peft.get("modules_to_save") or [], names, directory)
    check_model_features(model, list(file_modules), saved, f"adapter {directory}")
    if peft.get("ensure_weight_tying") is True:
        tied = [n for n in [*file_modules, *saved] if tied_elsewhere(model, n)]
        if tied:
            raise AdapterFileError(
                f"{directory / CONFIG_FILE}: ensure_weight_tying=true with tied modules {tied[:4]} "
                "is not supported: PEFT then shares one adapter between the tied layers and "
                "saves it once, so loading it as separate adapters would leave the other layer "
                "unadapted; load it in PEFT, or train with ensure_weight_tying=false"
            )
    return saved


def _variant_flags(
    peft: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
) -> dict[str, bool]:
    """``LoRAConfig`` flag -> value for every variant (``core.variants``), each checked against
    the file: the variant's tensors are there iff its field says so."""
    flags = {}
    for variant in variants.VARIANTS.values():
        field, enabled = variant.peft_field, peft.get(variant.peft_field) is True
        found = sorted(k for k in tensors if k.endswith(tuple(f".{t}" for t in variant.tensors)))
        if enabled and not found:
            raise AdapterFileError(
                f"{directory}: {CONFIG_FILE} says {field}=true but {WEIGHTS_FILE} holds no "
                f"{variant.tensor_label} (<module>.{'/'.join(variant.tensors)}); the file is "
                "incomplete or its config edited"
            )
        if found and not enabled:
            raise AdapterFileError(
                f"{directory}: {WEIGHTS_FILE} holds {variant.tensor_label} ({found[0]}, ...) "
                f"but {CONFIG_FILE} says {field}=false; loading it as plain LoRA would compute "
                f"something else. Set {field} to true if the adapter was trained with it"
            )
        flags[variant.config_field] = enabled
    return flags


def peft_modules_to_save(entries: list[str], names: list[str]) -> list[str]:
    """The modules PEFT trains in full for ``modules_to_save=entries``, among ``names``.

    PEFT's rule (``_set_trainable`` in ``peft/utils/other.py``) is a plain string suffix:
    ``classifier`` also selects ``pre_classifier``. Only the outermost of nested matches.
    """
    found = [n for n in names if n and any(n.endswith(e) for e in entries)]
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


#: The heads PEFT's sequence/token classification models add to ``modules_to_save`` whether
#: the model has them or not (``classifier_module_names`` in ``peft/peft_model.py``).
PEFT_TASK_HEADS = ("classifier", "score")


def _check_saved_entries_exist(entries: list[str], names: list[str], directory: Path) -> None:
    """Every ``modules_to_save`` entry of a file selects a module of the model, except PEFT's
    automatic task heads (:data:`PEFT_TASK_HEADS`): a trained module the model lacks would
    be dropped without a word.

    Raises:
        AdapterFileError: naming the entries and the model's close module names.
    """
    missing = [
        e for e in entries if e not in PEFT_TASK_HEADS and not peft_modules_to_save([e], names)
    ]
    if missing:
        close = [n for e in missing for n in names if n and e.rsplit(".", 1)[-1] in n][:5]
        raise AdapterFileError(
            f"adapter {directory}: {CONFIG_FILE} lists modules_to_save {missing} (trained in "
            f"full), and the model has no such module{f' (close: {close})' if close else ''}; "
            "loading would silently drop them. Load it into the model it was trained on"
        )


def without_saved_base_weights(
    tensors: dict[str, torch.Tensor],
    peft: dict[str, Any],
    model: nn.Module,
    file_modules: dict[str, int],
    directory: Path,
) -> dict[str, torch.Tensor]:
    """``tensors`` without the base-model weights PEFT writes beside an adapter, each checked
    equal (shape and values) to the model's own.

    PEFT adds ``<path>.base_layer.weight`` for a targeted embedding or ``lm_head``
    (``save_embedding_layers="auto"``), the whole ``<embedding>.weight`` for a resized
    vocabulary or ``save_embedding_layers=True``, and with ``bias="all"`` copies of a
    ``modules_to_save`` module's biases (``.original_module.`` / ``.modules_to_save.``).
    This project loads adapters, never base weights: equal ones are redundant, different
    ones mean the adapter was trained on another base, and are refused.

    Raises:
        AdapterFileError: naming each differing tensor and the PEFT option that wrote it.
    """
    names = [n for n, _ in model.named_modules()]
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = peft_modules_to_save(peft.get("modules_to_save") or [], names)
    embeddings = set(_embedding_names(model)) - set(saved)
    kept, problems = {}, []
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :]
        path, _, leaf = name.rpartition(".")
        owner, _, part = path.rpartition(".")
        if part == "base_layer" and owner in file_modules and leaf != "bias":
            base, why = f"{owner}.{leaf}", "save_embedding_layers"
        elif path in embeddings:
            base, why = name, "a resized vocabulary or save_embedding_layers=True"
        elif part in ("original_module", "modules_to_save") and owner in saved:
            copy = tensors.get(f"{PREFIX}{owner}.{leaf}")
            if part == "original_module" or (copy is not None and torch.equal(copy, tensor)):
                continue  # the original is not used while the saved copy is; a duplicate
            kept[key] = tensor
            continue
        else:
            kept[key] = tensor
            continue
        param = params.get(base)
        if param is None:
            kept[key] = tensor  # reported as unexpected by the caller
        elif tuple(param.shape) != tuple(tensor.shape):
            problems.append(
                f"{key} ({why}): shape {tuple(tensor.shape)}, the model's {base} has "
                f"{tuple(param.shape)}"
            )
        elif param.device.type != "meta" and not torch.equal(
            tensor.to(param.dtype), param.detach().cpu()
        ):
            problems.append(f"{key} ({why}): values differ from the model's {base}")
    if problems:
        listed = "\n  ".join(problems[:8])
        raise AdapterFileError(
            f"adapter {directory} carries base-model weights that PEFT saved beside the adapter, "
            f"and they are not this model's:\n  {listed}\nThis project loads adapters only, "
            "never base weights, so the outputs would not be PEFT's. Give the model those "
            "weights first (for a resized vocabulary: model.resize_token_embeddings(n), then "
            "copy the rows from the file), then load the adapter"
        )
    return kept


def check_supported_features(config: dict[str, Any], path: Path) -> None:
    """Refuse, by name, every feature set in a PEFT ``adapter_config.json`` (read from
    ``path``) whose maths this project does not implement.

    Refused: the fields in :data:`UNSUPPORTED_FIELDS` when set; ``init_lora_weights`` of
    PiSSA, OLoRA, CorDA, LoRA-GA (unless PEFT converted the file on saving, which writes
    ``true``) and LoftQ; any field this project does not know that holds a value.

    Raises:
        AdapterFileError: naming the field, the feature, and what to do instead.
    """
    for field, (feature, instead) in UNSUPPORTED_FIELDS.items():
        value = config.get(field)
        strict = field in ("lora_bias", "use_qalora")
        if not (value is None or value is False or (not strict and value in ([], {}))):
            raise AdapterFileError(
                f"{path}: {field}={value!r} is not supported: {feature} computes something "
                f"else than plain LoRA, the only maths this project implements; expected false "
                f"or null. Instead, {instead}"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{path}: init_lora_weights={init!r} is not supported: this initialisation also "
            "changes the base model's weights, so the file gives PEFT's outputs only on that "
            "modified base. Save PiSSA and OLoRA adapters converted: here with "
            "save_adapter(model, dir, convert_to_plain_lora=True) (LoRACallback does so by "
            "default); for PiSSA, OLoRA, CorDA and LoRA-GA in PEFT with save_pretrained(dir, "
            "path_initial_model_for_weight_conversion=<the adapter saved before training>). "
            "Either writes a plain LoRA file (init_lora_weights=true, rank 2r) for the original "
            "base; a LoftQ adapter belongs to its LoftQ-quantized base: run it in PEFT"
        )
    if not (init is None or isinstance(init, bool) or init in PLAIN_INITS):
        raise AdapterFileError(
            f"{path}: init_lora_weights={init!r} is not known; expected one of "
            f"{[v for v in PLAIN_INITS]} (or a converted file, which says true)"
        )
    unknown = sorted(k for k, v in config.items() if k not in KNOWN_FIELDS and _is_set(v))
    if unknown:
        raise AdapterFileError(
            f"{path}: field(s) {unknown} are not known to this project (written by PEFT "
            f"{config.get('peft_version')!r}?) and hold values; a newer PEFT feature may change "
            "the maths, so the file is refused. If a field does not change the forward pass, "
            "remove it from the file"
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
        # PiSSA/OLoRA keep PEFT's name: the file is then refused on a stock base (see
        # check_supported_features) unless written converted (init "kaiming" here).
        "init_lora_weights": find_init(config.init).file_name(config.init),
        "inference_mode": True,
        **{v.peft_field: v.enabled(config) for v in variants.VARIANTS.values()},
    }


def to_peft_key(name: str, kinds: dict[str, str]) -> str:
    """PEFT's key for the tensor this project calls ``name`` (``kinds``: adapted layer name ->
    layer kind): embedding adapters are ``lora_embedding_A``/``_B`` without ``.weight``; the
    bias of an adapted layer is ``<path>.base_layer.bias`` (PEFT wraps the layer; its loader
    ignores a plain ``<path>.bias`` without a warning)."""
    path, _, leaf = name.rpartition(".")
    owner, _, part = path.rpartition(".")
    if leaf == "weight" and part in ("lora_A", "lora_B") and kinds.get(owner) == EMBEDDING:
        return f"{PREFIX}{owner}.lora_embedding_{part[-1]}"
    if leaf == "bias" and path in kinds:
        return f"{PREFIX}{path}.base_layer.bias"
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


def unmapped_fields(fields: Iterable[str]) -> list[str]:
    """The names among ``fields`` (e.g. a PEFT ``LoraConfig``'s) that this mapping neither
    supports (:data:`SUPPORTED_FIELDS`) nor refuses by name (:data:`REFUSED_FIELDS`), sorted:
    a file setting one of them is refused only as "not known", without saying what to do."""
    return sorted(set(fields) - KNOWN_FIELDS)


def _exact(name: str) -> str:
    """A target pattern that full-matches ``name`` only (a plain name would also match
    ``<anything>.<name>``)."""
    return f"^{re.escape(name)}$"


def _is_set(value: Any) -> bool:
    return not (value is None or value is False or value in ([], {}, ""))


def _embedding_names(model: nn.Module) -> list[str]:
    """Names of the model's input and output embeddings (Hugging Face models only: they say
    which they are through ``get_input_embeddings``/``get_output_embeddings``)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            layer = None
        found += [n for n, m in model.named_modules() if layer is not None and m is layer]
    return found


def _refused_features(tensors: dict[str, torch.Tensor]) -> list[str]:
    """``"<feature> (<n> tensor(s), e.g. <key>)"`` for every refused feature whose tensors
    are in ``tensors``."""
    found: dict[str, list[str]] = {}
    for key in tensors:
        feature = next((f for part, f in _FEATURE_KEYS.items() if part in key), None)
        unknown = {m[1:] for m in _LORA_PART.findall(key)} - _ADAPTER_PARTS
        if feature is None and unknown:
            feature = f"a LoRA variant this project does not know ({min(unknown)})"
        if feature is not None:
            found.setdefault(feature, []).append(key)
    return [f"{f} ({len(keys)} tensor(s), e.g. {keys[0]})" for f, keys in found.items()]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
