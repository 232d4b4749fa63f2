"""The LoRA parts attached to one adapted layer: shapes, initialisation, and its forward hook.

Owns: layer kinds (which module types LoRA can adapt), adapter shapes and seeded init,
:func:`attach`/:func:`detach` of ``lora_A``/``lora_B`` on one layer, the forward hook, and the
layer's ``s · B A`` (:func:`delta_weight`) for merging. Must not import: ``core.inject``,
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

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.core import kernels
from lora_lightning.core.errors import LoRAStateError, UnsupportedModuleError
from lora_lightning.core.state import AdapterSet, LoRALayer, layer_state, pop_layer, set_layer

LINEAR, GPT2_CONV1D, CONV, EMBEDDING = "linear", "gpt2_conv1d", "conv", "embedding"
#: Kinds computed by ``core.kernels`` (and so able to share an input, see ``core.fusion``).
MATMUL_KINDS = (LINEAR, GPT2_CONV1D)
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
) -> LoRALayer:
    """Attach ``lora_A``/``lora_B`` to ``module``, hook its forward, and mark it adapted.

    The caller (``core.inject``) has validated the plan; this only builds. On a ``meta``
    weight no memory is allocated and nothing is initialised (real values arrive with
    ``load_state_dict``/``to_empty``).
    """
    base = module.weight
    config = owner.config
    shape_a, shape_b = adapter_shapes(module, kind, r)
    if base.device.type == "meta":
        a = torch.empty(shape_a, dtype=dtype, device="meta")
        b = torch.empty(shape_b, dtype=dtype, device="meta")
        initial = None
    elif config.changes_base:
        a, b, residual = base_changing_init(
            base, kind, r, scaling, config.init, module_seed(config.seed, name)
        )
        a, b = a.to(base.device, dtype), b.to(base.device, dtype)
        initial = (a.detach().clone(), b.detach().clone())
        with torch.no_grad():
            base.copy_(residual)  # the caller keeps the original for a rollback
    else:
        a, b = _init_weights(kind, shape_a, shape_b, config.init, r, config.seed, name)
        a, b = a.to(base.device, dtype), b.to(base.device, dtype)
        initial = None
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


#: Layer kinds each base-changing init adapts. PEFT's OLoRA factors the stored weight without
#: PEFT's fan_in_fan_out transpose, so on GPT-2 Conv1D its shapes are not LoRA's.
BASE_CHANGING_KINDS = {"pissa": (LINEAR, GPT2_CONV1D), "olora": (LINEAR,)}


def base_changing_unsupported_reason(
    module: nn.Module, kind: str | None, init: str, r: int
) -> str | None:
    """Why ``init`` (pissa, pissa_niter_<k>, olora) cannot adapt ``module`` at rank ``r``, or
    None. The factorisation has at most ``min(out, in)`` components: a larger ``r`` would
    inject a smaller adapter than the plan records (and PEFT would write a file it cannot
    read back), so it is refused rather than shrunk."""
    family = "olora" if init == "olora" else "pissa"
    kinds = BASE_CHANGING_KINDS[family]
    if kind not in kinds:
        names = " and ".join("nn.Linear" if k == LINEAR else "GPT-2 Conv1D" for k in kinds)
        return f"a {type(module).__name__}, which init={init!r} cannot adapt (only {names})"
    if module.weight.device.type == "meta":
        return (
            f"on the meta device: init={init!r} factors the base weight, which has no values; "
            "load the base weights first"
        )
    components = min(module.weight.shape)
    if r > components:
        return (
            f"a {tuple(module.weight.shape)} layer: init={init!r} factors its weight into at most "
            f"{components} components, fewer than r={r}; use r <= {components} for it (lora.r, "
            "or lora.rank_pattern for this module)"
        )
    return None


@torch.no_grad()
def base_changing_init(
    weight: torch.Tensor, kind: str, r: int, scaling: float, init: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's PiSSA / OLoRA initialisation (``pissa_init``/``olora_init`` in
    ``peft/tuners/lora/layer.py``), the same ops in the same order, in float32.

    ``weight`` is ``[out, in]`` (``[in, out]`` for GPT-2 Conv1D). Returns ``A0`` ``[r, in]``,
    ``B0`` ``[out, r]`` (float32) and the residual ``W - s·B0 A0`` in ``weight``'s layout and
    dtype:

    - ``pissa``: ``W = V S Uᵀ``; ``A0 = sqrt(S_r / s) U_rᵀ``, ``B0 = V_r sqrt(S_r / s)``.
    - ``pissa_niter_<k>``: the same from ``torch.svd_lowrank(W, r, niter=k)``, its random
      draws seeded with ``seed`` (PEFT draws from the global generator).
    - ``olora``: ``W = Q R``; ``A0 = R[:r]``, ``B0 = Q[:, :r]``.
    """
    transposed = kind == GPT2_CONV1D
    w = weight.detach().to(torch.float32)
    w = w.t() if transposed else w
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        a, b = upper[:r].contiguous(), q[:, :r].contiguous()
    else:
        if init == "pissa":
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r], uh[:r]
        else:
            niter = int(init.rsplit("_", 1)[1])
            devices = [w.device] if w.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                vr, sr, ur = torch.svd_lowrank(w, r, niter=niter)
            uhr = ur.t()
        sr = sr / scaling
        a = torch.diag(torch.sqrt(sr)) @ uhr  # [r, r] @ [r, in] -> [r, in]
        b = vr @ torch.diag(torch.sqrt(sr))  # [out, r] @ [r, r] -> [out, r]
    residual = (w - scaling * b @ a).to(weight.dtype)
    return a, b, residual.t() if transposed else residual


def initial_delta(module: nn.Module) -> torch.Tensor | None:
    """``s · B0 A0`` of a PiSSA/OLoRA layer in float32, in the base ``weight``'s layout: what
    its init took out of the base weight. None for a layer with another init."""
    layer = layer_state(module)
    if layer.initial is None:
        return None
    a, b = (t.to(torch.float32) for t in layer.initial)
    delta = (b @ a).t() if layer.kind == GPT2_CONV1D else b @ a
    return delta * layer.scaling


def _lora_a_init(
    shape: tuple[int, ...], init: str, r: int, generator: torch.Generator
) -> torch.Tensor:
    a = torch.empty(shape)
    if init == "gaussian":
        return a.normal_(0.0, 1.0 / r, generator=generator)
    # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT do: bound = 1 / sqrt(fan_in).
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def active_dropout(module: nn.Module, layer: LoRALayer) -> float:
    """The LoRA dropout probability ``module`` applies now: the config's in train mode, else 0."""
    return layer.dropout if module.training else 0.0


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
    if layer.disabled:  # core.multi runs the base model (mixed batches' "__base__" rows)
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
