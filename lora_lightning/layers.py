"""The LoRA parts attached to one adapted layer, and the maths they compute.

Design (after Lorax): the adapted layer stays where it is with its own parameters untouched;
``lora_A`` and ``lora_B`` become its children (so the state dict gains
``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` and renames nothing), and a forward hook
turns the layer's output ``W x`` into ``W x + s · B A dropout(x)``.

Weights are stored in the shapes Hugging Face PEFT uses on disk:

============  =========================  ======================
layer         ``lora_A.weight``          ``lora_B.weight``
============  =========================  ======================
Linear        ``[r, in]``                ``[out, r]``
GPT-2 Conv1D  ``[r, in]``                ``[out, r]``
ConvNd        ``[r, in, *kernel]``       ``[out, r, 1, ...]``
Embedding     ``[r, num_embeddings]``    ``[dim, r]``
============  =========================  ======================
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.errors import LoRAStateError, UnsupportedModuleError

LINEAR, GPT2_CONV1D, CONV, EMBEDDING = "linear", "gpt2_conv1d", "conv", "embedding"
SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding or GPT-2-style Conv1D"
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAWeight(nn.Module):
    """Holds one adapter matrix as ``.weight`` so its state-dict key is ``<part>.weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


@dataclass
class LoRASpec:
    """What was attached to one layer: kept in the layer's ``__dict__`` as ``_lora``."""

    kind: str
    r: int
    alpha: float
    scaling: float
    dropout: float
    config: Any = None  # the LoRAConfig that asked for this adapter
    merged: bool = False
    handle: Any = None  # the forward hook's RemovableHandle


def layer_kind(module: nn.Module) -> str | None:
    """The LoRA layer kind of ``module``, or None if LoRA cannot adapt it.

    GPT-2's ``Conv1D`` (weight stored ``in x out``) is recognised by shape and attributes so
    that transformers need not be imported.
    """
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    ):
        return GPT2_CONV1D
    return None


def get_spec(module: nn.Module) -> LoRASpec | None:
    """The LoRA spec attached to ``module``, or None if it is not adapted."""
    return module.__dict__.get("_lora")


def adapter_shapes(module: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of ``(lora_A.weight, lora_B.weight)`` for a layer of ``kind`` at rank ``r``."""
    weight = module.weight
    if kind == LINEAR:
        return (r, weight.shape[1]), (weight.shape[0], r)
    if kind == GPT2_CONV1D:
        return (r, weight.shape[0]), (weight.shape[1], r)
    if kind == EMBEDDING:
        return (r, weight.shape[0]), (weight.shape[1], r)
    out_channels, in_channels, *kernel = weight.shape
    return (r, in_channels, *kernel), (out_channels, r, *([1] * len(kernel)))


def attach(
    module: nn.Module,
    name: str,
    *,
    r: int,
    alpha: float,
    scaling: float,
    dropout: float,
    dtype: torch.dtype | None,
    init: str,
    seed: int,
    config: Any = None,
) -> LoRASpec:
    """Attach ``lora_A``/``lora_B`` (and dropout) to ``module`` and hook its forward.

    Raises:
        UnsupportedModuleError: if ``module`` is not a supported layer type or configuration.
    """
    kind = check_supported(module, name)
    base = module.weight
    dtype = dtype or base.dtype
    shape_a, shape_b = adapter_shapes(module, kind, r)
    if base.device.type == "meta":
        # No memory and no init on meta: real values arrive with load_state_dict/to_empty.
        a = torch.empty(shape_a, dtype=dtype, device="meta")
        b = torch.empty(shape_b, dtype=dtype, device="meta")
    else:
        a, b = _init_weights(kind, shape_a, shape_b, init, r, seed, name)
        a, b = a.to(base.device, dtype), b.to(base.device, dtype)
    module.lora_A = LoRAWeight(a)
    module.lora_B = LoRAWeight(b)
    if dropout > 0 and kind != EMBEDDING:
        module.lora_dropout = nn.Dropout(dropout)
    spec = LoRASpec(kind=kind, r=r, alpha=alpha, scaling=scaling, dropout=dropout, config=config)
    spec.handle = module.register_forward_hook(_lora_forward_hook)
    module.__dict__["_lora"] = spec
    return spec


def check_supported(module: nn.Module, name: str) -> str:
    """The layer kind of ``module`` (named ``name``), if LoRA can adapt it.

    Raises:
        UnsupportedModuleError: naming the module, its type and the supported types.
    """
    kind = layer_kind(module)
    if kind is None:
        raise UnsupportedModuleError(
            f"module {name!r} is a {type(module).__name__}, which LoRA cannot adapt: "
            f"targets must be {SUPPORTED}; adjust lora.target_modules or lora.exclude_modules"
        )
    if kind == CONV and (module.groups != 1 or module.padding_mode != "zeros"):
        raise UnsupportedModuleError(
            f"module {name!r} is a {type(module).__name__} with groups={module.groups}, "
            f"padding_mode={module.padding_mode!r}: LoRA supports convolutions with groups=1 "
            "and padding_mode='zeros' only"
        )
    return kind


def detach(module: nn.Module) -> None:
    """Remove every LoRA part from ``module`` (hook, A, B, dropout); the layer is plain again."""
    spec = module.__dict__.pop("_lora")
    spec.handle.remove()
    for part in ("lora_A", "lora_B", "lora_dropout"):
        if hasattr(module, part):
            delattr(module, part)


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the config seed and the module name, stable across processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_weights(
    kind: str,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    init: str,
    r: int,
    seed: int,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded init on CPU in float32 so every device and dtype starts from the same numbers.

    A linear/conv adapter gets A random, B zeros (Hu et al. 2021), so the model is unchanged at
    step 0. An embedding adapter follows PEFT instead (A zeros, B normal): A is ``[r, vocab]``,
    where a fan-in init over the vocabulary would give near-zero, slow-learning values.
    """
    generator = torch.Generator().manual_seed(module_seed(seed, name))
    if kind == EMBEDDING:
        a = torch.zeros(shape_a)
        b = torch.empty(shape_b).normal_(generator=generator)
        return a, b
    return _lora_a_init(shape_a, init, r, generator), torch.zeros(shape_b)


def _lora_a_init(
    shape: tuple[int, ...], init: str, r: int, generator: torch.Generator
) -> torch.Tensor:
    a = torch.empty(shape)
    if init == "gaussian":
        return a.normal_(0.0, 1.0 / r, generator=generator)
    # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT do: bound = 1 / sqrt(fan_in).
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def lora_delta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unscaled low-rank term ``B A dropout(x)`` of one adapted layer.

    Shapes: Linear/Conv1D ``(..., in) -> (..., out)``; ConvNd ``(N, in, *spatial) ->
    (N, out, *spatial_out)``; Embedding integer ids ``(...) -> (..., dim)``. The input is cast
    to the adapter dtype; the result stays in the adapter dtype.
    """
    spec: LoRASpec = module.__dict__["_lora"]
    a, b = module.lora_A.weight, module.lora_B.weight
    if spec.kind == EMBEDDING:
        hidden = F.embedding(
            x, a.t(), module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, module.sparse,
        )  # fmt: skip
        return hidden @ b.t()
    dropout = module._modules.get("lora_dropout")
    if dropout is not None:
        x = dropout(x)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    if spec.kind == CONV:
        conv = _CONV_FN[a.dim() - 2]
        hidden = conv(x, a, None, module.stride, module.padding, module.dilation)
        return conv(hidden, b)
    return F.linear(F.linear(x, a), b)


def _lora_forward_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    """``W x`` -> ``W x + s · B A dropout(x)``; a merged layer already holds the term in W."""
    spec: LoRASpec = module.__dict__["_lora"]
    if spec.merged:
        if module.training and torch.is_grad_enabled() and module.lora_A.weight.requires_grad:
            raise LoRAStateError(
                "a merged LoRA layer is being trained: gradients would reach only the frozen "
                "base weight; call unmerge_lora(model) before training"
            )
        return output
    delta = lora_delta(module, args[0])
    return torch.add(output, delta.to(output.dtype), alpha=spec.scaling)


def delta_weight(module: nn.Module) -> torch.Tensor:
    """``s · B A`` in float32 (float64 for a float64 adapter), in the base ``weight``'s layout.

    Computed in at least float32 whatever the adapter dtype so that merging into a bf16/fp16
    base rounds once, at the final cast (see PEFT issue 1388).
    """
    spec: LoRASpec = module.__dict__["_lora"]
    dtype = torch.promote_types(module.lora_A.weight.dtype, torch.float32)
    a = module.lora_A.weight.to(dtype)
    b = module.lora_B.weight.to(dtype)
    if spec.kind == LINEAR:
        delta = b @ a
    elif spec.kind in (GPT2_CONV1D, EMBEDDING):
        delta = (b @ a).t()
    else:
        delta = torch.einsum("or,ri...->oi...", b.flatten(1), a)
    return delta * spec.scaling
