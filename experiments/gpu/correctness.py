"""Step 1, correctness: the LoRA kernels, dropout, ``bf16-mixed`` Lightning training against
PEFT, and merge/unmerge, on the run's device (CUDA on the GPU machine, the CPU with --smoke).

- ``kernels/<base>_base-<adapter>_adapter[-autocast_<dtype>]``: a block with three sibling
  Linears reading one input (query/key/value: our fused shared-input path), their product fed
  to a GPT-2 ``Conv1D``, all four adapted (r=8, alpha=16, random B). Forward output and the
  gradients of the input and of every A and B are compared with the same block computed by
  plain autograd (``W x + s * B A x`` written out), both against a float64 computation: ours
  must be within the dtype's floor (``common.REL_FLOOR``) or within 4x plain autograd's own
  error. Output and gradient dtypes must be those of the base and of the parameters.
- ``dropout``: LoRA dropout 0.25 on one Linear whose base weight is zero; the mask is read
  back from the input gradient. Drop rate within 6 sigma of p, forward equal to the masked
  computation, eval mode without dropout, same seed -> same mask, new seed -> new mask.
- ``lightning_bf16_mixed_vs_peft``: MiniLM (real weights), LoRA on query/key/value, dropout
  0, trained by Lightning with ``precision="bf16-mixed"`` for a few steps, once with
  ``LoRACallback`` and once as a PEFT model (PEFT's A copied from ours), same batches, same
  seed: per-step losses must agree within ``LOSS_TOLERANCE``.
- ``merge_unmerge/<dtype>``: the MiniLM encoder with LoRA on every Linear (the default job's
  targets), random B: ``merge_lora`` / ``unmerge_lora`` / ``unload_lora(merge=True)``
  outputs agree with the unmerged model, and the base weights survive the round trip.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments.gpu.common import (
    ALPHA,
    RANK,
    REL_FLOOR,
    SEED,
    Context,
    Recorder,
    SkipCheck,
    accept,
    batch_loader,
    dtype_name,
    lightning_classifier,
    lowest_precision,
    minilm,
    ours_config,
    quiet_trainer,
    rel_err,
    token_batches,
)
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    inject_lora,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
#: (base dtype, adapter dtype, autocast dtype or None): the mixes users run.
KERNEL_CASES = [
    (F32, F32, None),
    (BF16, BF16, None),
    (F16, F16, None),
    (BF16, F32, None),
    (F16, F32, None),
    (F32, BF16, None),
    (F32, F32, BF16),
    (F32, F32, F16),
]
LAYERS = ("query", "key", "value", "proj")
DROPOUT_P = 0.25  # a multiple of 2**-16: the CPU fast mask uses exactly this rate
#: bf16-mixed training, ours vs PEFT: max |loss difference| allowed per step.
LOSS_TOLERANCE = 2e-2
#: Merge round trip: max |W' - W| / max |W| allowed, by base dtype (one bf16 ulp is 2**-8).
WEIGHT_ROUND_TRIP = {F32: 1e-6, BF16: 2**-7}
#: Merged vs unmerged outputs, relative to the output scale (SPEC: 1e-5 in float32).
MERGE_TOLERANCE = {F32: 1e-5, BF16: 3e-2}


def run(ctx: Context, rec: Recorder) -> None:
    for base, adapter, autocast in KERNEL_CASES:
        name = f"kernels/{dtype_name(base)}_base-{dtype_name(adapter)}_adapter"
        if autocast is not None:
            name += f"-autocast_{dtype_name(autocast)}"
        with rec.check(name) as entry:
            entry.update(kernel_case(ctx, base, adapter, autocast))
    with rec.check("dropout") as entry:
        entry.update(dropout_case(ctx))
    with rec.check("lightning_bf16_mixed_vs_peft") as entry:
        entry.update(lightning_vs_peft(ctx))
    for dtype in (F32, BF16):
        with rec.check(f"merge_unmerge/{dtype_name(dtype)}_base") as entry:
            entry.update(merge_case(ctx, dtype))


# ------------------------------------------------------------------------------------ kernels
class KernelBlock(nn.Module):
    """query/key/value siblings on one input (our shared-input group), then a GPT-2 Conv1D.

    ``forward(x, layer)`` computes each layer through ``layer(name, x)`` when given: the
    reference passes a function adding the LoRA term with plain autograd ops.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.query = nn.Linear(d_in, d_out)
        self.key = nn.Linear(d_in, d_out)
        self.value = nn.Linear(d_in, d_out)
        self.proj = Conv1D(d_out, d_out)  # weight stored [in, out], as in GPT-2
        with torch.no_grad():
            self.proj.weight.normal_(0, d_out**-0.5)
            self.proj.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor, layer: Any = None) -> torch.Tensor:
        f = layer or (lambda name, h: getattr(self, name)(h))
        hidden = f("query", x) * torch.sigmoid(f("key", x)) + f("value", x)
        return f("proj", hidden)


def _lora_parts(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A, B)}`` for every adapted layer of ``model`` (the public state-dict names)."""
    params = dict(model.named_parameters())
    return {
        name: (params[f"{name}.lora_A.weight"], params[f"{name}.lora_B.weight"])
        for name in LAYERS
        if f"{name}.lora_A.weight" in params
    }


def _plain_forward(
    plain: KernelBlock, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float
) -> Any:
    """The reference: each layer is the plain module plus ``s * B A x`` in plain autograd,
    the input cast to the adapter dtype and the term cast back to the layer's output dtype."""

    def layer(name: str, x: torch.Tensor) -> torch.Tensor:
        out = getattr(plain, name)(x)
        a, b = parts[name]
        delta = F.linear(F.linear(x.to(a.dtype), a), b)
        return out + scaling * delta.to(out.dtype)

    return layer


def kernel_case(
    ctx: Context, base: torch.dtype, adapter: torch.dtype, autocast: torch.dtype | None
) -> dict[str, Any]:
    device = ctx.device
    d, tokens = (64, (2, 16)) if ctx.smoke else (1024, (4, 256))
    torch.manual_seed(SEED)
    plain = KernelBlock(d, d)
    ours = copy.deepcopy(plain)
    inject_lora(
        ours,
        LoRAConfig(
            r=RANK,
            alpha=ALPHA,
            dropout=0.0,
            dtype=dtype_name(adapter),
            target_modules=["query", "key", "value", "proj"],
        ),
    )
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, b in _lora_parts(ours).values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    plain.requires_grad_(False)
    ours.to(device)
    # Cast the base only (the adapters keep their configured dtype).
    for name in LAYERS:
        getattr(ours, name).weight.data = getattr(ours, name).weight.data.to(base)
        getattr(ours, name).bias.data = getattr(ours, name).bias.data.to(base)
    plain_lp = copy.deepcopy(plain).to(device=device, dtype=base)
    # The float64 truth starts from exactly the (rounded) weights and input the others see.
    plain_64 = copy.deepcopy(plain_lp).to(torch.float64)
    ours_parts = _lora_parts(ours)
    ref_parts = {
        n: (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
        for n, (a, b) in ours_parts.items()
    }
    exact_parts = {
        n: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
        for n, (a, b) in ours_parts.items()
    }
    scaling = ALPHA / RANK
    x0 = torch.randn(*tokens, d, generator=generator).to(device)
    grad_out = torch.randn(*tokens, d, generator=generator).to(device)

    x_in = x0.to(base)  # activations arrive in the model's dtype

    def run_one(model: nn.Module, layer: Any, x_dtype: torch.dtype, mixed: bool) -> Any:
        x = x_in.to(x_dtype).detach().clone().requires_grad_()
        with torch.autocast(device, dtype=autocast or BF16, enabled=mixed and autocast is not None):
            y = model(x, layer) if layer is not None else model(x)
        (y.double() * grad_out.double()).sum().backward()
        return x, y

    x_ours, y_ours = run_one(ours, None, base, mixed=True)
    x_ref, y_ref = run_one(plain_lp, _plain_forward(plain_lp, ref_parts, scaling), base, True)
    x_64, y_64 = run_one(
        plain_64, _plain_forward(plain_64, exact_parts, scaling), torch.float64, False
    )

    precision = lowest_precision(base, adapter, autocast)
    compared: dict[str, dict[str, float]] = {}

    def compare(label: str, mine: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
        compared[label] = {"ours": rel_err(mine, exact), "plain_autograd": rel_err(ref, exact)}

    compare("output", y_ours, y_ref, y_64)
    compare("grad_input", x_ours.grad, x_ref.grad, x_64.grad)
    for name in ours_parts:
        for i, part in enumerate(("A", "B")):
            compare(
                f"grad_{name}.lora_{part}",
                ours_parts[name][i].grad,
                ref_parts[name][i].grad,
                exact_parts[name][i].grad,
            )
    bad = [k for k, v in compared.items() if not accept(v["ours"], v["plain_autograd"], precision)]
    dtypes_ok = (
        y_ours.dtype == y_ref.dtype
        and x_ours.grad.dtype == x_ours.dtype
        and all(p.grad.dtype == p.dtype for pair in ours_parts.values() for p in pair)
    )
    frozen_ok = all(
        getattr(ours, n).weight.grad is None and getattr(ours, n).bias.grad is None for n in LAYERS
    )
    worst = max(compared, key=lambda k: compared[k]["ours"])
    return {
        "ok": not bad and dtypes_ok and frozen_ok,
        "summary": f"worst {worst}: ours {compared[worst]['ours']:.2e}, plain autograd "
        f"{compared[worst]['plain_autograd']:.2e} (floor {REL_FLOOR[precision]:.0e})",
        "shape": {"d_in": d, "d_out": d, "tokens": list(tokens)},
        "precision": dtype_name(precision),
        "output_dtype": dtype_name(y_ours.dtype),
        "dtypes_ok": dtypes_ok,
        "frozen_base_has_no_grad": frozen_ok,
        "max_rel_err": compared,
        "failed_tensors": bad,
    }


# ------------------------------------------------------------------------------------ dropout
def dropout_case(ctx: Context) -> dict[str, Any]:
    device = ctx.device
    d_in, d_out, n = (64, 32, 4096) if ctx.smoke else (1024, 512, 16384)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    nn.init.zeros_(model[0].weight)  # y = s * B A dropout(x) alone
    inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT_P, target_modules=["0"]))
    (a, b) = (model[0].lora_A.weight, model[0].lora_B.weight)
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(SEED + 2)))
    model.to(device).train()
    generator = torch.Generator().manual_seed(SEED + 3)
    x0 = (torch.rand(n, d_in, generator=generator) + 0.5).to(device)  # no zeros in x
    grad_out = torch.randn(n, d_out, generator=generator).to(device)
    scaling = ALPHA / RANK

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        x = x0.clone().requires_grad_()
        y = model(x)
        y.backward(grad_out)
        return y.detach(), (x.grad != 0)

    y1, keep1 = draw(11)
    _, keep1_again = draw(11)
    _, keep2 = draw(12)
    rate = 1.0 - keep1.double().mean().item()
    sigma = math.sqrt(DROPOUT_P * (1 - DROPOUT_P) / keep1.numel())
    with torch.no_grad():
        expected = scaling * F.linear(F.linear(x0 * keep1 / (1 - DROPOUT_P), a), b)
        forward_err = rel_err(y1, expected)
        model.eval()
        eval_err = rel_err(model(x0), scaling * F.linear(F.linear(x0, a), b))
    checks = {
        "drop_rate_within_6_sigma": abs(rate - DROPOUT_P) <= 6 * sigma,
        "forward_matches_masked_computation": forward_err <= REL_FLOOR[F32],
        "eval_mode_has_no_dropout": eval_err <= REL_FLOOR[F32],
        "same_seed_same_mask": bool(torch.equal(keep1, keep1_again)),
        "new_seed_new_mask": not bool(torch.equal(keep1, keep2)),
    }
    return {
        "ok": all(checks.values()),
        "summary": f"drop rate {rate:.4f} (p={DROPOUT_P}, sigma {sigma:.1e}), forward err "
        f"{forward_err:.1e}",
        "checks": checks,
        "p": DROPOUT_P,
        "measured_drop_rate": rate,
        "mask_elements": keep1.numel(),
        "forward_rel_err": forward_err,
        "eval_rel_err": eval_err,
    }


# ---------------------------------------------------------------------- Lightning vs PEFT
def lightning_vs_peft(ctx: Context) -> dict[str, Any]:
    import lightning.pytorch as pl

    from experiments.bench.train_step import adapt_peft, align_peft_to_ours

    steps, batch, seq_len = (2, 2, 8) if ctx.smoke else (12, 32, 64)
    precision = "bf16-mixed"
    config = ours_config("minilm")
    ours = lightning_classifier(minilm())
    inject_lora(ours, config)  # now, so PEFT can copy A; the callback's injection is a no-op
    theirs = lightning_classifier(adapt_peft(minilm(), dropout=0.0))
    alignment = align_peft_to_ours(ours.model, theirs.model)
    batches = token_batches(ours.model.config.vocab_size, steps, batch, seq_len)
    runs = {}
    for label, module, callbacks in (
        ("lora_lightning", ours, [LoRACallback(config, export_on_train_end=False)]),
        ("peft", theirs, []),
    ):
        pl.seed_everything(SEED, verbose=False)
        trainer = quiet_trainer(ctx, precision=precision, max_steps=steps, callbacks=callbacks)
        trainer.fit(module, batch_loader(batches))
        runs[label] = module.losses
    diffs = [abs(a - b) for a, b in zip(runs["lora_lightning"], runs["peft"], strict=True)]
    adapter_dtypes = sorted({str(p.dtype) for n, p in ours.named_parameters() if "lora_" in n})
    learned = runs["lora_lightning"][-1] != runs["lora_lightning"][0]
    return {
        "ok": alignment["same_state_dict_keys"]
        and alignment["max_abs_weight_diff_after_copy"] == 0
        and len(diffs) == steps
        and max(diffs) <= LOSS_TOLERANCE
        and adapter_dtypes == ["torch.float32"]
        and learned,
        "summary": f"max |loss diff| {max(diffs):.2e} over {steps} steps (tolerance "
        f"{LOSS_TOLERANCE:.0e})",
        "precision": precision,
        "steps": steps,
        "batch": [batch, seq_len],
        "losses_lora_lightning": runs["lora_lightning"],
        "losses_peft": runs["peft"],
        "max_abs_loss_diff": max(diffs),
        "tolerance": LOSS_TOLERANCE,
        "alignment": alignment,
        "adapter_dtypes_after_training": adapter_dtypes,
        "loss_changed": learned,
    }


# ------------------------------------------------------------------------------ merge/unmerge
def merge_case(ctx: Context, dtype: torch.dtype) -> dict[str, Any]:
    from experiments.bench.inference import forward, randomize_b

    if dtype == BF16 and not ctx.cuda and not ctx.smoke:
        raise SkipCheck("bf16 merge is checked on CUDA")
    device = ctx.device
    batch, seq_len = (2, 16) if ctx.smoke else (16, 128)
    model = minilm(num_labels=None)
    inject_lora(
        model,
        LoRAConfig(
            r=RANK,
            alpha=ALPHA,
            target_modules=[r".*\.(query|key|value|dense)"],
            exclude_modules=[".*pooler.*"],
        ),
    )
    randomize_b(model)
    # The base in `dtype`, the adapters stay float32 (what users of bf16 checkpoints run).
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(dtype)
    model.to(device).eval()
    weights = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("dense.weight")
    }
    ids = torch.randint(
        0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(5)
    )
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    unmerged = forward(model, inputs)
    merge_lora(model)
    merged = forward(model, inputs)
    unmerge_lora(model)
    again = forward(model, inputs)
    round_trip = max(rel_err(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    plain = unload_lora(model, merge=True)
    unloaded = forward(plain, inputs)
    leftovers = [n for n, _ in plain.named_parameters() if "lora_" in n]
    base_model = minilm(num_labels=None).to(device=device, dtype=dtype).eval()
    base_out = forward(base_model, inputs)
    tol = MERGE_TOLERANCE[dtype]
    errors = {
        "merged_vs_unmerged": rel_err(merged, unmerged),
        "unmerged_again_vs_unmerged": rel_err(again, unmerged),
        "unloaded_merged_vs_unmerged": rel_err(unloaded, unmerged),
        "base_vs_unmerged (must be large)": rel_err(base_out, unmerged),
    }
    checks = {
        "merged_matches": errors["merged_vs_unmerged"] <= tol,
        "unmerge_restores_outputs": errors["unmerged_again_vs_unmerged"] <= tol,
        "unload_matches": errors["unloaded_merged_vs_unmerged"] <= tol,
        "adapters_change_the_output": errors["base_vs_unmerged (must be large)"]
        > 10 * max(errors["merged_vs_unmerged"], errors["unloaded_merged_vs_unmerged"], 1e-5),
        "base_weights_survive_round_trip": round_trip <= WEIGHT_ROUND_TRIP[dtype],
        "unload_leaves_no_lora_parameters": not leftovers,
        "output_dtype_is_base_dtype": unmerged.dtype == dtype,
    }
    return {
        "ok": all(checks.values()),
        "summary": f"merged vs unmerged {errors['merged_vs_unmerged']:.1e}, weight round trip "
        f"{round_trip:.1e} (tolerances {tol:.0e}, {WEIGHT_ROUND_TRIP[dtype]:.0e})",
        "base_dtype": dtype_name(dtype),
        "adapter_dtype": "float32",
        "batch": [batch, seq_len],
        "rel_errors": errors,
        "weight_round_trip_rel_err": round_trip,
        "checks": checks,
        "tolerance": tol,
    }
