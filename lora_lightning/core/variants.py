"""LoRA variants: what the core asks of a variant (:class:`Variant`), and the registry of them.

Owns: the protocol a forward variant implements (DoRA today, ``core.dora``) and
:data:`VARIANTS`, the one list of them. Planning, injection, the PEFT format, loading,
multi-adapter operations and serving checks ask this registry; none of them names a variant.
A variant supplies, in its own module:

==========================  ===========================================================
``name``                    the plan's and the layer's name for it (``"dora"``)
``config_field``            the ``LoRAConfig`` flag that enables it (``use_dora``)
``peft_field``              the ``adapter_config.json`` field PEFT writes for it
``tensors``                 the parameters it adds to an adapted layer (state-dict leaf
                            names, PEFT's keys too): nothing else lists them
``tensor_label``            those tensors in words, for messages (``"DoRA magnitudes"``)
``combine_refusal``         why ``combine_adapters`` refuses it (no variant combines yet)
``vllm_refusal``            what vLLM refuses about it, or None
``enabled(config)``         whether a config switches it on
``unsupported_reason``      why a layer (module, kind) cannot take it, or None
``tensor_shapes``           ``(name, shape)`` of each added tensor for one layer
``attach``                  add its tensors to an adapted layer and set ``layer.variant``,
                            the per-layer object that owns forward, merge and unmerge
==========================  ===========================================================

An in-place adapter switch needs the variant flags equal (:func:`config_fields`); a file's
flag and its tensors must agree (``core.peft_format``). Must not import: ``core.plan``,
``core.inject``, ``core.adapter``, Lightning.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from lora_lightning.core import dora
from lora_lightning.core.config import LoRAConfig, variant_flags
from lora_lightning.core.errors import LoRAConfigError, LoRAStateError
from lora_lightning.core.state import LORA_PARTS, LoRALayer


class Variant(Protocol):
    """A forward variant of LoRA: see the module docstring for what each member means."""

    name: str
    config_field: str
    peft_field: str
    tensors: tuple[str, ...]
    tensor_label: str
    combine_refusal: str
    vllm_refusal: str | None

    def enabled(self, config: LoRAConfig) -> bool:
        """True if ``config`` switches this variant on."""
        ...

    def unsupported_reason(self, module: nn.Module, kind: str | None) -> str | None:
        """Why the variant cannot adapt ``module`` of layer ``kind`` (a sentence), or None."""
        ...

    def tensor_shapes(
        self, module: nn.Module, kind: str
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(leaf name, shape)`` of every tensor the variant adds to ``module``."""
        ...

    def attach(self, module: nn.Module, layer: LoRALayer, dtype: torch.dtype) -> None:
        """Add the variant's tensors (in ``dtype``) to adapted ``module`` and set
        ``layer.variant`` to the object that computes its forward and merge."""
        ...


#: Every variant, by name. A new variant is one module and one entry here.
VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (dora.VARIANT,)}


def enabled_variant(config: LoRAConfig) -> Variant | None:
    """The variant ``config`` switches on, or None for plain LoRA.

    Raises:
        LoRAConfigError: more than one variant switched on (they do not compose), or a flag
            the config marks as a variant's (``config.VARIANT_FLAG``) switched on that no
            registered variant claims (it would otherwise be dropped: plain LoRA computed).
    """
    claimed = config_fields()
    unclaimed = [name for name in variant_flags() if getattr(config, name) and name not in claimed]
    if unclaimed:
        known = {name: variant.config_field for name, variant in VARIANTS.items()}
        raise LoRAConfigError(
            f"lora.{unclaimed[0]}=true names a LoRA variant that is not registered; "
            f"registered variants and their flags: {known}"
        )
    found = [v for v in VARIANTS.values() if v.enabled(config)]
    if len(found) > 1:
        flags = ", ".join(f"lora.{v.config_field}=true" for v in found)
        raise LoRAConfigError(f"{flags} together is not supported: use one of them")
    return found[0] if found else None


def variant_named(name: str) -> Variant:
    """The registered variant ``name`` (a plan's ``TargetPlan.variant``).

    Raises:
        LoRAStateError: an unknown name, naming the registered ones.
    """
    if name not in VARIANTS:
        raise LoRAStateError(
            f"LoRA variant {name!r} is not registered; known variants: {sorted(VARIANTS)}"
        )
    return VARIANTS[name]


def config_fields() -> tuple[str, ...]:
    """The ``LoRAConfig`` flags of every variant (``use_dora``...)."""
    return tuple(v.config_field for v in VARIANTS.values())


def peft_fields() -> tuple[str, ...]:
    """The ``adapter_config.json`` fields of every variant."""
    return tuple(v.peft_field for v in VARIANTS.values())


def tensor_parts() -> tuple[str, ...]:
    """The leaf names of every variant's tensors (``lora_magnitude_vector``...)."""
    return tuple(part for v in VARIANTS.values() for part in v.tensors)


def is_adapter_tensor(name: str) -> bool:
    """True for the qualified name of an adapter tensor, in a dict keyed as
    ``lora_state_dict``: ``...lora_A.weight``, ``...lora_B.weight`` or a variant's tensor.
    (On a live model, ``core.state.adapter_parameter_names`` asks the layers instead.)"""
    parts = (*(f"{p}.weight" for p in LORA_PARTS), *tensor_parts())
    return any(name == part or name.endswith("." + part) for part in parts)
