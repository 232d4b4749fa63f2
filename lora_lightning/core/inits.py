"""Adapter initialisations: the registry of every ``LoRAConfig.init`` and the built-in ones.

Owns: :class:`Init` (one registry entry: the name, whether it changes the base weight, the
layer kinds it supports, the function that makes one layer's ``A``/``B``, what PEFT's
``init_lora_weights`` calls it, and for a data-dependent init a ``prepare`` step), the
registry :data:`INITS` and :func:`find_init`, and the plain inits themselves: ``kaiming``,
``gaussian`` (Hu et al. 2021; embeddings as PEFT) and PEFT's base-changing ``pissa``,
``pissa_niter_<k>`` and ``olora``; ``eva``'s entry points to ``core.eva``. ``core.config`` takes its accepted names from here, ``core.layers``
calls the function, ``core.plan`` asks why a layer cannot take an init. Must not import:
``core.config``, ``core.layers``, ``core.plan`` (``core.config`` imports this module), nor
``core.eva`` anything of this one.

A data-dependent init (EVA, ``core.eva``) runs in two steps: ``prepare`` sees the base
model's forward on real batches before any adapter exists (``core.inject.prepare_lora``;
``LoRACallback`` feeds it the first training batches) and returns a :class:`Prepared`: per
layer the values its function then turns into ``A``/``B`` (``InitRequest.prepared``), and
the ranks (and alphas) it chose, which become the config's ``rank_pattern``/``alpha_pattern``.
Those values are what a resume needs back: the callback keeps them in its checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_lightning.core import eva, lora_ga
from lora_lightning.core.errors import LoRAConfigError
from lora_lightning.core.kinds import CONV, EMBEDDING, GPT2_CONV1D, LINEAR

ALL_KINDS = (LINEAR, GPT2_CONV1D, CONV, EMBEDDING)


@dataclass(frozen=True)
class InitRequest:
    """What an init function gets for one layer.

    ``weight`` is the base weight in the layer's own layout (``[out, in]``; ``[in, out]`` for
    GPT-2 Conv1D), ``shape_a``/``shape_b`` the adapter shapes (``core.layers.adapter_shapes``),
    ``seed`` this module's seed (:func:`module_seed`), ``init`` the configured name
    (``pissa_niter_4``), ``prepared`` what a data-dependent init's ``prepare`` produced for this
    layer (None otherwise), ``config`` the ``LoRAConfig`` (an init's own options).
    """

    weight: torch.Tensor
    kind: str
    r: int
    scaling: float
    init: str
    seed: int
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    prepared: Any = None
    config: Any = None


#: ``(A, B, residual)``: A and B in float32 on any device; ``residual`` the new base weight
#: (layout and dtype of ``InitRequest.weight``) for an init that changes the base, else None.
InitResult = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class PrepareRequest:
    """What a data-dependent init's ``prepare`` gets.

    ``targets``: ``(name, module, r)`` of every layer the plan adapts, the base model not yet
    adapted; ``batches``: the batches to run; ``run(batch)`` runs the model on one batch
    (the hooks a ``prepare`` registers on the targets see the layer inputs); ``config``: the
    ``LoRAConfig`` (options such as ``eva_config``); ``model``: the model ``run`` runs (for
    its mode and flags, which ``prepare`` leaves as it found them).
    """

    targets: tuple[tuple[str, nn.Module, int], ...]
    batches: Sequence[Any]
    run: Callable[[Any], Any]
    config: Any
    model: nn.Module


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` found: per layer the value its init function reads
    (``InitRequest.prepared``), and the ranks and alphas it chose where they differ from the
    plan's (a rank of 0 leaves the layer unadapted)."""

    values: dict[str, torch.Tensor]
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Init:
    """One ``LoRAConfig.init`` value (or family, ``pissa_niter_<k>``).

    Args:
        name: the name as documented (a family with its parameter: ``pissa_niter_<k>``).
        pattern: regex full-matched against ``LoRAConfig.init``.
        changes_base: the init rewrites the base weight to ``W - s·B0 A0`` (PiSSA, OLoRA):
            the adapter file is then correct on the stock base only converted.
        kinds: the layer kinds it supports (``core.kinds``).
        function: ``function(InitRequest) -> (A, B, residual or None)``.
        peft_name: PEFT's ``init_lora_weights`` for it (``True``: PEFT's default, written
            for a file whose adapter is plain LoRA on the stock base); None: the configured
            name itself (``pissa_niter_4``).
        factors_weight: it reads the base weight's values, so a meta weight is refused, and
            at most ``min(out, in)`` components exist (a larger rank is refused).
        prepare: for a data-dependent init, ``prepare(PrepareRequest) -> Prepared``.
        rank_multiple: a factorising init that needs ``rank_multiple · r`` components (LoRA-GA
            takes A and B from different components of ``2r``): ``r`` is at most
            ``min(out, in) // rank_multiple``.
    """

    name: str
    pattern: str
    changes_base: bool
    kinds: tuple[str, ...]
    function: Callable[[InitRequest], InitResult]
    peft_name: str | bool | None
    factors_weight: bool = False
    prepare: Callable[[PrepareRequest], Prepared] | None = None
    rank_multiple: int = 1

    def matches(self, init: Any) -> bool:
        """True if ``init`` (a ``LoRAConfig.init`` value) is this entry's."""
        return isinstance(init, str) and re.fullmatch(self.pattern, init) is not None

    def file_name(self, init: str) -> str | bool:
        """What ``adapter_config.json``'s ``init_lora_weights`` says for ``init``."""
        return init if self.peft_name is None else self.peft_name

    def unsupported_reason(
        self, module: nn.Module, kind: str | None, init: str, r: int
    ) -> str | None:
        """Why ``init`` cannot adapt ``module`` (of layer ``kind``) at rank ``r``, or None.
        A factorising init has at most ``min(out, in)`` components: a larger ``r`` would
        inject a smaller adapter than the plan records (and PEFT would write a file it cannot
        read back), so it is refused rather than shrunk."""
        if kind not in self.kinds:
            names = " and ".join(_KIND_NAMES[k] for k in self.kinds)
            return f"a {type(module).__name__}, which init={init!r} cannot adapt (only {names})"
        if not self.factors_weight:
            return None
        if module.weight.device.type == "meta":
            return (
                f"on the meta device: init={init!r} factors the base weight, which has no "
                "values; load the base weights first"
            )
        components = min(module.weight.shape)
        limit = components // self.rank_multiple
        if r > limit:
            k = self.rank_multiple
            needs = f"{k}·r={k * r} (r={r})" if k > 1 else f"r={r}"
            return (
                f"a {tuple(module.weight.shape)} layer: init={init!r} factors its weight into at "
                f"most {components} components, fewer than {needs}; use r <= {limit} for it "
                "(lora.r, or lora.rank_pattern for this module)"
            )
        return None


_KIND_NAMES = {
    LINEAR: "nn.Linear",
    GPT2_CONV1D: "GPT-2 Conv1D",
    CONV: "nn.Conv1d/2d/3d",
    EMBEDDING: "nn.Embedding",
}


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the config seed and the module name, stable across processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------ plain inits
def _random_init(request: InitRequest) -> InitResult:
    """Seeded init on CPU in float32 so every device and dtype starts from the same numbers.

    A linear/conv adapter gets A random, B zeros (Hu et al. 2021), so the model is unchanged at
    step 0. An embedding adapter follows PEFT instead (A zeros, B normal): A is ``[r, vocab]``,
    where a fan-in init over the vocabulary would give near-zero, slow-learning values.
    """
    generator = torch.Generator().manual_seed(request.seed)
    if request.kind == EMBEDDING:
        a = torch.zeros(request.shape_a)
        b = torch.empty(request.shape_b).normal_(generator=generator)
        return a, b, None
    a = torch.empty(request.shape_a)
    if request.init == "gaussian":
        a.normal_(0.0, 1.0 / request.r, generator=generator)
    else:  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT do: bound = 1 / sqrt(fan_in).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a, torch.zeros(request.shape_b), None


@torch.no_grad()
def _base_changing_init(request: InitRequest) -> InitResult:
    """PEFT's PiSSA / OLoRA initialisation (``pissa_init``/``olora_init`` in
    ``peft/tuners/lora/layer.py``), the same ops in the same order, in float32. Returns
    ``A0`` ``[r, in]``, ``B0`` ``[out, r]`` and the residual ``W - s·B0 A0``:

    - ``pissa``: ``W = V S Uᵀ``; ``A0 = sqrt(S_r / s) U_rᵀ``, ``B0 = V_r sqrt(S_r / s)``.
    - ``pissa_niter_<k>``: the same from ``torch.svd_lowrank(W, r, niter=k)``, its random
      draws seeded with the module seed (PEFT draws from the global generator).
    - ``olora``: ``W = Q R``; ``A0 = R[:r]``, ``B0 = Q[:, :r]``.
    """
    return base_changing_init(
        request.weight, request.kind, request.r, request.scaling, request.init, request.seed
    )


@torch.no_grad()
def base_changing_init(
    weight: torch.Tensor, kind: str, r: int, scaling: float, init: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA / OLoRA on ``weight`` (``[out, in]``, ``[in, out]`` for GPT-2 Conv1D): ``(A0, B0,
    residual)`` as :func:`_base_changing_init` describes, the residual in ``weight``'s layout
    and dtype."""
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


# ------------------------------------------------------------------------------------- EVA
def _eva_prepare(request: PrepareRequest) -> Prepared:
    """EVA's data step (``core.eva.prepare``) on the request's targets and batches, in eval
    mode without gradients (as PEFT)."""
    config, model = request.config, request.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values, ranks, alphas = eva.prepare(
                request.targets, request.batches, request.run, config.eva_config, config.alpha_for
            )
    finally:
        model.train(training)
    return Prepared(values=values, ranks=ranks, alphas=alphas)


def _eva_init(request: InitRequest) -> InitResult:
    """``A`` = the layer's kept input components (``[r, in]``), ``B`` = 0 (PEFT's)."""
    # A copy: the prepared values are kept (for checkpoints) apart from the trained A.
    return request.prepared.clone(), torch.zeros(request.shape_b), None


# --------------------------------------------------------------------------------- LoRA-GA
def _lora_ga_prepare(request: PrepareRequest) -> Prepared:
    """LoRA-GA's data step (``core.lora_ga.gradients``): each target's mean weight gradient."""
    return Prepared(values=lora_ga.gradients(request.model, request.targets, request.batches,
                                             request.run))  # fmt: skip


def _lora_ga_init(request: InitRequest) -> InitResult:
    """``A0``/``B0`` from the SVD of the layer's gradient; the base becomes ``W - s·B0 A0``."""
    return lora_ga.init(request.weight, request.prepared, request.r, request.scaling,
                        request.config.lora_ga_config, request.seed)  # fmt: skip


# --------------------------------------------------------------------------------- registry
#: Every init, in the order they are documented. A new init is one entry here (and its
#: module, for anything beyond a few lines).
INITS: tuple[Init, ...] = (
    Init("kaiming", "kaiming", False, ALL_KINDS, _random_init, peft_name=True),
    Init("gaussian", "gaussian", False, ALL_KINDS, _random_init, peft_name="gaussian"),
    Init("pissa", "pissa", True, (LINEAR, GPT2_CONV1D), _base_changing_init, None, True),
    # PEFT's OLoRA factors the stored weight without PEFT's fan_in_fan_out transpose, so on
    # GPT-2 Conv1D its shapes are not LoRA's.
    Init("olora", "olora", True, (LINEAR,), _base_changing_init, None, True),
    Init("pissa_niter_<k>", "pissa_niter_[1-9][0-9]*", True, (LINEAR, GPT2_CONV1D),
         _base_changing_init, None, True),
    Init("eva", "eva", False, (LINEAR, GPT2_CONV1D), _eva_init, "eva", prepare=_eva_prepare),
    # PEFT's LoRA-GA reads out_features from the stored weight's first dimension, the input
    # size of a GPT-2 Conv1D: Linear only, so that files agree.
    Init("lora_ga", "lora_ga", True, (LINEAR,), _lora_ga_init, None, factors_weight=True,
         prepare=_lora_ga_prepare, rank_multiple=2),
)  # fmt: skip


def init_names() -> tuple[str, ...]:
    """The documented name of every init (``pissa_niter_<k>`` for the family)."""
    return tuple(init.name for init in INITS)


def find_init(init: Any) -> Init:
    """The registry entry of ``init`` (a ``LoRAConfig.init`` value).

    Raises:
        LoRAConfigError: no entry matches, naming the valid names.
    """
    for entry in INITS:
        if entry.matches(init):
            return entry
    raise LoRAConfigError(
        f"lora.init={init!r} is invalid: expected one of {', '.join(init_names())} "
        "(k an integer >= 1, e.g. pissa_niter_4)"
    )
