"""The LoRA parts attached to one adapted layer: shapes, initialisation, and its forward hook.

Owns: layer kinds (which module types LoRA can adapt), adapter shapes, :func:`attach`/
:func:`detach` of ``lora_A``/``lora_B`` on one layer (their values from ``core.inits``), the
forward hook, and the layer's ``s · B A`` (:func:`delta_weight`) for merging. Must not import: ``core.inject``,
``core.plan``, ``core.adapter``, Lightning, Hydra.

Design (after Lorax): the adapted layer stays where it is with its own parameters untouched;
``lora_A`` and ``lora_B`` become its children (so the state dict gains
``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` and renames nothing), and a forward hook
turns the layer's output ``W x`` into ``W x + s · B A dropout(x)``::

    x ──> layer (W, frozen) ──────────────> W x ──┐
    │                                             (+) ──> W x + s · B A dropout(x)
    └──> dropout ──> lora_A ──> lora_B ──> · s ───┘
         (p from the config, only in train mode)

Linear and GPT-2 Conv1D layers compute through ``core.kernels`` (two autograd functions with
faster backwards); :func:`reference_delta` is the same maths in plain ops, kept readable. A
layer with a variant (``LoRALayer.variant``, DoRA from ``core.dora``) hands its forward to it.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.core import kernels
from lora_lightning.core.errors import LoRAStateError, UnsupportedModuleError
from lora_lightning.core.inits import InitRequest, find_init, module_seed
from lora_lightning.core.kinds import CONV, EMBEDDING, GPT2_CONV1D, LINEAR, MATMUL_KINDS
from lora_lightning.core.state import (
    AdapterSet,
    LoRALayer,
    active_dropout,
    layer_state,
    pop_layer,
    set_layer,
)

SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding or GPT-2-style Conv1D"
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAWeight(nn.Module):
    """Holds one adapter matrix as ``.weight`` so its state-dict key is ``<part>.weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


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


def unsupported_reason(module: nn.Module) -> str | None:
    """Why LoRA cannot adapt ``module`` (a sentence), or None if it can."""
    kind = layer_kind(module)
    if kind is None:
        return f"a {type(module).__name__}, which LoRA cannot adapt (targets must be {SUPPORTED})"
    if kind == CONV and (module.groups != 1 or module.padding_mode != "zeros"):
        return (
            f"a {type(module).__name__} with groups={module.groups}, padding_mode="
            f"{module.padding_mode!r}: LoRA supports convolutions with groups=1 and "
            "padding_mode='zeros' only"
        )
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        dtype = getattr(weight, "dtype", type(weight).__name__)
        return f"a {type(module).__name__} whose weight is {dtype}, not a floating-point tensor"
    return None


def check_supported(module: nn.Module, name: str) -> str:
    """The layer kind of ``module`` (named ``name``), if LoRA can adapt it.

    Raises:
        UnsupportedModuleError: naming the module, its type and the supported types.
    """
    reason = unsupported_reason(module)
    if reason is not None:
        raise UnsupportedModuleError(
            f"module {name!r} is {reason}; adjust lora.target_modules or lora.exclude_modules"
        )
    return layer_kind(module)


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
    kind: str,
    r: int,
    alpha: float,
    scaling: float,
    dtype: torch.dtype,
    owner: AdapterSet,
    prepared: Any = None,
) -> LoRALayer:
    """Attach ``lora_A``/``lora_B`` to ``module``, hook its forward, and mark it adapted.

    ``A`` and ``B`` come from the config's init (``core.inits``; ``prepared``: what a
    data-dependent init's ``prepare`` found for this layer). The caller (``core.inject``) has
    validated the plan; this only builds. On a ``meta`` weight no memory is allocated and
    nothing is initialised (real values arrive with ``load_state_dict``/``to_empty``).
    """
    base = module.weight
    config = owner.config
    shape_a, shape_b = adapter_shapes(module, kind, r)
    if base.device.type == "meta":
        a = torch.empty(shape_a, dtype=dtype, device="meta")
        b = torch.empty(shape_b, dtype=dtype, device="meta")
        initial = None
    else:
        request = InitRequest(
            weight=base, kind=kind, r=r, scaling=scaling, init=config.init,
            seed=module_seed(config.seed, name), shape_a=tuple(shape_a), shape_b=tuple(shape_b),
            prepared=prepared, config=config,
        )  # fmt: skip
        entry = find_init(config.init)
        if entry.prepare is not None and prepared is None:
            # apply_plan allowed it only with values_follow: loading overwrites these at once.
            entry = find_init("kaiming")
        a, b, residual = entry.function(request)
        a, b = a.to(base.device, dtype), b.to(base.device, dtype)
        initial = None
        if residual is not None:  # the init changed the base weight to W - s·B0 A0
            initial = (a.detach().clone(), b.detach().clone())
            with torch.no_grad():
                base.copy_(residual)  # the caller keeps the original for a rollback
    module.lora_A = LoRAWeight(a)
    module.lora_B = LoRAWeight(b)
    layer = LoRALayer(kind=kind, r=r, alpha=alpha, scaling=scaling, owner=owner, initial=initial)
    layer.handle = module.register_forward_hook(_lora_forward_hook, with_kwargs=True)
    set_layer(module, layer)
    return layer


def detach(module: nn.Module) -> None:
    """Remove every LoRA part from ``module`` (hook, A, B, a variant's parameters, mark);
    the layer is plain again."""
    layer = pop_layer(module)
    layer.handle.remove()
    if layer.group is not None:
        layer.group.disband()
    if layer.variant is not None:
        layer.variant.detach(module)
    for part in ("lora_A", "lora_B"):
        if part in module._modules:
            delattr(module, part)


def initial_delta(module: nn.Module) -> torch.Tensor | None:
    """``s · B0 A0`` of a PiSSA/OLoRA layer in float32, in the base ``weight``'s layout: what
    its init took out of the base weight. None for a layer with another init."""
    layer = layer_state(module)
    if layer.initial is None:
        return None
    a, b = (t.to(torch.float32) for t in layer.initial)
    delta = (b @ a).t() if layer.kind == GPT2_CONV1D else b @ a
    return delta * layer.scaling


def _project(module: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    layer = layer_state(module)
    fast = layer.owner.config.dropout_masks == "fast"
    return kernels.project_down(x, a, active_dropout(module, layer), fast)


def lora_hidden(module: nn.Module, layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """``A dropout(x)`` of a Linear-style layer: ``(..., in) -> (..., r)``, from its
    shared-input group's one product when it has one (see ``core.fusion``)."""
    if layer.group is not None:
        return layer.group.hidden(module, x, _project)
    return _project(module, x, module.lora_A.weight)


def _lora_forward_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> Any:
    """``W x`` -> ``W x + s · B A dropout(x)``; a merged layer already holds the term in W.
    A layer with a variant (DoRA) computes through it instead."""
    layer = layer_state(module)
    if layer.disabled:  # core.mixed runs the base model (mixed batches' "__base__" rows)
        return output
    if layer.merged:
        if module.training and torch.is_grad_enabled() and module.lora_A.weight.requires_grad:
            raise LoRAStateError(
                "a merged LoRA layer is being trained: gradients would reach only the frozen "
                "base weight; call unmerge_lora(model) before training"
            )
        return output
    x = args[0] if args else next(iter(kwargs.values()))
    if layer.variant is not None:
        return layer.variant.forward(module, layer, x, output, lora_hidden)
    if layer.kind in MATMUL_KINDS:
        b = module.lora_B.weight
        hidden = lora_hidden(module, layer, x)
        if hidden.dtype == output.dtype:
            return kernels.add_low_rank(output, hidden, b, layer.scaling)
        delta = F.linear(hidden, b)
    else:
        delta = reference_delta(module, x, active_dropout(module, layer))
    return torch.add(output, delta.to(output.dtype), alpha=layer.scaling)


def reference_delta(module: nn.Module, x: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """The unscaled low-rank term ``B A dropout(x)`` in plain ops, for every layer kind.

    ConvNd and Embedding layers compute through it; for Linear/Conv1D it is the readable
    reference of ``core.kernels``. Shapes: Linear/Conv1D ``(..., in) -> (..., out)``; ConvNd
    ``(N, in, *spatial) -> (N, out, *spatial_out)``; Embedding integer ids ``(...) -> (..., dim)``
    (no dropout, as in PEFT). The input is cast to the adapter dtype; the result stays in it.
    """
    layer = layer_state(module)
    a, b = module.lora_A.weight, module.lora_B.weight
    if layer.kind == EMBEDDING:
        hidden = F.embedding(
            x, a.t(), module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, module.sparse,
        )  # fmt: skip
        return hidden @ b.t()  # (..., r) @ (r, dim) -> (..., dim)
    if p > 0:
        x = F.dropout(x, p, training=True)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    if layer.kind in MATMUL_KINDS:
        return F.linear(F.linear(x, a), b)  # (..., in) -> (..., r) -> (..., out)
    conv = _CONV_FN[a.dim() - 2]
    hidden = conv(x, a, None, module.stride, module.padding, module.dilation)
    return conv(hidden, b)


def delta_weight(module: nn.Module) -> torch.Tensor:
    """``s · B A`` in float32 (float64 for a float64 adapter), in the base ``weight``'s layout.

    Computed in at least float32 whatever the adapter dtype so that merging into a bf16/fp16
    base rounds once, at the final cast (see PEFT issue 1388).
    """
    layer = layer_state(module)
    dtype = torch.promote_types(module.lora_A.weight.dtype, torch.float32)
    a = module.lora_A.weight.to(dtype)
    b = module.lora_B.weight.to(dtype)
    if layer.kind == LINEAR:
        delta = b @ a
    elif layer.kind in (GPT2_CONV1D, EMBEDDING):
        delta = (b @ a).t()
    else:
        delta = torch.einsum("or,ri...->oi...", b.flatten(1), a)
    return delta * layer.scaling
