"""lora_lightning: LoRA for any PyTorch Lightning module, configured from Hydra.

Packages, dependencies pointing one way (``tests/test_layering.py`` checks it)::

    app/ (Hydra application) ──> lightning/ (LoRACallback) ──> core/ (torch + safetensors)
    tasks/ (the default SST-2 task: knows nothing of LoRA; its evaluate CLI loads adapters)

Importing this package loads the core only; :class:`LoRACallback` (and with it Lightning) is
imported on first use.
"""

from lora_lightning.core import (
    AdapterFileError,
    CheckpointMismatchError,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    LoRAPlan,
    LoRAStateError,
    ParameterCounts,
    UnsupportedModuleError,
    apply_plan,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    plan_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

__all__ = [
    "AdapterFileError",
    "CheckpointMismatchError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRAPlan",
    "LoRAStateError",
    "ParameterCounts",
    "UnsupportedModuleError",
    "apply_plan",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "plan_lora",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy import
    # The callback imports Lightning; load it only when asked so the core stays torch-only.
    if name == "LoRACallback":
        from lora_lightning.lightning import LoRACallback

        return LoRACallback
    raise AttributeError(f"module 'lora_lightning' has no attribute {name!r}")
