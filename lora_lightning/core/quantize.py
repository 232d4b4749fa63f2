"""QLoRA: the frozen base weights of adapted layers stored quantized (``LoRAConfig.quantize_base``).

Owns: the quantization schemes (``nf4``, ``int8``), which layers each can store
(:func:`unsupported_reason`, checked by ``core.plan`` before anything changes), turning an
adapted layer's weight into a quantized one and back (:func:`quantize_layer`,
:func:`restore_layer`, :func:`dequantize_layer`), and the queries every other module asks of a
weight (:func:`is_quantized`, :func:`scheme_of`, :func:`dequantize`, :func:`storage`). The
quantized tensors come from torchao (the ``quant`` extra), imported only when a scheme is used.
Must not import: ``core.inject``, ``core.merge``, ``core.adapter``, Lightning, Hydra.

Design: the adapted ``nn.Linear`` stays the same module; only its ``weight`` parameter is
replaced by a frozen parameter holding a torchao tensor subclass (``NF4Tensor``: 4-bit
NormalFloat codes in blocks of 64 with double-quantized block scales, Dettmers et al. 2023;
``Int8Tensor``: symmetric int8 per output row). Those subclasses implement ``F.linear``
(dequantize, then multiply; the input gradient flows through, the weight gets none), so the
layer's own forward computes ``W_q x`` and the unchanged LoRA hook adds ``s · B A x`` in the
adapter dtype::

    x ──> Linear(weight = NF4/int8 W_q, frozen) ── F.linear: dequant(W_q) x ──┐
    │                                                                     (+) ──> W_q x + s·B A x
    └──> dropout ──> lora_A ──> lora_B ──> · s ───────────────────────────────┘

Nothing on the plain LoRA path knows about quantization: no branch in the hook or kernels.
Quantization is deterministic, so the same float base gives bit-identical storage on every
rank and every run (the base fingerprint hashes that storage, see ``lightning.checkpoint``).
DDP broadcasts parameters at construction, flattening them into one buffer: an int8 tensor
cannot be flattened (``aten.view`` is not implemented), and broadcasting frozen codes that
are identical on every rank is wasted work anyway: their names go into the model's
``_ddp_params_and_buffers_to_ignore`` (they are frozen and identical on every rank, so
nothing is lost; the base must be loaded the same on every rank, as for any frozen base).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lora_lightning.core.config import QUANTIZE_BASE
from lora_lightning.core.errors import LoRAConfigError

NONE, NF4, INT8 = QUANTIZE_BASE
#: Values of ``LoRAConfig.quantize_base``.
SCHEMES = QUANTIZE_BASE
#: NF4 as in QLoRA and torchtune: 64 weights per block, block scales double-quantized in
#: groups of 256. A weight whose block count is not a multiple of 256 (SmolLM2's 576x576
#: attention projections: 5184 blocks) has its scales grouped by the largest power of two that
#: divides the block count, down to NF4_MIN_SCALER_BLOCK: smaller groups only store the scales
#: more precisely (one more float per group), the 4-bit weights are the same NF4 code.
NF4_BLOCK, NF4_SCALER_BLOCK, NF4_MIN_SCALER_BLOCK = 64, 256, 16
INSTALL_HINT = "pip install 'lora-lightning[quant]'"
#: Layer kinds a quantized base supports (``core.layers`` kinds).
KINDS = ("linear",)
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def backend() -> Any:
    """The ``torchao.quantization`` module.

    Raises:
        LoRAConfigError: torchao is not installed (names the install command).
    """
    # torchao logs a warning for each optional C++ extension built for another torch
    # version (MX/CUTLASS GPU kernels, unused here) and torch logs a pytree deprecation.
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as err:
        raise LoRAConfigError(
            f"lora.quantize_base needs torchao, which is not installed ({err}): {INSTALL_HINT}"
        ) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return tq


def scheme_of(tensor: Any) -> str | None:
    """``nf4`` / ``int8`` for a weight quantized here, None for a plain tensor."""
    # By type name, so asking (the fingerprint asks of every parameter) never imports torchao.
    cls = type(tensor)
    if not cls.__module__.startswith("torchao."):
        return None
    name = cls.__name__
    if name == "NF4Tensor":
        return NF4
    if name == "Int8Tensor":
        return INT8
    return None


def is_quantized(tensor: Any) -> bool:
    """True if ``tensor`` is a quantized base weight (an NF4 or int8 tensor subclass)."""
    return scheme_of(tensor) is not None


def unsupported_reason(module: nn.Module, kind: str | None, scheme: str) -> str | None:
    """Why ``module`` (of ``core.layers`` ``kind``) cannot have its base stored as ``scheme``,
    or None. A sentence completing "module 'x' is ...". Checks kind, values, size, dtype."""
    if kind not in KINDS:
        return (
            f"a {type(module).__name__}, whose base weight quantize_base={scheme!r} cannot "
            "store (nn.Linear targets only)"
        )
    weight = module.weight
    if is_quantized(weight):
        return f"already quantized ({scheme_of(weight)}): quantize a float base only once"
    if weight.device.type == "meta":
        return (
            f"on the meta device: quantize_base={scheme!r} needs the base weight's values; "
            "load the base weights first"
        )
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"a {type(module).__name__} whose weight is {weight.dtype}, which {scheme} does not store"
    if scheme == NF4 and nf4_scaler_block(weight.numel()) is None:
        return (
            f"{tuple(weight.shape)} ({weight.numel()} weights): nf4 stores a multiple of "
            f"{NF4_BLOCK * NF4_MIN_SCALER_BLOCK} weights only (blocks of {NF4_BLOCK}, block "
            f"scales in groups of {NF4_MIN_SCALER_BLOCK} to {NF4_SCALER_BLOCK}); use int8 or "
            "exclude it"
        )
    return None


def nf4_scaler_block(numel: int) -> int | None:
    """Block scales per double-quantization group for an NF4 weight of ``numel`` elements:
    256 (QLoRA's) when the block count allows, else the largest power of two dividing it, not
    under ``NF4_MIN_SCALER_BLOCK``; None when ``numel`` cannot be stored as NF4."""
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    size = NF4_SCALER_BLOCK
    while size >= NF4_MIN_SCALER_BLOCK:
        if blocks % size == 0:
            return size
        size //= 2
    return None


@torch.no_grad()
def quantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``weight`` ``[out, in]`` stored as ``scheme``: a tensor subclass of the same shape and
    logical dtype whose ``F.linear`` dequantizes and multiplies."""
    tq = backend()
    weight = weight.detach()
    if scheme == NF4:
        scaler_block = nf4_scaler_block(weight.numel())
        if scaler_block is None:
            raise LoRAConfigError(
                f"quantize: a {tuple(weight.shape)} weight cannot be stored as nf4 (see "
                "unsupported_reason)"
            )
        return tq.to_nf4(weight, NF4_BLOCK, scaler_block)
    if scheme == INT8:
        return tq.Int8Tensor.from_hp(weight, tq.PerRow())
    raise LoRAConfigError(f"lora.quantize_base={scheme!r} is invalid: expected one of {SCHEMES}")


@torch.no_grad()
def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a quantized weight, in its original dtype; a plain tensor as it is."""
    scheme = scheme_of(weight)
    if scheme == NF4:
        return weight.get_original_weight().to(weight.dtype)
    if scheme == INT8:
        return weight.dequantize().to(weight.dtype)
    return weight


def storage(weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors a quantized weight is stored in, as ``(name, tensor)`` (codes, block
    scales...), in a fixed order; ``[("", weight)]`` for a plain tensor."""
    if not is_quantized(weight):
        return [("", weight)]
    names, _ = weight.__tensor_flatten__()
    return [(name, getattr(weight, name)) for name in names]


def stored_bytes(weight: torch.Tensor) -> int:
    """Bytes a weight occupies (every storage tensor of a quantized one)."""
    return sum(t.numel() * t.element_size() for _, t in storage(weight))


_LOAD_HOOK = "_lora_quantized_load_hook"  # on a quantized layer: its load_state_dict hook


def quantize_layer(module: nn.Module, scheme: str) -> nn.Parameter:
    """Replace ``module.weight`` by a frozen parameter holding its quantized form, and make
    ``load_state_dict`` quantize a float weight loaded into it (see :func:`_quantize_on_load`).

    Returns:
        The original weight parameter (for :func:`restore_layer` on a rollback).
    """
    original = module.weight
    module.weight = nn.Parameter(quantize(original, scheme), requires_grad=False)
    module.__dict__[_LOAD_HOOK] = module._register_load_state_dict_pre_hook(
        _quantize_on_load, with_module=True
    )
    return original


def restore_layer(module: nn.Module, original: nn.Parameter) -> None:
    """Put back the parameter :func:`quantize_layer` returned (the same object, same bits)."""
    _remove_load_hook(module)
    module.weight = original


def dequantize_layer(module: nn.Module) -> None:
    """Replace a quantized ``module.weight`` by a frozen float parameter of its dequantized
    values (original dtype); a plain weight is left as it is."""
    if is_quantized(module.weight):
        _remove_load_hook(module)
        module.weight = nn.Parameter(dequantize(module.weight), requires_grad=False)


def _remove_load_hook(module: nn.Module) -> None:
    handle = module.__dict__.pop(_LOAD_HOOK, None)
    if handle is not None:
        handle.remove()


def _quantize_on_load(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """``load_state_dict`` pre-hook of a quantized layer: a plain float tensor of the weight's
    shape arriving for it (a base checkpoint loaded after injection) is quantized with the
    layer's scheme first, so it is stored exactly as quantizing that base would store it (the
    int8 tensor cannot take a float ``copy_`` at all, and NF4's ``copy_`` would re-quantize
    it anyway). A tensor of another shape is left for ``load_state_dict`` to report."""
    key = prefix + "weight"
    value = state_dict.get(key)
    weight = module.weight
    scheme = scheme_of(weight)
    if (
        scheme is None
        or not isinstance(value, torch.Tensor)
        or is_quantized(value)
        or not value.is_floating_point()
        or value.shape != weight.shape
    ):
        return
    state_dict[key] = quantize(value.to(weight.device, weight.dtype), scheme)


def quantized_parameter_names(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of every parameter holding a quantized weight."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if is_quantized(p)]


_DDP_RECORD = "_lora_ddp_ignored"  # the names update_ddp_ignore added, to remove them later


def update_ddp_ignore(model: nn.Module) -> None:
    """Keep ``model._ddp_params_and_buffers_to_ignore`` (read by ``DistributedDataParallel``
    when it wraps ``model``) listing exactly the quantized parameters, next to any names the
    user put there. DDP's construction-time broadcast cannot flatten the tensor subclasses;
    the parameters are frozen and identical on every rank, so skipping them loses nothing."""
    ours = set(quantized_parameter_names(model))
    previous = model.__dict__.get(_DDP_IGNORE)
    user = set(previous or ()) - set(model.__dict__.get(_DDP_RECORD, ()))
    model.__dict__.pop(_DDP_IGNORE, None)
    model.__dict__.pop(_DDP_RECORD, None)
    if user or ours:
        model.__dict__[_DDP_IGNORE] = sorted(user | ours)
    if ours:
        model.__dict__[_DDP_RECORD] = sorted(ours)


def ddp_ignore_state(model: nn.Module) -> dict[str, Any]:
    """The attributes :func:`update_ddp_ignore` may change, for :func:`restore_ddp_ignore`."""
    return {k: model.__dict__[k] for k in (_DDP_IGNORE, _DDP_RECORD) if k in model.__dict__}


def restore_ddp_ignore(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`ddp_ignore_state` returned, exactly (a rollback)."""
    for key in (_DDP_IGNORE, _DDP_RECORD):
        model.__dict__.pop(key, None)
    model.__dict__.update(state)
