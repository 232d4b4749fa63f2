"""DoRA, weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): the
variant of a Linear or GPT-2 Conv1D adapter that ``LoRAConfig.use_dora`` switches on.

Owns: the magnitude parameter (``lora_magnitude_vector``, PEFT's name and state-dict key),
its initialisation, the row norm of ``W + s·B A`` (:func:`weight_norm`, within a stated
rounding bound), DoRA's forward (called by the
layer's forward hook through its :class:`DoRA` variant), and its merged weight. Must not
import: ``core.plan``, ``core.inject``, ``core.merge``, ``core.adapter``, Lightning. PEFT's
code (``peft/tuners/lora/dora.py``, ``variants.py``) is the ground truth for the maths::

    V  = W + s · B A                     # [out, in] (formed for its norm, then dropped)
    n  = ||V||_row, detached             # [out]: one norm per output feature (paper 4.3)
    W' = (m / n) ⊙_row V                 # m: lora_magnitude_vector [out], trains
    y  = W' x + bias                     # (..., in) -> (..., out)

    x ──> layer (W, frozen) ─> W x + bias ──┐
    │                                       (+ s · B A x) ──> · m/n ──> (+ (1 - m/n) bias) ──> y
    └──> lora_A ──> lora_B ─────────────────┘

At initialisation ``B = 0`` and ``m = ||W||_row``, so ``y = W x + bias``. With dropout in
training PEFT applies the whole DoRA term to ``dropout(x)`` (``y = W x + bias + (m/n - 1)
W dropout(x) + (m/n) s B A dropout(x)``), which costs one more matmul with ``W``; this module
does the same.

The norm is formed directly, in at least float32: ``W + s·B A`` in one ``addmm``, then its
row norms (:func:`weight_norm`; PEFT forms ``B A`` through an ``[in, in]`` identity first).
Until 2026-12-04 it came from the expansion ``||w_i||² + 2s<W Aᵀ, B>_i + s²<B (A Aᵀ), B>_i``,
which never formed the ``[out, in]`` sum but launched about fifteen kernels, needed a check of
its own precision per row (``bool(ill.any())``: a host-device synchronisation per adapted
layer and forward on a GPU, a graph break under ``torch.compile``) and was slower even on
the CPU: direct / expansion 0.43 at 384 x 384, 0.72 at 1536 x 576, 0.93 at 4096 x 4096
(float32 weights; bfloat16 0.49, 0.88, 0.99; one thread, ``experiments/bench/dora_norm.py``).
The launch-bound DoRA train step of ``experiments/bench/overhead.py`` (Llama-shaped) went
from 1.16 / 0.99 of PEFT's (autograd functions / plain ops) to 0.92 / 0.79. Recomputed every
forward: a cached norm keyed on the weight's version counter went stale after
``weight.data.copy_(...)`` (which bumps no counter), silently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.core import kernels
from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.layers import GPT2_CONV1D, LINEAR
from lora_lightning.core.state import LoRALayer, active_dropout

__all__ = ["DoRA", "KINDS", "MAGNITUDE", "VARIANT", "attach", "weight_norm"]
#: DoRA's magnitude: a parameter of the adapted layer itself, so its state-dict key is
#: ``<path>.lora_magnitude_vector``, PEFT's file key.
MAGNITUDE = "lora_magnitude_vector"
#: Layer kinds DoRA adapts (PEFT's DoRA for ConvNd/Embedding is not implemented here).
KINDS = (LINEAR, GPT2_CONV1D)
#: ``hidden(module, layer, x) -> A x`` (dropout-free): the layer's own, shared-input aware.
Hidden = Callable[[nn.Module, LoRALayer, torch.Tensor], torch.Tensor]


def unsupported_reason(module: nn.Module, kind: str | None) -> str | None:
    """Why DoRA cannot adapt ``module`` of layer ``kind`` (a sentence), or None if it can."""
    if kind in KINDS:
        return None
    return (
        f"a {type(module).__name__}, which use_dora=true cannot adapt (DoRA here supports "
        "nn.Linear and GPT-2 Conv1D only; PEFT's DoRA for convolutions and embeddings is not "
        "implemented)"
    )


def magnitude_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    """``(out,)``: one magnitude per output feature of ``module``."""
    weight = module.weight
    return (weight.shape[1],) if kind == GPT2_CONV1D else (weight.shape[0],)


def attach(module: nn.Module, layer: LoRALayer, dtype: torch.dtype) -> None:
    """Give adapted ``module`` its magnitude ``m = ||W + s·B A||_row`` (``||W||_row`` at init,
    as PEFT) in the adapter ``dtype``, and make ``layer`` compute DoRA. On ``meta`` nothing
    is computed."""
    weight = module.weight
    variant = DoRA()
    if weight.device.type == "meta":
        magnitude = torch.empty(magnitude_shape(module, layer.kind), dtype=dtype, device="meta")
    else:
        with torch.no_grad():
            magnitude = weight_norm(
                weight, module.lora_A.weight, module.lora_B.weight, layer.scaling,
                transposed=layer.kind == GPT2_CONV1D,
            ).to(dtype)  # fmt: skip
    module.register_parameter(MAGNITUDE, nn.Parameter(magnitude))
    layer.variant = variant


@torch.no_grad()
def weight_norm(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """``||W + s·B A||`` per output row, detached: the sum formed in one ``addmm`` in at
    least float32 (an ``[out, in]`` temporary for the length of the call, as PEFT's), then
    its row norms. Two kernels, no host-device synchronisation.

    ``weight`` is ``[out, in]`` (``[in, out]`` with ``transposed``, GPT-2 Conv1D), ``a``
    ``[r, in]``, ``b`` ``[out, r]``. Returns ``[out]`` in ``promote(a.dtype, float32)``.

    Precision, per row (``u`` the unit roundoff of that dtype, ``γ_k = k·u/(1 - k·u)``,
    ``κ = || |w_i| + s·|b_i|ᵀ|A| ||² / ||w_i + s·b_i A||²``): within
    ``γ_{r+2}·√κ + γ_in/2 + u`` relative of the exact norm.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    w = weight.to(dtype)
    summed = torch.addmm(w.t() if transposed else w, b.to(dtype), a.to(dtype), alpha=scaling)
    return torch.linalg.vector_norm(summed, dim=1)


class DoRA:
    """The DoRA variant of one adapted layer: its forward and merge, and the one thing they
    remember, the row norm at merge time, which unmerging needs (it cannot be recovered from
    the merged weight). Nothing computed from the live weights is cached: the norm is
    recomputed every forward (see the module docstring)."""

    name = "dora"
    tensors = (MAGNITUDE,)

    def __init__(self) -> None:
        self.merge_norm: torch.Tensor | None = None

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The variant's own trained parameters on ``module`` (the magnitude)."""
        return [getattr(module, MAGNITUDE)]

    def detach(self, module: nn.Module) -> None:
        """Remove the magnitude from ``module`` (the hook and A/B are ``core.layers``')."""
        if MAGNITUDE in module._parameters:
            delattr(module, MAGNITUDE)
        self.merge_norm = None

    def norm(self, module: nn.Module, layer: LoRALayer) -> torch.Tensor:
        """``||W + s·B A||_row`` now, detached, in the adapter dtype -> ``[out]``."""
        weight, transposed = module.weight, layer.kind == GPT2_CONV1D
        norm = weight_norm(weight.detach(), module.lora_A.weight.detach(),
                           module.lora_B.weight.detach(), layer.scaling,
                           transposed=transposed)  # fmt: skip
        return norm.to(module.lora_A.weight.dtype)

    def forward(
        self,
        module: nn.Module,
        layer: LoRALayer,
        x: torch.Tensor,
        output: torch.Tensor,
        hidden: Hidden,
    ) -> torch.Tensor:
        """``y = (m/n) ⊙ (W x + s·B A x) + bias`` from the base output ``W x + bias``:
        ``x`` ``(..., in)``, ``output`` ``(..., out)`` -> ``(..., out)``."""
        magnitude = getattr(module, MAGNITUDE)
        ratio = magnitude / self.norm(module, layer)  # [out]; gradient reaches m only
        p = active_dropout(module, layer)
        b = module.lora_B.weight
        if p > 0 or b.dtype != output.dtype or kernels.functorch_active():
            return self.reference(module, layer, x, output, ratio, p)
        combined = kernels.add_low_rank(output, hidden(module, layer, x), b, layer.scaling)
        bias = getattr(module, "bias", None)
        if bias is None:
            return combined * ratio
        # (m/n)(W x + bias + s·B A x) + (1 - m/n) bias; saves one (..., out) tensor.
        return torch.addcmul(bias * (1 - ratio), combined, ratio)

    def reference(
        self,
        module: nn.Module,
        layer: LoRALayer,
        x: torch.Tensor,
        output: torch.Tensor,
        ratio: torch.Tensor,
        p: float,
    ) -> torch.Tensor:
        """PEFT's DoRA forward in plain ops (``DoraLinearLayer.forward``): with dropout the
        whole DoRA term acts on ``dropout(x)``; in the adapter dtype, cast back at the end."""
        a, b = module.lora_A.weight, module.lora_B.weight
        x = x.to(a.dtype)
        if p > 0:
            keep, p_used = kernels.keep_mask(x, p, layer.owner.config.dropout_masks == "fast")
            x = x * keep * (1.0 / (1.0 - p_used))
            weight = module.weight.to(a.dtype)
            base = x @ weight if layer.kind == GPT2_CONV1D else F.linear(x, weight)
            lora = F.linear(F.linear(x, a), b)  # (..., in) -> (..., r) -> (..., out)
            delta = (ratio - 1) * base + ratio * lora * layer.scaling
            return (output + delta).to(output.dtype)
        bias = getattr(module, "bias", None)
        base = output.to(a.dtype) - (bias.to(a.dtype) if bias is not None else 0)
        lora = F.linear(F.linear(x, a), b)
        result = ratio * (base + layer.scaling * lora)
        if bias is not None:
            result = result + bias.to(a.dtype)
        return result.to(output.dtype)

    @torch.no_grad()
    def merged_weight(
        self, module: nn.Module, layer: LoRALayer, delta: torch.Tensor, sign: int
    ) -> torch.Tensor:
        """The weight with DoRA folded in (``sign=1``: ``(m/n) ⊙_row (W + ΔW)``, remembering
        ``n``) or out again (``sign=-1``: ``W'/(m/n) - ΔW`` with the ``n`` of the merge), as
        PEFT's ``DoraLinearVariant``. ``delta`` is ``s·B A`` in the weight's layout; the result
        is in ``delta``'s (wide) dtype."""
        transposed = layer.kind == GPT2_CONV1D
        weight = module.weight.to(delta.dtype)
        magnitude = getattr(module, MAGNITUDE).to(delta.dtype)
        if sign > 0:
            summed = weight + delta
            norm = torch.linalg.norm(summed.t() if transposed else summed, dim=1)
            self.merge_norm = norm
            ratio = magnitude / norm
            return summed * (ratio.view(1, -1) if transposed else ratio.view(-1, 1))
        ratio = magnitude / self.merge_norm.to(delta.dtype)
        return weight / (ratio.view(1, -1) if transposed else ratio.view(-1, 1)) - delta


class _Variant:
    """DoRA as the core sees it (``core.variants.Variant``): its flags, tensors and checks."""

    name = DoRA.name
    config_field = "use_dora"
    peft_field = "use_dora"
    tensors = DoRA.tensors
    tensor_label = "DoRA magnitudes"
    combine_refusal = "is a DoRA adapter (its magnitudes do not combine)"
    vllm_refusal = "DoRA (use_dora=true: lora_magnitude_vector tensors)"

    def enabled(self, config: LoRAConfig) -> bool:
        return config.use_dora

    def unsupported_reason(self, module: nn.Module, kind: str | None) -> str | None:
        return unsupported_reason(module, kind)

    def tensor_shapes(
        self, module: nn.Module, kind: str
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return ((MAGNITUDE, magnitude_shape(module, kind)),)

    def attach(self, module: nn.Module, layer: LoRALayer, dtype: torch.dtype) -> None:
        attach(module, layer, dtype)


#: The registry entry (``core.variants.VARIANTS``).
VARIANT = _Variant()
