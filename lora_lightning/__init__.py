"""lora_lightning: LoRA for any PyTorch Lightning module, configured from Hydra.

Packages, dependencies pointing one way (``tests/test_layering.py`` checks it)::

    app/ (Hydra application) ──> lightning/ (LoRACallback) ──> core/ (torch + safetensors)
    tasks/ (the default SST-2 task: knows nothing of LoRA; its evaluate CLI loads adapters)

Importing this package loads nothing yet: the core loads on first use of a name, and
:class:`LoRACallback` (and with it Lightning) only when it is used.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first use
    from lora_lightning.core import (
        AdapterFileError,
        AdapterWriteError,
        CheckpointMismatchError,
        LoRAConfig,
        LoRAConfigError,
        LoRAError,
        LoRAPlan,
        LoRAStateError,
        ParameterCounts,
        ServingCompatibilityWarning,
        UnsupportedModuleError,
        active_adapter,
        apply_loraplus,
        apply_plan,
        combine_adapters,
        count_parameters,
        delete_adapter,
        hotswap_adapter,
        inject_lora,
        list_adapters,
        load_adapter,
        lora_state_dict,
        loraplus_param_groups,
        merge_lora,
        merged_state_dict,
        mixed_batch_forward,
        plan_lora,
        prepare_lora,
        save_adapter,
        set_active_adapter,
        unload_lora,
        unmerge_lora,
        vllm_unsupported,
    )
    from lora_lightning.lightning import LoRACallback, RNGStateCallback

__all__ = [
    "AdapterFileError",
    "AdapterWriteError",
    "CheckpointMismatchError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRAPlan",
    "LoRAStateError",
    "ParameterCounts",
    "RNGStateCallback",
    "ServingCompatibilityWarning",
    "UnsupportedModuleError",
    "active_adapter",
    "apply_loraplus",
    "apply_plan",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "hotswap_adapter",
    "inject_lora",
    "list_adapters",
    "load_adapter",
    "lora_state_dict",
    "loraplus_param_groups",
    "merge_lora",
    "merged_state_dict",
    "mixed_batch_forward",
    "plan_lora",
    "prepare_lora",
    "save_adapter",
    "set_active_adapter",
    "unload_lora",
    "unmerge_lora",
    "vllm_unsupported",
]

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy import
    # Names load on first use: ``import lora_lightning.tasks`` then imports no LoRA code, and
    # the callback (which imports Lightning) loads only when asked, so the core stays torch-only.
    if name in ("LoRACallback", "RNGStateCallback"):
        import lora_lightning.lightning

        return getattr(lora_lightning.lightning, name)
    if name in __all__:
        import lora_lightning.core

        return getattr(lora_lightning.core, name)
    raise AttributeError(f"module 'lora_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
