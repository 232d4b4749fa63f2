"""The LoRA maths of Linear-style layers as two small autograd functions, and dropout masks.

Owns: ``project_down`` (``h = A dropout(x)``) and ``add_low_rank`` (``W x + s · h B^T`` as
one ``addmm``), whose backwards pick the fast BLAS layouts for rank-r products and keep every
rescale on the ``[tokens, r]`` side; the CPU dropout-mask generator (:func:`keep_mask`); the
autocast replay that lets the backwards run under ``bf16-mixed``; which implementation runs
(:func:`plain_ops`). Stateless: callers pass the adapter matrices, the drop probability and
the mask kind. Must not import: any other ``lora_lightning`` module but ``core.errors``.

Two implementations of the same maths: the autograd functions above, on the CPU, where their
layouts and mask generator are what make the step faster than PEFT's; and plain
differentiable ops (``F.linear``, ``F.dropout``, one ``addmm``) everywhere else. On a GPU
cuBLAS takes transposed operands for free, ``F.dropout`` is one fused kernel, and a Python
autograd function costs ~10 us a call that a launch-bound step (a small model, short rows)
pays in full: measured with compute made negligible (hidden size 32, 2 x 8 tokens, one CPU
thread: the regime a GPU step of MiniLM or SmolLM2 is in), ours / PEFT per train step is 1.19
(BERT-shaped) and 1.20 (Llama-shaped) with the functions, 0.99 and 1.00 with plain ops
(``experiments/bench/overhead.py``; on an H200, MiniLM 1.12 -> 0.98).
``LORA_LIGHTNING_KERNELS=functions|plain`` forces one (benchmarks; the default ``auto`` picks
by device). Without autograd (``torch.no_grad``, inference mode: evaluation, generation) and
without dropout every device computes with plain ops: the functions differ only in their
backwards and mask generator, and would add only Python per layer.

Under ``torch.compile`` the adapters compute with plain ops on every device (the
down-projection only at dropout 0: with dropout the function and its mask generator stay, so
a compiled model draws the masks its eager twin draws). Dynamo traced each call of an autograd
function as a higher-order op with subgraphs of its own, which kept twice PEFT's FX nodes,
FakeTensors and shape metadata alive for the life of the compiled model: the compiled SmolLM2
step's peak RSS was 1.13-1.15x PEFT's, and is 0.95-1.00x with plain ops (2026-12-04,
``experiments/bench/README.md``).

Reference maths, which ``tests/test_lora_autograd.py`` checks these functions against (finite
differences and plain autograd)::

    h   = F.linear(F.dropout(x, p), A)          # (..., in) @ (in, r)  -> (..., r)
    out = W x + scaling * F.linear(h, B)        # (..., r)  @ (r, out) -> (..., out)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from lora_lightning.core.errors import LoRAConfigError

#: Environment variable forcing one implementation (see the module docstring).
KERNELS_ENV = "LORA_LIGHTNING_KERNELS"
_POLICIES = ("auto", "functions", "plain")


def _read_policy() -> str:
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in _POLICIES:
        raise LoRAConfigError(
            f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} is invalid: expected one of "
            f"{', '.join(_POLICIES)} (auto: the autograd functions on the CPU, plain "
            "differentiable ops on other devices)"
        )
    return value


_POLICY = _read_policy()


def plain_ops(x: torch.Tensor, *, masks: bool = False) -> bool:
    """Whether the adapters of a layer fed ``x`` compute with plain differentiable ops rather
    than the autograd functions. The functions differ only in their backwards and their mask
    generator, so plain ops compute wherever neither is wanted: under ``torch.compile`` and
    without autograd (evaluation, generation), unless ``masks`` (a dropout mask to draw: the
    function's generator keeps eager's masks; see the module docstring); always inside
    ``torch.func`` transforms (which need them); otherwise by the policy: by default on every
    device but the CPU."""
    compiled = compiling()
    if not masks and (compiled or not torch.is_grad_enabled()):
        return True
    if not compiled and _transforms_active():
        return True
    if _POLICY == "auto":
        return not x.is_cpu
    return _POLICY == "plain"


def project_down(x: torch.Tensor, a: torch.Tensor, p: float, fast_masks: bool) -> torch.Tensor:
    """``A dropout(x)``: ``x`` ``(..., in)``, ``a`` ``[r, in]`` -> ``(..., r)``.

    ``x`` is cast to the adapter dtype. ``p`` is the drop probability in effect (0 in eval);
    ``fast_masks`` picks the mask generator (see :func:`keep_mask`).
    """
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    if plain_ops(x, masks=p > 0):
        return F.linear(F.dropout(x, p, training=True) if p > 0 else x, a)
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return _ProjectDown.apply(x, a, p, fast_masks)
    return _ProjectDown.forward(None, x, a, p, fast_masks)


_IS_COMPILING = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the code calling it."""
    return _IS_COMPILING is not None and _IS_COMPILING()


def functorch_active() -> bool:
    """True inside ``torch.func`` transforms (grad, vmap, jacrev, ...), which need autograd
    functions written in the ``setup_context`` style with vmap rules; there the adapters
    compute with plain differentiable ops instead (same maths, autograd's speed)."""
    return not compiling() and _transforms_active()


def _transforms_active() -> bool:
    return _TRANSFORMS_ACTIVE is not None and _TRANSFORMS_ACTIVE()


def keep_mask(x: torch.Tensor, p: float, fast: bool = True) -> tuple[torch.Tensor, float]:
    """A dropout mask like ``x`` and its drop probability: ``(mask, p_used)``, where ``mask``
    is 0 with probability ``p_used`` and 1 otherwise, in ``x``'s dtype (the ``1 / (1 - p_used)``
    rescale is left to the caller), drawn from the default generator of ``x``'s device.

    ``fast=False`` draws ``bernoulli_(1 - p)`` with ``p_used = p``: on CPU exactly the mask
    ``torch.nn.Dropout`` would draw from the same generator state, hence PEFT's masks; on CUDA
    ``nn.Dropout`` runs a fused kernel of its own, so the masks there match PEFT's in
    distribution, not bit for bit.
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


def _replay_autocast(
    state: tuple[str, bool, torch.dtype],
) -> torch.autocast | contextlib.nullcontext:
    device_type, enabled, dtype = state
    if not enabled and not _autocast_state(device_type)[1]:
        return contextlib.nullcontext()  # off then and now: nothing to replay (the common case)
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
    if plain_ops(output):
        out2 = output.reshape(-1, output.shape[-1])
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        return torch.addmm(out2, hidden2, b.t(), alpha=scaling).view(output.shape)
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
