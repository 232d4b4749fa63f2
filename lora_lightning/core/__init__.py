"""The LoRA core: needs only ``torch`` and ``safetensors``; never imports ``lightning``,
``hydra``, ``wandb``, ``transformers`` or the rest of this package (``tests/test_layering.py``).

=================  ===============================================================
module             owns
=================  ===============================================================
``errors``         the exception types
``config``         ``LoRAConfig``, its validation, name patterns, config comparison
``state``          every mark LoRA puts on a model and every query about them
``kernels``        the Linear-style LoRA autograd functions and dropout masks
``layers``         one adapted layer: kinds, shapes, init, attach/detach, forward hook
``fusion``         query/key/value sharing one ``A`` product
``dora``           the DoRA variant (magnitude, exact cheap row norm, forward, merge)
``variants``       the variant protocol and registry the core asks (DoRA today)
``kinds``          the names of the layer kinds
``inits``          the init registry (name, base-changing, kinds, function, data step)
``plan``           ``plan_lora``: what an injection will do, checked, model untouched
``inject``         ``inject_lora`` / ``apply_plan``: all or nothing
``merge``          merge, unmerge, unload, merged state dicts
``loraplus``       LoRA+ optimizer groups (B faster than A), schedulers kept in step
``peft_format``    PEFT's keys and ``adapter_config.json``, both ways
``model_checks``   model features PEFT computes differently (tied saved modules, ...), refused
``files``          atomic file and directory writes
``tensor_checks``  whether loaded or saved tensors fit the model (shared rules)
``loading``        reading an adapter directory and checking it; installing it
``adapter``        ``save_adapter`` / ``load_adapter``
``bank``           many named adapters on one base: load by name, list, delete, shared checks
``switch``         ``set_active_adapter``: which adapter computes, in place where layouts match
``hotswap``        ``hotswap_adapter``: new values into an adapter's existing parameters
``combine``        ``combine_adapters``: weighted combinations (PEFT's ``add_weighted_adapter``)
``mixed``          ``mixed_batch_forward``: each row of a batch with its own adapter
=================  ===============================================================
"""

from lora_lightning.core.adapter import load_adapter, save_adapter
from lora_lightning.core.bank import active_adapter, delete_adapter, list_adapters
from lora_lightning.core.combine import combine_adapters
from lora_lightning.core.config import LoRAConfig, config_diff
from lora_lightning.core.errors import (
    AdapterFileError,
    AdapterWriteError,
    CheckpointMismatchError,
    LoRAConfigError,
    LoRAError,
    LoRAStateError,
    UnsupportedModuleError,
)
from lora_lightning.core.hotswap import hotswap_adapter
from lora_lightning.core.inject import apply_plan, inject_lora, prepare_lora
from lora_lightning.core.loraplus import apply_loraplus, loraplus_param_groups
from lora_lightning.core.merge import merge_lora, merged_state_dict, unload_lora, unmerge_lora
from lora_lightning.core.mixed import mixed_batch_forward
from lora_lightning.core.plan import LoRAPlan, TargetPlan, plan_lora
from lora_lightning.core.serving import ServingCompatibilityWarning, vllm_unsupported
from lora_lightning.core.state import (
    ParameterCounts,
    adapted_layers,
    config_of,
    count_parameters,
    export_root,
    lora_state_dict,
    trainable_names,
)
from lora_lightning.core.switch import set_active_adapter

__all__ = [
    "ServingCompatibilityWarning",
    "vllm_unsupported",
    "AdapterFileError",
    "AdapterWriteError",
    "CheckpointMismatchError",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRAPlan",
    "LoRAStateError",
    "ParameterCounts",
    "TargetPlan",
    "UnsupportedModuleError",
    "active_adapter",
    "adapted_layers",
    "apply_loraplus",
    "apply_plan",
    "combine_adapters",
    "config_diff",
    "config_of",
    "count_parameters",
    "delete_adapter",
    "export_root",
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
    "trainable_names",
    "unload_lora",
    "unmerge_lora",
]
