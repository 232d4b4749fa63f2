"""lora_lightning: LoRA for any PyTorch Lightning module, configured from Hydra.

The core (config, layers, injection, merge, adapter files) needs only torch and safetensors;
:class:`LoRACallback` adds the Lightning integration.
"""

from lora_lightning.adapter import load_adapter, save_adapter
from lora_lightning.config import LoRAConfig
from lora_lightning.errors import (
    AdapterFileError,
    CheckpointMismatchError,
    LoRAConfigError,
    LoRAError,
    LoRAStateError,
    UnsupportedModuleError,
)
from lora_lightning.inject import inject_lora
from lora_lightning.merge import merge_lora, unload_lora, unmerge_lora
from lora_lightning.state import ParameterCounts, count_parameters, lora_state_dict

__all__ = [
    "AdapterFileError",
    "CheckpointMismatchError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRAStateError",
    "ParameterCounts",
    "UnsupportedModuleError",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy import
    # The callback imports Lightning; load it only when asked so the core stays torch-only.
    if name == "LoRACallback":
        from lora_lightning.callback import LoRACallback

        return LoRACallback
    raise AttributeError(f"module 'lora_lightning' has no attribute {name!r}")
