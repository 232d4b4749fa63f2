"""Training-step time on the real MiniLM-L6: lora_lightning vs PEFT vs full fine-tuning.

One step is forward + cross-entropy loss + backward + ``AdamW.step()`` + ``zero_grad()`` on a
fixed batch (32 sequences x 64 random token ids, attention mask all ones, random labels; seed
0). LoRA: r=8, alpha=16, on ``query``/``key``/``value`` of all 6 layers (18 modules), AdamW lr
1e-3 over the trainable (adapter) parameters only; the classifier head stays frozen in both
(``modules_to_save=[]`` here, no ``task_type`` in PEFT), so both train exactly the same
110,592 parameters.

1. Numerics (dropout 0): PEFT's ``lora_A`` is overwritten with ours, the base weights are
   checked equal, and both train for 3 steps on the same batch with the same RNG state (BERT's
   own dropout is active in train mode); the per-step losses must agree to 1e-6. These steps
   are also the two models' warm-up; every other model gets ``--warmup`` untimed steps.
2. Timing, dropout 0.0: ours, PEFT and full fine-tuning, ``--repeats`` interleaved rounds of
   ``--steps`` steps each (order rotated every round).
3. Timing, dropout 0.1: ours and PEFT (fresh models), half as many rounds.

Goal: ours / PEFT <= 1.0 within noise (median of per-round ratios).
``--profile`` adds a torch.profiler table (ops by input shape) of one step of each LoRA
variant and writes ``train_step_profile.json``/``.md`` instead.

Run: ``python -m experiments.bench.train_step [--repeats N] [--quick] [--profile] [--out DIR]``
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from experiments.bench.common import (
    RATIO_HEADERS,
    apply_threads,
    base_parser,
    goal,
    goal_line,
    interleave,
    machine_info,
    machine_lines,
    markdown_table,
    minilm_dir,
    ms,
    ratio_summary,
    summary,
    timed,
    write_results,
)
from lora_lightning import LoRAConfig, inject_lora

NAME = "train_step"
RANK, ALPHA, LR = 8, 16, 1e-3
SEED = 0
NUMERICS_TOLERANCE = 1e-6
NUMERICS_STEPS = 3
GOAL_RATIO = 1.0
DEFAULT_REPEATS = 8
PEFT_PREFIX = "base_model.model."


@dataclass
class Sizes:
    batch: int
    seq_len: int
    repeats: int
    steps: int
    warmup: int


@dataclass
class Stepper:
    """A model, its optimizer over trainable parameters, and the fixed batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]

    def step(self) -> float:
        """One full training step; returns the loss before the update."""
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def timed_steps(self, steps: int) -> Callable[[], float]:
        """A callable that runs ``steps`` steps and returns the mean seconds per step."""

        def run() -> float:
            seconds, _ = timed(lambda: [self.step() for _ in range(steps)])
            return seconds / steps

        return run


def load_minilm() -> nn.Module:
    """Pretrained MiniLM-L6 with a 2-way head; the new head's init is seeded, so every call
    returns identical weights."""
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report, every load
    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=2, local_files_only=True
    )


def make_batch(model: nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Random token ids (seeded), an all-ones attention mask and random binary labels."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def adapt_ours(model: nn.Module, dropout: float) -> nn.Module:
    """``inject_lora`` on query/key/value, in place; returns ``model``."""
    config = LoRAConfig(
        r=RANK,
        alpha=ALPHA,
        dropout=dropout,
        target_modules=[r".*\.(query|key|value)"],
        modules_to_save=[],
    )
    inject_lora(model, config)
    return model


def adapt_peft(model: nn.Module, dropout: float) -> nn.Module:
    """PEFT's ``get_peft_model`` on query/key/value; returns the ``PeftModel``."""
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["query", "key", "value"]
    )
    return get_peft_model(model, config)


def stepper(model: nn.Module, batch: dict[str, torch.Tensor]) -> Stepper:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Stepper(model, torch.optim.AdamW(params, lr=LR), batch)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def align_peft_to_ours(ours: nn.Module, peft_model: nn.Module) -> dict[str, Any]:
    """Copy our ``lora_A`` into PEFT's; check base weights and ``lora_B`` already agree."""
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if hasattr(module, "lora_A"):  # ours: a plain module, never PEFT's ModuleDict
                base.get_submodule(name).lora_A["default"].weight.copy_(module.lora_A.weight)
    ours_sd = ours.state_dict()
    peft_sd = {
        key.removeprefix(PEFT_PREFIX).replace(".base_layer", "").replace(".default", ""): value
        for key, value in peft_model.state_dict().items()
    }
    same_keys = set(ours_sd) == set(peft_sd)
    max_diff = max(
        ((ours_sd[k] - peft_sd[k]).abs().max().item() for k in ours_sd if k in peft_sd),
        default=math.inf,
    )
    return {"same_state_dict_keys": same_keys, "max_abs_weight_diff_after_copy": max_diff}


def check_numerics(ours: Stepper, peft: Stepper, steps: int) -> dict[str, Any]:
    """Train both on the same batch for ``steps`` steps; compare losses and final adapters."""
    alignment = align_peft_to_ours(ours.model, peft.model)
    losses_ours, losses_peft = [], []
    for i in range(steps):
        # The same RNG state for both: BERT's own dropout layers are active in train mode.
        torch.manual_seed(SEED + i)
        losses_ours.append(ours.step())
        torch.manual_seed(SEED + i)
        losses_peft.append(peft.step())
    max_loss_diff = max(abs(a - b) for a, b in zip(losses_ours, losses_peft, strict=True))
    weight_diff = _max_adapter_diff(ours.model, peft.model)
    return {
        **alignment,
        "steps": steps,
        "losses_lora_lightning": losses_ours,
        "losses_peft": losses_peft,
        "max_abs_loss_diff": max_loss_diff,
        "max_abs_adapter_diff_after_steps": weight_diff,
        "tolerance": NUMERICS_TOLERANCE,
        "ok": alignment["same_state_dict_keys"]
        and alignment["max_abs_weight_diff_after_copy"] == 0
        and max_loss_diff <= NUMERICS_TOLERANCE,
    }


def _max_adapter_diff(ours: nn.Module, peft_model: nn.Module) -> float:
    base = peft_model.get_base_model()
    diffs = []
    for name, module in ours.named_modules():
        if hasattr(module, "lora_A") and not isinstance(module.lora_A, nn.ModuleDict):
            theirs = base.get_submodule(name)
            for part in ("lora_A", "lora_B"):
                mine = getattr(module, part).weight
                other = getattr(theirs, part)["default"].weight
                diffs.append((mine - other).abs().max().item())
    return max(diffs)


def time_variants(steppers: dict[str, Stepper], rounds: int, steps: int) -> dict[str, Any]:
    times = interleave({name: s.timed_steps(steps) for name, s in steppers.items()}, rounds)
    ratios = {
        "lora_lightning/peft": ratio_summary(times["lora_lightning"], times["peft"]),
    }
    if "full_finetune" in times:
        for name in ("lora_lightning", "peft"):
            ratios[f"{name}/full_finetune"] = ratio_summary(times[name], times["full_finetune"])
    return {
        "rounds": rounds,
        "steps_per_round": steps,
        "times": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
    }


def profile_step(steppers: dict[str, Stepper], top: int = 20) -> dict[str, Any]:
    """torch.profiler over one step of each variant: the ops (by input shapes) taking most
    self CPU time. The LoRA GEMMs are the ones with a dimension equal to r."""
    tables = {}
    for name, s in steppers.items():
        s.step()  # warm
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            s.step()
        events = sorted(
            prof.key_averages(group_by_input_shape=True),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )
        total = sum(e.self_cpu_time_total for e in events)
        tables[name] = {
            "total_self_cpu_ms": total / 1e3,
            "top_ops": [
                {
                    "op": e.key,
                    "input_shapes": str(e.input_shapes),
                    "calls": e.count,
                    "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "self_cpu_percent": 100 * e.self_cpu_time_total / total,
                }
                for e in events[:top]
            ],
        }
    return tables


def run(sizes: Sizes, with_profile: bool) -> dict[str, Any]:
    # Phase 1: dropout 0 -- numerics (as warm-up of the LoRA models), then three-way timing.
    ours_model = adapt_ours(load_minilm(), dropout=0.0)
    batch = make_batch(ours_model, sizes.batch, sizes.seq_len)
    ours = stepper(ours_model, batch)
    peft = stepper(adapt_peft(load_minilm(), dropout=0.0), batch)
    full = stepper(load_minilm(), batch)
    counts = {
        "lora_lightning": trainable_count(ours.model),
        "peft": trainable_count(peft.model),
        "full_finetune": trainable_count(full.model),
    }
    numerics = check_numerics(ours, peft, max(NUMERICS_STEPS, sizes.warmup))
    for _ in range(sizes.warmup):
        full.step()
    phase1 = {"lora_lightning": ours, "peft": peft, "full_finetune": full}
    dropout_0 = time_variants(phase1, sizes.repeats, sizes.steps)
    profiled = profile_step({"lora_lightning": ours, "peft": peft}) if with_profile else None
    del ours, peft, full, phase1

    # Phase 2: dropout 0.1, fresh LoRA models.
    ours = stepper(adapt_ours(load_minilm(), dropout=0.1), batch)
    peft = stepper(adapt_peft(load_minilm(), dropout=0.1), batch)
    for _ in range(sizes.warmup):
        ours.step()
        peft.step()
    dropout_01 = time_variants(
        {"lora_lightning": ours, "peft": peft}, max(1, math.ceil(sizes.repeats / 2)), sizes.steps
    )

    result: dict[str, Any] = {
        "setup": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, num_labels=2)",
            "batch_size": sizes.batch,
            "seq_len": sizes.seq_len,
            "r": RANK,
            "alpha": ALPHA,
            "targets": ["query", "key", "value"],
            "optimizer": f"AdamW(lr={LR}) over trainable parameters",
            "warmup_steps": sizes.warmup,
            "step": "forward + loss + backward + optimizer.step + zero_grad",
            "trainable_parameters": counts,
        },
        "numerics": numerics,
        "dropout_0.0": dropout_0,
        "dropout_0.1": dropout_01,
        "goal": goal(
            f"lora_lightning / peft <= {GOAL_RATIO} within noise "
            "(median of per-round ratios, dropout 0.0)",
            dropout_0["ratios"]["lora_lightning/peft"],
            GOAL_RATIO,
        ),
    }
    if profiled is not None:
        result["profile"] = profiled
    return result


def render(result: dict[str, Any]) -> str:
    """The markdown report of one run."""
    setup, numerics = result["setup"], result["numerics"]
    lines = [
        "# Training-step benchmark: lora_lightning vs PEFT vs full fine-tuning",
        "",
        f"MiniLM-L6 (real weights), batch {setup['batch_size']} x {setup['seq_len']} tokens, "
        f"LoRA r={setup['r']} alpha={setup['alpha']} on query/key/value, "
        f"{setup['optimizer']}; one step = {setup['step']}. Trainable parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in setup["trainable_parameters"].items())
        + ".",
        "",
        "## Machine",
        "",
        *machine_lines(result["machine"]),
        "",
    ]
    for key in ("dropout_0.0", "dropout_0.1"):
        block = result[key]
        rows = [
            [name, ms(t["median_s"]), ms(t["min_s"]), ms(t["max_s"])]
            for name, t in block["times"].items()
        ]
        ratio_rows = [
            [
                name,
                f"{r['median_of_pair_ratios']:.3f}",
                f"{r['median_ci'][0]:.3f} to {r['median_ci'][1]:.3f} "
                f"({r['median_ci_coverage']:.0%})",
                f"{r['ratio_of_medians']:.3f}",
            ]
            for name, r in block["ratios"].items()
        ]
        lines += [
            f"## Step time, LoRA {key.replace('_', ' ')}",
            "",
            f"{block['rounds']} interleaved rounds of {block['steps_per_round']} step(s).",
            "",
            markdown_table(["variant", "median step", "min", "max"], rows),
            "",
            markdown_table(RATIO_HEADERS, ratio_rows),
            "",
        ]
    lines += [
        goal_line(result["goal"]),
        "",
        "## Numerics (dropout 0, PEFT's lora_A copied from ours, same batch)",
        "",
        markdown_table(
            ["step", "loss lora_lightning", "loss peft", "abs diff"],
            [
                [i, f"{a:.9f}", f"{b:.9f}", f"{abs(a - b):.2e}"]
                for i, (a, b) in enumerate(
                    zip(numerics["losses_lora_lightning"], numerics["losses_peft"], strict=True)
                )
            ],
        ),
        "",
        f"Base weights identical after the copy: "
        f"{numerics['max_abs_weight_diff_after_copy'] == 0}; max |loss diff| "
        f"{numerics['max_abs_loss_diff']:.2e} (tolerance {numerics['tolerance']:.0e}); max "
        f"|adapter diff| after {numerics['steps']} steps "
        f"{numerics['max_abs_adapter_diff_after_steps']:.2e} -> "
        f"{'ok' if numerics['ok'] else 'FAILED'}.",
    ]
    if "profile" in result:
        lines += ["", "## Profile (one step, torch.profiler, CPU self time)", ""]
        for name, table in result["profile"].items():
            lines += [
                f"### {name} (total self CPU {table['total_self_cpu_ms']:.1f} ms)",
                "",
                markdown_table(
                    ["op", "input shapes", "calls", "self CPU ms", "%"],
                    [
                        [
                            f"`{op['op']}`",
                            f"`{op['input_shapes']}`",
                            op["calls"],
                            f"{op['self_cpu_ms']:.1f}",
                            f"{op['self_cpu_percent']:.1f}",
                        ]
                        for op in table["top_ops"]
                    ],
                ),
                "",
            ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write ``train_step.json``/``.md``; return the result."""
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    parser.add_argument("--steps", type=int, default=1, help="steps per round (default 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps per model before timing (default 1; the dropout-0 LoRA models "
        f"are warmed by the numerics check's max({NUMERICS_STEPS}, warmup) steps instead)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="add a torch.profiler table of one step"
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.quick:
        sizes = Sizes(batch=2, seq_len=8, repeats=args.repeats or 2, steps=1, warmup=1)
    else:
        sizes = Sizes(
            batch=32,
            seq_len=64,
            repeats=args.repeats or DEFAULT_REPEATS,
            steps=args.steps,
            warmup=args.warmup,
        )
    machine = machine_info()
    result = run(sizes, args.profile)
    result = {"benchmark": NAME, "quick": args.quick, "machine": machine, **result}
    name = f"{NAME}_profile" if args.profile else NAME  # keep the plain report intact
    paths = write_results(args.out, name, result, render(result))
    print(render(result))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if not result["numerics"]["ok"]:
        raise SystemExit("lora_lightning and PEFT disagree numerically; see the report")
    return result


if __name__ == "__main__":
    main()
