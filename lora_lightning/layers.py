"""The LoRA parts attached to one adapted layer, and the maths they compute.

Design (after Lorax): the adapted layer stays where it is with its own parameters untouched;
``lora_A`` and ``lora_B`` become its children (so the state dict gains
``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` and renames nothing), and a forward hook
turns the layer's output ``W x`` into ``W x + s · B A dropout(x)``.

For Linear and GPT-2 Conv1D layers the hook runs two small autograd functions,
``_ProjectDown`` (``h = A dropout(x)``) and ``_AddLowRank`` (``W x + s · h B^T`` as one
``addmm``), whose backwards pick the fast BLAS layouts for rank-r products and keep every
rescale on the ``[tokens, r]`` side; :class:`SharedInput` lets query/key/value share one
``_ProjectDown``. ``tests/test_lora_autograd.py`` checks them against finite differences and
plain autograd; ``experiments/bench`` measures them against PEFT.

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
    group: SharedInput | None = None  # siblings reading the same input (see SharedInput)


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
        # Follow the layer's mode: injecting into a model in eval mode must not switch
        # adapter dropout on at inference.
        module.lora_dropout = nn.Dropout(dropout).train(module.training)
    spec = LoRASpec(kind=kind, r=r, alpha=alpha, scaling=scaling, dropout=dropout, config=config)
    spec.handle = module.register_forward_hook(_lora_forward_hook, with_kwargs=True)
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
    if spec.group is not None:
        spec.group.disband()
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
    """The unscaled low-rank term ``B A dropout(x)`` of an adapted ConvNd or Embedding layer
    (Linear and Conv1D layers go through :func:`project_down` and :func:`add_low_rank`).

    Shapes: ConvNd ``(N, in, *spatial) -> (N, out, *spatial_out)``; Embedding integer ids
    ``(...) -> (..., dim)``. The input is cast to the adapter dtype; the result stays in the
    adapter dtype.
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
    conv = _CONV_FN[a.dim() - 2]
    hidden = conv(x, a, None, module.stride, module.padding, module.dilation)
    return conv(hidden, b)


def active_dropout(module: nn.Module) -> float:
    """The LoRA dropout probability ``module`` applies now: 0 without dropout or in eval mode."""
    dropout = module._modules.get("lora_dropout")
    return dropout.p if dropout is not None and dropout.training else 0.0


def project_down(module: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``A dropout(x)`` for a Linear/Conv1D adapter (``a``: ``[r, in]``, or the rows of a
    :class:`SharedInput` group), with ``x`` cast to the adapter dtype."""
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    p = active_dropout(module)
    if _functorch_active():  # torch.func.grad/vmap: plain differentiable ops
        return F.linear(F.dropout(x, p, training=True) if p > 0 else x, a)
    config = module.__dict__["_lora"].config
    fast = config is None or config.fuse_shared_input
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return _ProjectDown.apply(x, a, p, fast)
    return _ProjectDown.forward(None, x, a, p, fast)


def _functorch_active() -> bool:
    """True inside ``torch.func`` transforms (grad, vmap, jacrev, ...), which need autograd
    functions written in the ``setup_context`` style with vmap rules; there the adapters
    compute with plain differentiable ops instead (same maths, autograd's speed)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if is_compiling is not None and is_compiling():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def keep_mask(x: torch.Tensor, p: float, fast: bool = True) -> tuple[torch.Tensor, float]:
    """A dropout mask like ``x`` and its drop probability: ``(mask, p_used)``, where ``mask``
    is 0 with probability ``p_used`` and 1 otherwise, in ``x``'s dtype (the ``1 / (1 - p_used)``
    rescale is left to the caller), drawn from the default generator of ``x``'s device.

    ``fast=False`` draws exactly the mask ``torch.nn.Dropout`` would draw from the same
    generator state (``bernoulli_(1 - p)``), hence PEFT's masks, with ``p_used = p``.
    ``fast=True`` on CPU cuts full-range random 64-bit words into uniform 16-bit integers and
    compares them with a threshold, which is about three times faster than ``bernoulli_``:
    ``p_used`` is ``p`` rounded to a multiple of 2**-16 (0.1 -> 0.1000061; far below the
    sampling noise of one mask), or to 2**-32 when that rounding would move ``p`` by more
    than 0.01% of itself. On other devices it is ``bernoulli_``.
    """
    if not fast or x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1.0 - p), p
    bits, chunk = 16, torch.int16
    if abs(round(p * 2**16) - p * 2**16) > 1e-4 * p * 2**16:
        bits, chunk = 32, torch.int32
    per_word = 64 // bits
    words = torch.empty(-(-x.numel() // per_word), dtype=torch.int64)
    words.random_(-(2**63), 2**63 - 1)  # every bit uniform (plain random_() leaves the top 0)
    uniform = words.view(chunk)[: x.numel()].view(x.shape)  # uniform on [-2**(b-1), 2**(b-1))
    dropped = round(p * 2**bits)
    keep = uniform >= dropped - 2 ** (bits - 1)
    return keep.to(x.dtype), dropped / 2**bits


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """Autocast's state for ``device_type`` now: replayed around a backward (as
    ``torch.amp.custom_bwd`` does, for any device) so that its matmuls see the dtypes the
    forward saw under ``bf16-mixed``/``16-mixed`` precision."""
    try:
        return (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def _replay_autocast(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    device_type, enabled, dtype = state
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


class _ProjectDown(torch.autograd.Function):
    """``h = A dropout(x)`` for Linear-style adapters (``x``: ``(..., in)``, ``a``: ``[r, in]``).

    Compared with ``F.linear(F.dropout(x), a)`` under autograd it draws the mask faster (see
    :func:`keep_mask`), applies the ``1 / (1 - p)`` rescale to the small ``[.., r]`` tensors
    instead of the activations, and returns the input gradient already masked. It saves the
    masked input (``x`` itself when ``p = 0``) and, with dropout, the 0/1 mask (PEFT saves a
    masked copy and a mask per module).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, p: float, fast: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        keep, scale = None, 1.0
        if p > 0:
            keep, p_used = keep_mask(x2, p, fast)
            scale = 1.0 / (1.0 - p_used)
        dropped = x2 * keep if keep is not None else x2
        hidden = torch.mm(dropped, a.t())
        if keep is not None:
            hidden.mul_(scale)
        if ctx is not None:
            ctx.save_for_backward(dropped, a, keep)
            ctx.scale = scale
            ctx.autocast = _autocast_state(x.device.type)
            ctx.x_shape = x.shape
        return hidden.view(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_hidden: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with _replay_autocast(ctx.autocast):
            return _ProjectDown._backward(ctx, grad_hidden)

    @staticmethod
    def _backward(ctx: Any, grad_hidden: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dropped, a, keep = ctx.saved_tensors
        grad = grad_hidden.reshape(-1, a.shape[0])
        if keep is not None:
            grad = grad * ctx.scale  # [N, r]: cheaper here than on the activations
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, a)
            if keep is not None:
                grad_x.mul_(keep)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad.t(), dropped)
        return grad_x, grad_a, None, None


def add_low_rank(
    output: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``output + scaling * hidden @ b.T`` (``hidden``: ``(..., r)``, ``b``: ``[out, r]``) as
    one ``addmm``, with a backward that keeps the skinny products in the layouts BLAS runs
    fastest (``(B^T G^T)^T`` rather than ``G B``; ``(H^T G)^T`` rather than ``G^T H``: 3-5x
    faster on CPU at r=8)."""
    if _functorch_active():
        return torch.add(output, F.linear(hidden, b), alpha=scaling)
    if torch.is_grad_enabled() and (
        output.requires_grad or hidden.requires_grad or b.requires_grad
    ):
        return _AddLowRank.apply(output, hidden, b, scaling)
    return _AddLowRank.forward(None, output, hidden, b, scaling)


class _AddLowRank(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, output: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        out2 = output.reshape(-1, output.shape[-1])
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        if ctx is not None:
            ctx.save_for_backward(hidden2, b)
            ctx.scaling = scaling
            ctx.autocast = _autocast_state(output.device.type)
            ctx.hidden_shape = hidden.shape
        return torch.addmm(out2, hidden2, b.t(), alpha=scaling).view(output.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with _replay_autocast(ctx.autocast):
            return _AddLowRank._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden2, b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_hidden = torch.mm(b.t() * ctx.scaling, grad.t()).t().reshape(ctx.hidden_shape)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(hidden2.t(), grad).mul_(ctx.scaling).t()
        return (grad_out if ctx.needs_input_grad[0] else None), grad_hidden, grad_b, None


def _lora_forward_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> Any:
    """``W x`` -> ``W x + s · B A dropout(x)``; a merged layer already holds the term in W."""
    spec: LoRASpec = module.__dict__["_lora"]
    if spec.merged:
        if module.training and torch.is_grad_enabled() and module.lora_A.weight.requires_grad:
            raise LoRAStateError(
                "a merged LoRA layer is being trained: gradients would reach only the frozen "
                "base weight; call unmerge_lora(model) before training"
            )
        return output
    x = args[0] if args else next(iter(kwargs.values()))
    if spec.kind in (LINEAR, GPT2_CONV1D):
        b = module.lora_B.weight
        if spec.group is not None:
            hidden = spec.group.hidden(module, x)
        else:
            hidden = project_down(module, x, module.lora_A.weight)
        if hidden.dtype == output.dtype:
            return add_low_rank(output, hidden, b, spec.scaling)
        delta = F.linear(hidden, b)
    else:
        delta = lora_delta(module, x)
    return torch.add(output, delta.to(output.dtype), alpha=spec.scaling)


class SharedInput:
    """Adapted siblings that read the same input, e.g. an attention's query, key and value.

    The first member called with an input computes ``[A_q; A_k; A_v] dropout(x)`` as one
    matmul with one dropout mask; the others find their rows ready when called with the very
    same tensor (same object, same version). With dropout 0 this is the per-module maths
    regrouped; with dropout > 0 the siblings share a mask where PEFT draws one per module
    (``LoRAConfig.fuse_shared_input=False`` gives PEFT's behaviour). A member called with
    another input (cross-attention keys, say) simply recomputes.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._clear()

    def _rows(self, module: nn.Module) -> tuple[int, int]:
        """``module``'s rows in the stacked ``A`` (found by identity, so deep copies work)."""
        start = 0
        for member in self.members:
            stop = start + member.lora_A.weight.shape[0]
            if member is module:
                return start, stop
            start = stop
        raise LoRAStateError(f"{type(module).__name__} is not a member of this LoRA group")

    def _clear(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._input: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._pending: set[int] = set()

    def hidden(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``A dropout(x)`` of ``module`` (``(..., r)``), from the group's one ``A`` product."""
        # Inference tensors (torch.inference_mode) keep no version counter.
        version = -1 if x.is_inference() else x._version
        key = (version, torch.is_grad_enabled(), module.training)
        if self._input is not x or self._key != key or id(module) not in self._pending:
            a = torch.cat([member.lora_A.weight for member in self.members])
            self._hidden = project_down(module, x, a)
            self._input, self._key = x, key
            self._pending = {id(member) for member in self.members}
        start, stop = self._rows(module)
        hidden = self._hidden[..., start:stop]
        self._pending.discard(id(module))
        if not self._pending:  # every sibling served: hold no activation past this point
            self._clear()
        return hidden

    def disband(self) -> None:
        """Return every member to per-module computation (used when adapters are removed)."""
        for member in self.members:
            spec = get_spec(member)
            if spec is not None:
                spec.group = None
        self._clear()


def group_shared_inputs(modules: list[tuple[str, nn.Module]]) -> None:
    """Put adapted Linear/Conv1D siblings of one parent with the same input size, adapter dtype
    and dropout into a :class:`SharedInput` group (groups of one are left alone)."""
    groups: dict[tuple[Any, ...], list[nn.Module]] = {}
    for name, module in modules:
        spec = get_spec(module)
        if spec is None or spec.group is not None or spec.kind not in (LINEAR, GPT2_CONV1D):
            continue
        parent = name.rpartition(".")[0]
        a = module.lora_A.weight
        groups.setdefault((parent, a.shape[1], a.dtype, spec.dropout), []).append(module)
    for members in groups.values():
        if len(members) > 1:
            group = SharedInput(members)
            for member in members:
                get_spec(member).group = group


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
