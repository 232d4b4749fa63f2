"""DoRA, weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): the
variant of a Linear or GPT-2 Conv1D adapter that ``LoRAConfig.use_dora`` switches on.

Owns: the magnitude parameter (``lora_magnitude_vector``, PEFT's name and state-dict key),
its initialisation, the row norm of ``W + s·B A`` (:func:`weight_norm`, within a stated
rounding bound and without forming the ``[out, in]`` matrix), DoRA's forward (called by the
layer's forward hook through its :class:`DoRA` variant), and its merged weight. Must not
import: ``core.plan``, ``core.inject``, ``core.merge``, ``core.adapter``, Lightning. PEFT's
code (``peft/tuners/lora/dora.py``, ``variants.py``) is the ground truth for the maths::

    V  = W + s · B A                     # [out, in] (never formed in the forward)
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

The norm, per row ``i`` (``w_i``, ``b_i`` rows of ``W`` and ``B``)::

    ||w_i + s b_i A||² = ||w_i||² + 2 s <W Aᵀ, B>_i + s² <B (A Aᵀ), B>_i

``||w_i||²`` costs one read of ``W`` (``out·in``), the other terms ``out·in·r`` and
``(in + out)·r²`` with ``[out, r]`` temporaries, where PEFT forms ``B A`` through an
``[in, in]`` identity and then the full ``[out, in]`` sum every forward. All of it is
recomputed every forward: a cached ``||w_i||²`` keyed on the weight's version counter went
stale after ``weight.data.copy_(...)`` (which bumps no counter), silently, and recomputing
costs no measurable time (``experiments/bench/results/cache_cost.md``).
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

__all__ = ["DoRA", "KINDS", "MAGNITUDE", "VARIANT", "attach", "naive_weight_norm", "weight_norm"]
#: DoRA's magnitude: a parameter of the adapted layer itself, so its state-dict key is
#: ``<path>.lora_magnitude_vector``, PEFT's file key.
MAGNITUDE = "lora_magnitude_vector"
#: Layer kinds DoRA adapts (PEFT's DoRA for ConvNd/Embedding is not implemented here).
KINDS = (LINEAR, GPT2_CONV1D)
#: ``hidden(module, layer, x) -> A x`` (dropout-free): the layer's own, shared-input aware.
Hidden = Callable[[nn.Module, LoRALayer, torch.Tensor], torch.Tensor]
#: The largest condition ``κ`` (see :func:`weight_norm`) of a row whose norm comes from the
#: expanded square; rows above it are formed directly. Bounds the expansion's relative error
#: by ``50·γ_{in+2r+5}`` (about ``50·(in+2r)·u``, ``√(in+2r)`` times less for random rounding).
EXPANSION_MAX_CONDITION = 100.0


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
    """``||W + s·B A||`` per output row, without forming the ``[out, in]`` sum
    (``||w||² + 2s·w·(BA) + s²||BA||²``; rows where that expansion loses precision are
    formed directly), within a rounding-error bound of the exact norm (below).

    ``weight`` is ``[out, in]`` (``[in, out]`` with ``transposed``, GPT-2 Conv1D), ``a``
    ``[r, in]``, ``b`` ``[out, r]``.
    Computed in at least float32; returns ``[out]`` in that dtype, detached.

    Precision, per row (``u`` the unit roundoff of that dtype, ``γ_k = k·u/(1 - k·u)``,
    ``ṽ = |b_i|ᵀ|A|`` the row of ``B A`` with no cancellation inside it,
    ``κ = || |w_i| + s·ṽ ||² / ||w_i + s·b_i A||²``): a row from the expansion is within
    ``(γ_{in+2r+5}·κ/2 + u)`` relative of the exact norm, and it is used only where
    ``κ <= EXPANSION_MAX_CONDITION`` (up to rounding); a row formed directly, as the
    naive norm in that dtype, is within ``γ_{r+2}·√κ + γ_in/2 + u``.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    w, a, b = weight.to(dtype), a.to(dtype), b.to(dtype)
    weight_sq = row_sq_norms(w, transposed=transposed)
    wa = (a @ w).t() if transposed else w @ a.t()  # [out, in] @ [in, r] -> [out, r]
    cross = (wa * b).sum(1)
    lora_sq = ((b @ (a @ a.t())) * b).sum(1)  # [out, r] @ [r, r] -> [out, r]
    sq = weight_sq + (scaling * scaling) * lora_sq + (2.0 * scaling) * cross
    # Each term's rounding error is at most γ·(its sum taken over absolute values), so the
    # expansion's error is γ·|| |w| + s·ṽ ||², which is κ·sq: large where s·B A nearly negates
    # W's row and also where B A's row cancels within itself (b_i A small beside |b_i|ᵀ|A|,
    # which a rank r above in allows exactly). Bound that square without forming ṽ
    # (||ṽ|| <= Σ_k |b_ik|·||A_k||, Cauchy-Schwarz for the cross term) and form the rows over
    # the limit directly. Rare in training: without cancellation the bound stays below about
    # (1 + 2r/π)·sq (random B, A's rows near-orthogonal of like norms), so it passes the limit only
    # for ranks above ~150 with s·B A's row about as long as W's (measured 2026-12-03, in=1024,
    # r=256: 19% of rows formed directly at s·||b_i A|| = ||w_i||, all at twice that; none at
    # r=64), or where s·B A's row nearly negates W's.
    lora_bound = b.abs() @ a.norm(dim=1)  # [out, r] @ [r] -> [out]
    bound_sq = (weight_sq.sqrt() + abs(scaling) * lora_bound).square()
    ill = sq * EXPANSION_MAX_CONDITION < bound_sq
    if bool(ill.any()):
        rows = ill.nonzero().squeeze(1)
        w_rows = w[:, rows].t() if transposed else w[rows]  # [k, in]
        sq[rows] = (w_rows + scaling * (b[rows] @ a)).square().sum(1)
    return sq.clamp_min_(0).sqrt_()


def naive_weight_norm(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, *,
    transposed: bool = False,
) -> torch.Tensor:  # fmt: skip
    """PEFT's ``||W + s·B A||_row`` through the full ``[out, in]`` matrix (the reference of
    :func:`weight_norm`), in the promoted dtype of the inputs."""
    w = weight.t() if transposed else weight
    return torch.linalg.norm(w + scaling * (b @ a), dim=1)


def row_sq_norms(weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """``||w_i||²`` of every output row ``i`` of ``weight`` (``[out, in]``, or ``[in, out]``
    with ``transposed``) -> ``[out]``."""
    return weight.square().sum(0 if transposed else 1)


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
