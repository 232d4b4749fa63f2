"""EVA, explained-variance adaptation (Paischer et al. 2024, https://arxiv.org/abs/2410.07170):
the data-dependent init ``LoRAConfig.init="eva"``, as PEFT computes it.

Owns: :class:`EvaConfig` (PEFT's ``EvaConfig`` fields), the incremental PCA of each target's
inputs (:class:`IncrementalPCA`, PEFT's ``peft/utils/incremental_pca.py`` in its low-rank,
seeded form), and :func:`prepare`, the ``prepare`` step the init registry (``core.inits``)
runs on real batches. Must not import: anything of this package but ``core.errors`` and
``core.kinds`` (``core.config`` imports :class:`EvaConfig`). PEFT's ``peft/tuners/lora/eva.py``
is the ground truth::

    for each target layer: the inputs x it sees on the batches (token rows where the
        attention mask, and with use_label_mask the labels, keep them)
    IncrementalPCA(n = round(r·rho)) over them, batch after batch, until the first
        components of every layer stop moving (cosine similarity >= tau)
    ranks: the r_total = Σ r largest explained-variance ratios over all layers decide how
        many components each layer keeps (0 removes its adapter)
    A = the kept components (÷ sqrt(singular value) with whiten), B = 0
    alpha ·= new_rank / r where the rank changed (adjust_scaling_factors), so s stays alpha/r

Layers whose inputs are equal on the first batch (query/key/value) share one PCA. Differences
from PEFT, each deliberate: the batches are cycled at most :data:`MAX_PASSES` times (PEFT loops
forever if a layer never converges; here that is an error naming the layers); ``rho`` above
1000 is refused (PEFT caps it by the model's largest dimension); with ``whiten`` two layers
sharing a PCA are each whitened once (PEFT whitens the shared components in place, so the
second layer's rows are divided twice).
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import cycle
from typing import Any

import torch
from torch import nn

from lora_lightning.core.errors import LoRAConfigError

#: How many times the batches are cycled at most while waiting for convergence.
MAX_PASSES = 100
#: PEFT's seed of the low-rank SVD inside its incremental PCA.
LOWRANK_SEED = 42


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig``: the options of ``init="eva"`` (``LoRAConfig.eva_config``).

    Args:
        rho: each layer's PCA keeps ``round(r·rho)`` components, so ranks can grow up to
            that; number in [1, 1000] (1: no redistribution).
        tau: a component has converged once its cosine similarity with the previous
            batch's is at least ``tau``; number in [0, 1].
        use_label_mask: leave out the token rows whose ``labels`` are ``label_mask_value``
            (a batch mapping with ``labels`` shaped like its ``input_ids``).
        label_mask_value: the label of ignored tokens.
        whiten: divide each kept component by the square root of its singular value.
        adjust_scaling_factors: scale ``alpha`` by ``new_rank / r`` where the rank changed,
            so the scaling ``alpha / r`` stays the configured one.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def validate(self) -> EvaConfig:
        """Check every field (numbers stored as ``float``/``int``); returns ``self``.

        Raises:
            LoRAConfigError: naming the field, the value and what is allowed.
        """
        self.rho = _number("rho", self.rho, 1.0, 1000.0)
        self.tau = _number("tau", self.tau, 0.0, 1.0)
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise LoRAConfigError(
                    f"lora.eva_config.{name}={getattr(self, name)!r} is invalid: expected true "
                    "or false"
                )
        value = self.label_mask_value
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise LoRAConfigError(
                f"lora.eva_config.label_mask_value={value!r} is invalid: expected an integer"
            )
        self.label_mask_value = int(value)
        return self


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise LoRAConfigError(
            f"lora.eva_config.{name}={value!r} is invalid: expected a number in [{low:g}, {high:g}]"
        )
    return float(value)


class IncrementalPCA:
    """PEFT's ``IncrementalPCA(n_components, copy=True, lowrank=True, lowrank_seed=42)``:
    ``partial_fit(x)`` (``x`` ``[n, features]``) updates ``components_`` ``[k, features]``,
    ``singular_values_`` and ``explained_variance_ratio_`` ``[k]``; the same ops in the same
    order, so the same numbers."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.lowrank_q = 2 * n_components
        self.components_: torch.Tensor | None = None

    def partial_fit(self, x: torch.Tensor) -> None:
        """One step on the rows of ``x`` (float32 or float64)."""
        x = x.clone()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        n_samples = x.shape[0]
        first = self.components_ is None
        if first:
            self.mean_: torch.Tensor | None = None
            self.var_: torch.Tensor | None = None
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
        col_mean, col_var, total = _incremental_mean_and_var(
            x, self.mean_, self.var_, self.n_samples_seen_
        )
        if first:
            x -= col_mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            x = torch.vstack(
                (
                    self.singular_values_.view((-1, 1)) * self.components_,
                    x,
                    factor * (self.mean_ - batch_mean),
                )
            )
        with torch.random.fork_rng():
            torch.manual_seed(LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(x, q=self.lowrank_q, niter=4)
        vt = v.mH
        # Sign flip (PEFT's _svd_flip, v-based): the largest entry of each row positive.
        rows = torch.argmax(torch.abs(vt), dim=1)
        signs = torch.sign(vt[range(vt.shape[0]), rows])
        vt *= signs.view(-1, 1)
        ratio = s**2 / torch.sum(col_var * total)
        self.n_samples_seen_ = total
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_, self.var_ = col_mean, col_var
        self.explained_variance_ratio_ = ratio[: self.n_components]


def _incremental_mean_and_var(
    x: torch.Tensor,
    last_mean: torch.Tensor | None,
    last_variance: torch.Tensor | None,
    last_count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's (and scikit-learn's) running mean and variance, in float64."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = (
        torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        if last_mean is None
        else last_mean * last_count
    )
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    centred.square_()
    new_unnormalized = centred.sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_variance is None:
        return mean, new_unnormalized / count, count
    ratio = last_count.double() / new_count
    unnormalized = (
        last_variance * last_count
        + new_unnormalized
        + ratio / count * (last_sum / ratio - new_sum).square()
    )
    return mean, unnormalized / count, count


class _SVDHook:
    """A forward hook: one PCA step on the layer's (masked) inputs, and which components
    have converged (PEFT's ``SVDHook``)."""

    def __init__(self, n_components: int, tau: float) -> None:
        self.pca = IncrementalPCA(n_components)
        self.tau = tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.rows: Callable[[torch.Tensor], torch.Tensor] = _flatten

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        states = self.rows(args[0])
        if states.size(0) < self.pca.n_components:
            return  # fewer rows than components: this batch cannot be used (PEFT skips it)
        self.pca.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.pca.components_
        if components.dim() == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        similarity = torch.nn.functional.cosine_similarity(components, previous)
        self.converged = similarity >= self.tau


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``(..., in) -> (n, in)``."""
    return x.reshape(-1, x.size(-1)) if x.dim() > 2 else x


def token_rows(batch: Any, options: EvaConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to cut a layer input ``(batch, tokens, in)`` down to the rows EVA learns from, for
    one model ``batch`` (PEFT's ``prepare_model_inputs_fn_language_modeling``): a mapping with
    ``input_ids``/``attention_mask`` keeps the tokens its attention mask keeps (and with
    ``use_label_mask`` whose ``labels``, when shaped like the mask, are not
    ``label_mask_value``); any other batch keeps every row (``(..., in) -> (n, in)``)."""
    if not isinstance(batch, Mapping) or not ({"input_ids", "attention_mask"} & set(batch)):
        return _flatten
    mask = batch.get("attention_mask")
    mask = (torch.ones_like(batch["input_ids"]) if mask is None else mask).bool()
    labels = batch.get("labels")
    if options.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = torch.logical_and(mask, labels != options.label_mask_value)
    index = mask.nonzero().T.unbind()
    return lambda x: x[index]


def prepare(
    targets: Sequence[tuple[str, nn.Module, int]],
    batches: Sequence[Any],
    run: Callable[[Any], Any],
    options: EvaConfig,
    alpha_for: Callable[[str], float],
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """EVA on ``batches``: per target its ``A`` (``[new_rank, in]``), and the ranks and alphas
    that changed. ``targets`` are ``(name, module, r)``; ``run(batch)`` runs the model.

    Raises:
        LoRAConfigError: ``round(r·rho)`` above a layer's input size, or components that do
            not converge within :data:`MAX_PASSES` passes over the batches.
    """
    modules = {name: module for name, module, _ in targets}
    ranks = {name: r for name, _, r in targets}
    max_components = {name: round(r * options.rho) for name, r in ranks.items()}
    too_many = [
        f"{n} ({k} components, {_in_features(modules[n])} inputs)"
        for n, k in max_components.items()
        if k > _in_features(modules[n])
    ]
    if too_many:
        raise LoRAConfigError(
            f"lora.init='eva' keeps round(r * rho) components of each layer's inputs, more than "
            f"the layer has for {too_many[:4]}; lower lora.r or lora.eva_config.rho"
        )
    budget = sum(ranks.values())
    shared = _equal_inputs(modules, batches[0], run, options)
    for group in _groups(shared):
        largest = max(max_components[n] for n in group)
        for n in group:
            max_components[n] = largest
    hooks = {n: _SVDHook(max_components[n], options.tau) for n in modules if n not in shared}
    handles = {n: modules[n].register_forward_hook(hooks[n]) for n in hooks}
    layer_hook = {**{n: n for n in hooks}, **shared}
    done = dict.fromkeys(hooks, False)
    distribution = dict(max_components)
    try:
        for step, batch in enumerate(cycle(batches)):
            if step >= MAX_PASSES * len(batches):
                pending = [n for n, ok in done.items() if not ok]
                raise LoRAConfigError(
                    f"lora.init='eva': the input components of {pending[:4]} did not converge "
                    f"(cosine similarity >= tau={options.tau:g}) within {MAX_PASSES} passes over "
                    f"the {len(batches)} batch(es); give more batches or a lower tau"
                )
            rows = token_rows(batch, options)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: distribution[name]]))
                if not done[name] and converged and handles[name] is not None:
                    handles[name].remove()
                    handles[name], done[name] = None, True
                    continue
                if done[name] and not converged:
                    handles[name] = modules[name].register_forward_hook(hook)
                    done[name] = False
                hook.rows = rows
            if all(done.values()):
                break
            run(batch)
            if any(hook.pca.components_ is None for hook in hooks.values()):
                continue
            distribution = _distribution(hooks, layer_hook, shared, budget, max_components)
    finally:
        for handle in handles.values():
            if handle is not None:
                handle.remove()
    values, new_ranks, alphas = {}, {}, {}
    for name, rank in distribution.items():
        pca = hooks[layer_hook[name]].pca
        if rank > 0:
            a = pca.components_[:rank].clone()
            if options.whiten:
                a /= pca.singular_values_[:rank].sqrt().reshape(-1, 1)
            values[name] = a
        if rank != ranks[name]:
            new_ranks[name] = rank
            if rank > 0 and options.adjust_scaling_factors:
                alphas[name] = alpha_for(name) * rank / ranks[name]
    return values, new_ranks, alphas


def _in_features(module: nn.Module) -> int:
    """A Linear's ``in`` (weight ``[out, in]``) or a GPT-2 Conv1D's (weight ``[in, out]``)."""
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def _equal_inputs(
    modules: dict[str, nn.Module], batch: Any, run: Callable[[Any], Any], options: EvaConfig
) -> dict[str, str]:
    """Layer -> the first layer (model order) whose inputs on ``batch`` are equal to its own,
    for every layer that has such a predecessor (PEFT's hash of the first batch's inputs)."""
    rows = token_rows(batch, options)
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[name] = rows(args[0]).detach().cpu()

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        run(batch)
    finally:
        for handle in handles:
            handle.remove()
    leaders: list[str] = []
    shared: dict[str, str] = {}
    for name in modules:
        lead = next((o for o in leaders if _same(seen[o], seen[name])), None)
        if lead is None:
            leaders.append(name)
        else:
            shared[name] = lead
    return shared


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _groups(shared: dict[str, str]) -> list[list[str]]:
    """The groups of layers sharing inputs, each led by its first layer."""
    groups: dict[str, list[str]] = {}
    for name, lead in shared.items():
        groups.setdefault(lead, [lead]).append(name)
    return list(groups.values())


def _distribution(
    hooks: dict[str, _SVDHook],
    layer_hook: dict[str, str],
    shared: dict[str, str],
    budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the ``budget`` largest explained-variance ratios
    over every layer decide each layer's rank; a layer sharing another's PCA never ranks
    above it (the larger rank goes to the one holding the PCA)."""
    ratios = {n: h.pca.explained_variance_ratio_[: max_components[n]] for n, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, n in layer_hook.items() for c in ratios[n]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook}
    for name, lead in shared.items():
        rank, rank_lead = counts[name], counts[lead]
        if rank_lead >= rank:
            continue
        counts[lead], counts[name] = rank, rank_lead
    return counts
