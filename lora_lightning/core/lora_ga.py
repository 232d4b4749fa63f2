"""LoRA-GA, LoRA with gradient approximation (Wang et al. 2024, https://arxiv.org/abs/2407.05000):
the data-dependent, base-changing init ``LoRAConfig.init="lora_ga"``, as PEFT computes it.

Owns: :class:`LoraGAConfig` (PEFT's fields), :func:`gradients` (the ``prepare`` step: each
target's weight gradient averaged over the batches) and :func:`init` (``A0``/``B0`` from that
gradient's SVD, the base weight becoming ``W - s·B0 A0``). Must not import: anything of this
package but ``core.errors`` (``core.config`` imports :class:`LoraGAConfig`). PEFT's
``peft/tuners/lora/loraga.py`` (``estimate_gradients``) and ``LoraLayer.lora_ga_init`` are the
ground truth::

    G = mean over the batches of dL/dW            # [out, in], train mode, one backward each
    U S Vᵀ = svd_lowrank(G, q = min(4r, min(out, in)), niter=4)   (the first 2r components)
    direction ArB2r (default): A0 = Vᵀ[:r],  B0 = U[:, r:2r] · diag(S[r:2r])
              A2rBr: A0 = Vᵀ[r:2r], B0 = U[:, :r] · diag(S[:r])
              ArBr:  A0 = Vᵀ[1:2r:2], B0 = U[:, 0:2r:2] · diag(S[0:2r:2])
              random: r of the 2r components, the same for A0 and B0
    scale stable (default): B0 ·= out^(1/4) / sqrt(stable_gamma)
          weight_svd: B0 ·= σ1(W) / S_B[0];  gd_scale: A0, B0 ÷= s;  unit: as they are
    W  <- W - s · B0 A0  (float32, cast back): outputs unchanged at step 0

The randomised SVDs (and ``random``'s choice) draw from a generator seeded per module (PEFT
draws from the global one), so every rank and every run computes the same adapters; PEFT's
differ from them by the signs of the singular vectors (and by its own draws where ``q`` is
below the gradient's rank). Like PiSSA's, a LoRA-GA adapter file is right on the stock base
only converted (``save_adapter(..., convert_to_plain_lora=True)``, LoRACallback's default).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_lightning.core.errors import LoRAConfigError

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """PEFT's ``LoraGAConfig``: the options of ``init="lora_ga"`` (``LoRAConfig.lora_ga_config``).

    Args:
        direction: which gradient components go to A0 and B0 (see the module docstring):
            ``ArB2r`` (default), ``A2rBr``, ``ArBr`` or ``random``.
        scale: how B0 (and A0) are scaled: ``stable`` (default), ``weight_svd``, ``gd_scale``
            or ``unit``.
        stable_gamma: the ``gamma`` of the ``stable`` scale; integer >= 1.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def validate(self) -> LoraGAConfig:
        """Check every field; returns ``self``.

        Raises:
            LoRAConfigError: naming the field, the value and what is allowed.
        """
        for name, allowed in (("direction", DIRECTIONS), ("scale", SCALES)):
            if getattr(self, name) not in allowed:
                raise LoRAConfigError(
                    f"lora.lora_ga_config.{name}={getattr(self, name)!r} is invalid: expected one "
                    f"of {', '.join(allowed)}"
                )
        gamma = self.stable_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise LoRAConfigError(
                f"lora.lora_ga_config.stable_gamma={gamma!r} is invalid: expected an integer >= 1"
            )
        return self


def gradients(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Module, int]],
    batches: Sequence[Any],
    run: Callable[[Any], Any],
) -> dict[str, torch.Tensor]:
    """Each target's weight gradient ``[out, in]``, summed over one backward pass per batch
    and divided by the passes that reached it (PEFT's ``estimate_gradients``), in train mode
    with only the target weights requiring grad. ``run(batch)`` must return the loss (a
    scalar tensor, or an output with ``.loss``/``["loss"]``). The model's mode, flags and
    existing gradients are as before afterwards.

    Raises:
        LoRAConfigError: a batch whose output holds no loss, or a target no gradient reached.
    """
    modules = {name: module for name, module, _ in targets}
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    kept = {name: module.weight.grad for name, module in modules.items()}
    counts = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        def count(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            counts[name] += 1

        return count

    handles = [m.register_full_backward_hook(counter(n)) for n, m in modules.items()]
    try:
        model.train()
        for param, _ in flags:
            param.requires_grad_(False)
        for module in modules.values():
            module.weight.grad = None
            module.weight.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            # The hooks only count calls; that the base's inputs need no gradient is expected.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            for batch in batches:
                _loss(run(batch)).backward()
        idle = [n for n, c in counts.items() if c == 0]
        if idle:
            raise LoRAConfigError(
                f"lora.init='lora_ga': no gradient reached {idle[:4]} on the given batches (the "
                "model does not call them, or the loss does not depend on them); adjust "
                "lora.target_modules"
            )
        return {n: m.weight.grad.detach() / counts[n] for n, m in modules.items()}
    finally:
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.weight.grad = kept[name]
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


def _loss(output: Any) -> torch.Tensor:
    """The loss in a forward's output."""
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise LoRAConfigError(
        f"lora.init='lora_ga' needs a loss from each batch's forward, got a "
        f"{type(output).__name__}; pass a forward that returns it (inject_lora/prepare_lora's "
        "forward=, LoRACallback's init_forward=), e.g. lambda model, batch: model(**batch).loss"
    )


@torch.no_grad()
def init(
    weight: torch.Tensor,
    gradient: torch.Tensor,
    r: int,
    scaling: float,
    options: LoraGAConfig,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0 [r, in], B0 [out, r], W - s·B0 A0)`` of a Linear ``weight`` ``[out, in]`` from its
    ``gradient`` (PEFT's ``lora_ga_init``; A0/B0 in the weight's dtype, the residual too)."""
    dtype = weight.dtype
    grad = gradient.to(torch.float32)
    devices = [grad.device] if grad.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
        vh = v.t()
        u, s, vh = u[:, : 2 * r], s[: 2 * r], vh[: 2 * r, :]
        if options.direction == "ArBr":
            a, b, s_b = vh[1 : 2 * r : 2, :], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]
        elif options.direction == "A2rBr":
            a, b, s_b = vh[r : 2 * r, :], u[:, :r], s[:r]
        elif options.direction == "ArB2r":
            a, b, s_b = vh[:r, :], u[:, r : 2 * r], s[r : 2 * r]
        else:  # random
            indices = torch.randperm(2 * r)[:r]
            a, b, s_b = vh[indices, :], u[:, indices], s[indices]
        b = b @ torch.diag(s_b)  # [out, r] @ [r, r] -> [out, r]
        if options.scale == "stable":
            b = b * ((weight.shape[0] ** 0.25) / (options.stable_gamma**0.5))
        elif options.scale == "weight_svd":
            _, weight_s, _ = torch.svd_lowrank(weight.to(torch.float32), q=r, niter=4)
            if s_b[0] > 0:
                b = b * (weight_s[0] / s_b[0])
        elif options.scale == "gd_scale":
            a, b = a / scaling, b / scaling
    a, b = a.to(dtype), b.to(dtype)
    offset = scaling * (b.float() @ a.float())  # [out, r] @ [r, in] -> [out, in]
    residual = (weight.to(torch.float32) - offset).to(dtype)
    return a.contiguous(), b.contiguous(), residual
