"""Training-step time: lora_lightning vs PEFT vs full fine-tuning, on two models.

Models (``--models``, both by default):

- ``minilm``: the real MiniLM-L6 (all-MiniLM-L6-v2, 22.7M parameters), batch 32 x 64 tokens,
  8 rounds.
- ``bert_base``: a BERT-base-shaped model (``BertConfig()`` defaults: 12 layers, hidden 768,
  110M parameters) with seeded random weights, batch 8 x 64 tokens, 8 rounds (a step is ~8x
  a MiniLM step per token; the smaller batch keeps this part near 4 minutes).

One step is forward + cross-entropy loss + backward + ``AdamW.step()`` + ``zero_grad()`` on a
fixed batch (random token ids, attention mask all ones, random labels; seed 0). LoRA: r=8,
alpha=16 on ``query``/``key``/``value`` of every layer, AdamW lr 1e-3 over the trainable
(adapter) parameters only; the classifier head stays frozen in both libraries
(``modules_to_save=[]`` here, no ``task_type`` in PEFT), so both train exactly the same
parameters. Variants, all interleaved in one phase (order rotated every round):

- ``lora_lightning_d0.0`` / ``peft_d0.0``: LoRA dropout 0.0
- ``full_finetune``: every parameter trains
- ``lora_lightning_d0.1`` / ``peft_d0.1``: LoRA dropout 0.1 (the project's default config).
  Our default fuses query/key/value: one ``[A_q; A_k; A_v]`` matmul behind ONE dropout mask
  shared by the three; PEFT draws one mask per module (three dropouts and three A matmuls).
- ``lora_lightning_unfused_d0.1`` (MiniLM only): ``group_shared_input=False, dropout_masks="torch"``, PEFT's
  semantics (a mask per module), for reference.
- ``lora_lightning_dora_d0.0`` / ``peft_dora_d0.0``: DoRA (``use_dora=True``), dropout 0.0,
  same targets; the magnitude vectors train too. Ours computes the row norm of ``W + s·B A``
  without forming the matrix (``core.dora``); PEFT forms it every forward. Goal (issue #13):
  ours / PEFT <= 0.80 (``block["dora"]["goal"]``, kept apart from ``goals`` so the summary's
  goal list is unchanged); ``dora/plain`` ratios give DoRA's overhead over plain LoRA.
- ``floor_qkv_bias_only``: only the query/key/value biases train. The backward still carries
  gradients to every query/key/value output, as LoRA there needs, but the "adapter" is free:
  no LoRA implementation that leaves the base computation alone can be faster. ``floor /
  peft_d0.0`` is therefore the best ratio reachable at dropout 0, and ``ours - floor`` vs
  ``peft - floor`` compares the LoRA work proper.

Numerics: PEFT's ``lora_A`` is overwritten with ours, base weights are checked equal, and both
train for 3 steps on the same batch with the same RNG state (BERT's own dropout is active in
train mode); the per-step losses must agree to 1e-6. This is done at dropout 0.0 and, for the
unfused variant, at dropout 0.1 (same masks as PEFT). These steps are also the warm-up of those
models; every other model gets ``--warmup`` untimed steps.

Goal (issue #5): ours / PEFT <= 0.90 (median of per-round ratios), at each dropout.
``--profile`` adds a torch.profiler table (ops by input shape) of one step of each dropout-0
LoRA variant and writes ``train_step_profile.json``/``.md`` instead.

Run: ``python -m experiments.bench.train_step [--models minilm,bert_base] [--repeats N]
[--bert-repeats N] [--bert-batch N] [--quick] [--profile] [--out DIR]``
"""

from __future__ import annotations

import math
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from experiments.bench.common import (
    FLOOR,
    RATIO_HEADERS,
    add_model_options,
    apply_threads,
    base_parser,
    goal,
    goal_line,
    interleave,
    machine_info,
    machine_lines,
    markdown_table,
    ms,
    ratio_summary,
    summary,
    timed,
    write_results,
)
from experiments.bench.models import MODEL_NAMES, SEED, load_model, random_batch
from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.core.dora import MAGNITUDE

NAME = "train_step"
RANK, ALPHA, LR = 8, 16, 1e-3
NUMERICS_TOLERANCE = 1e-6
NUMERICS_STEPS = 3
GOAL_RATIO = 0.90
DORA_GOAL_RATIO = 0.80
DEFAULT_REPEATS = 8
DEFAULT_BERT_REPEATS = 8
DEFAULT_BERT_BATCH = 8
DROPOUTS = (0.0, 0.1)
PEFT_PREFIX = "base_model.model."


@dataclass
class Sizes:
    batch: int
    seq_len: int
    repeats: int
    steps: int
    warmup: int
    tiny: bool = False  # bert_base only: a 2-layer, width-64 stand-in for smoke runs


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
    """Pretrained MiniLM-L6 with a 2-way head (seeded): identical weights on every call."""
    return load_model("minilm")


def make_batch(model: nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Random token ids (seeded), an all-ones attention mask and random binary labels."""
    return random_batch(model, batch, seq_len)


def adapt_ours(
    model: nn.Module, dropout: float, fuse: bool = True, dora: bool = False
) -> nn.Module:
    """``inject_lora`` on query/key/value (DoRA with ``dora``), in place; returns ``model``."""
    config = LoRAConfig(
        r=RANK,
        alpha=ALPHA,
        dropout=dropout,
        target_modules=[r".*\.(query|key|value)"],
        modules_to_save=[],
        group_shared_input=fuse,
        dropout_masks="fast" if fuse else "torch",
        use_dora=dora,
    )
    inject_lora(model, config)
    return model


def adapt_peft(model: nn.Module, dropout: float, dora: bool = False) -> nn.Module:
    """PEFT's ``get_peft_model`` on query/key/value (DoRA with ``dora``); returns the
    ``PeftModel``."""
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=["query", "key", "value"],
        use_dora=dora,
    )
    return get_peft_model(model, config)


def adapt_floor(model: nn.Module) -> nn.Module:
    """The cost floor of any adapter that leaves the base computation alone: only the
    query/key/value biases train. The backward must still carry gradients down to every
    query/key/value output (exactly what LoRA there needs), but the "adapter" costs nothing:
    no extra forward work, and a bias gradient is one row sum."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("query.bias", "key.bias", "value.bias")))
    return model


def stepper(model: nn.Module, batch: dict[str, torch.Tensor]) -> Stepper:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Stepper(model, torch.optim.AdamW(params, lr=LR), batch)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def align_peft_to_ours(ours: nn.Module, peft_model: nn.Module) -> dict[str, Any]:
    """Copy our ``lora_A`` (and DoRA magnitudes) into PEFT's; check base weights and
    ``lora_B`` already agree."""
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if hasattr(module, "lora_A"):  # ours: a plain module, never PEFT's ModuleDict
                theirs = base.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(module.lora_A.weight)
                if hasattr(module, MAGNITUDE):
                    getattr(theirs, MAGNITUDE)["default"].weight.copy_(getattr(module, MAGNITUDE))
    ours_sd = ours.state_dict()
    peft_sd = {
        key.removeprefix(PEFT_PREFIX)
        .replace(".base_layer", "")
        .replace(".default", "")
        .replace(f"{MAGNITUDE}.weight", MAGNITUDE): value
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
        # The same RNG state for both: dropout layers are active in train mode.
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
            if hasattr(module, MAGNITUDE):
                other = getattr(theirs, MAGNITUDE)["default"].weight
                diffs.append((getattr(module, MAGNITUDE) - other).abs().max().item())
    return max(diffs)


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


def time_variants(steppers: dict[str, Stepper], rounds: int, steps: int) -> dict[str, Any]:
    """Interleave every variant; per-round ratios of each LoRA variant to its PEFT twin and
    of the LoRA variants to full fine-tuning."""
    times = interleave({name: s.timed_steps(steps) for name, s in steppers.items()}, rounds)
    pairs = [(f"lora_lightning_d{d}", f"peft_d{d}") for d in DROPOUTS]
    pairs += [("lora_lightning_unfused_d0.1", "peft_d0.1")]
    pairs += [(FLOOR, f"peft_d{d}") for d in DROPOUTS]
    pairs += [(f"{lib}_d0.0", FLOOR) for lib in ("lora_lightning", "peft")]
    pairs += [(f"{lib}_d0.0", "full_finetune") for lib in ("lora_lightning", "peft")]
    pairs += [("lora_lightning_dora_d0.0", "peft_dora_d0.0")]
    pairs += [(f"{lib}_dora_d0.0", f"{lib}_d0.0") for lib in ("lora_lightning", "peft")]
    ratios = {
        f"{a}/{b}": ratio_summary(times[a], times[b]) for a, b in pairs if a in times and b in times
    }
    overhead = {}
    if FLOOR in times:
        # What each library adds over the floor, per round: the LoRA work proper.
        for d in DROPOUTS:
            ours, theirs = times[f"lora_lightning_d{d}"], times[f"peft_d{d}"]
            floor = times[FLOOR]
            ours_ms = [1e3 * (a - f) for a, f in zip(ours, floor, strict=True)]
            theirs_ms = [1e3 * (b - f) for b, f in zip(theirs, floor, strict=True)]
            overhead[f"dropout_{d}"] = {
                "lora_lightning_ms": statistics.median(ours_ms),
                "peft_ms": statistics.median(theirs_ms),
            }
    return {
        "rounds": rounds,
        "steps_per_round": steps,
        "times": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
        "overhead_over_floor": overhead,
    }


def run_model(key: str, sizes: Sizes, with_profile: bool, unfused: bool) -> dict[str, Any]:
    """Build every variant of model ``key``, check numerics, time them interleaved."""

    def fresh() -> nn.Module:
        return load_model(key, num_labels=2, tiny=sizes.tiny)

    warm_steps = max(NUMERICS_STEPS, sizes.warmup)
    model = fresh()
    batch = make_batch(model, sizes.batch, sizes.seq_len)
    ours0 = stepper(adapt_ours(model, dropout=0.0), batch)
    peft0 = stepper(adapt_peft(fresh(), dropout=0.0), batch)
    numerics = {"dropout_0.0": check_numerics(ours0, peft0, warm_steps)}
    full = stepper(fresh(), batch)
    floor = stepper(adapt_floor(fresh()), batch)
    ours1 = stepper(adapt_ours(fresh(), dropout=0.1), batch)
    peft1 = stepper(adapt_peft(fresh(), dropout=0.1), batch)
    steppers = {
        "lora_lightning_d0.0": ours0,
        "peft_d0.0": peft0,
        "full_finetune": full,
        FLOOR: floor,
        "lora_lightning_d0.1": ours1,
        "peft_d0.1": peft1,
    }
    oursd = stepper(adapt_ours(fresh(), dropout=0.0, dora=True), batch)
    peftd = stepper(adapt_peft(fresh(), dropout=0.0, dora=True), batch)
    numerics["dora_dropout_0.0"] = check_numerics(oursd, peftd, warm_steps)
    steppers["lora_lightning_dora_d0.0"] = oursd
    steppers["peft_dora_d0.0"] = peftd
    warm = [full, floor, ours1]
    if unfused:
        ours1u = stepper(adapt_ours(fresh(), dropout=0.1, fuse=False), batch)
        numerics["dropout_0.1_unfused"] = check_numerics(ours1u, peft1, warm_steps)
        steppers["lora_lightning_unfused_d0.1"] = ours1u
    else:
        warm.append(peft1)
    for s in warm:
        for _ in range(sizes.warmup):
            s.step()
    counts = {name: trainable_count(s.model) for name, s in steppers.items()}
    timing = time_variants(steppers, sizes.repeats, sizes.steps)
    profiled = (
        profile_step({"lora_lightning_d0.0": ours0, "peft_d0.0": peft0}) if with_profile else None
    )
    goals = {
        f"dropout_{d}": goal(
            f"{MODEL_LABELS[key]} train step, LoRA dropout {d}: lora_lightning / peft <= "
            f"{GOAL_RATIO}",
            timing["ratios"][f"lora_lightning_d{d}/peft_d{d}"],
            GOAL_RATIO,
        )
        for d in DROPOUTS
    }
    for d in DROPOUTS:  # no adapter can beat the floor: the best ratio reachable
        floor_ratio = timing["ratios"][f"{FLOOR}/peft_d{d}"]["median_of_pair_ratios"]
        goals[f"dropout_{d}"]["best_possible_ratio"] = floor_ratio
    dora = {
        "goal": goal(
            f"{MODEL_LABELS[key]} train step, DoRA dropout 0.0: lora_lightning / peft <= "
            f"{DORA_GOAL_RATIO}",
            timing["ratios"]["lora_lightning_dora_d0.0/peft_dora_d0.0"],
            DORA_GOAL_RATIO,
        ),
        "overhead_over_plain_lora": {
            lib: timing["ratios"][f"{lib}_dora_d0.0/{lib}_d0.0"]["median_of_pair_ratios"]
            for lib in ("lora_lightning", "peft")
        },
    }
    config = ours0.model.config
    result: dict[str, Any] = {
        "setup": {
            "model": MODEL_NAMES[key] + (" [tiny stand-in: --quick]" if sizes.tiny else ""),
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "total_parameters": sum(p.numel() for p in full.model.parameters()),
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
        **timing,
        "goals": goals,
        "dora": dora,
    }
    if profiled is not None:
        result["profile"] = profiled
    return result


MODEL_LABELS = {"minilm": "MiniLM-L6", "bert_base": "BERT-base"}
VARIANT_NOTES = {
    "lora_lightning_d0.0": "ours, LoRA dropout 0.0",
    "peft_d0.0": "PEFT, LoRA dropout 0.0",
    "full_finetune": "full fine-tuning (every parameter trains)",
    "lora_lightning_d0.1": "ours, dropout 0.1, q/k/v fused: one shared dropout mask",
    "peft_d0.1": "PEFT, dropout 0.1: one dropout mask per module",
    "lora_lightning_unfused_d0.1": "ours, dropout 0.1, group_shared_input=False, torch masks: a mask per "
    "module like PEFT",
    "lora_lightning_dora_d0.0": "ours, DoRA (use_dora), dropout 0.0",
    "peft_dora_d0.0": "PEFT, DoRA (use_dora), dropout 0.0",
    "floor_qkv_bias_only": "the floor: only query/key/value biases train (zero-cost "
    "adapters, same backward through the base)",
}


def render(result: dict[str, Any]) -> str:
    """The markdown report of one run."""
    lines = [
        "# Training-step benchmark: lora_lightning vs PEFT vs full fine-tuning",
        "",
        "One step = forward + loss + backward + optimizer.step + zero_grad on a fixed random "
        f"batch. LoRA r={RANK} alpha={ALPHA} on query/key/value; AdamW(lr={LR}) over the "
        "trainable parameters; the model is in train mode (BERT's own dropout runs in every "
        "variant). Our fused query/key/value share ONE LoRA dropout mask where PEFT draws one "
        "per module; `lora_lightning_unfused_d0.1` has PEFT's semantics. Goal (issue #5): "
        f"lora_lightning / peft <= {GOAL_RATIO} at each dropout.",
        "",
        "## Machine",
        "",
        *machine_lines(result["machine"]),
        "",
    ]
    for key, block in result["models"].items():
        lines += render_model(key, block)
    return "\n".join(lines)


def render_model(key: str, block: dict[str, Any]) -> list[str]:
    setup = block["setup"]
    rows = [
        [
            f"`{name}`",
            VARIANT_NOTES.get(name, ""),
            ms(t["median_s"]),
            ms(t["min_s"]),
            ms(t["max_s"]),
            f"{setup['trainable_parameters'][name]:,}",
        ]
        for name, t in block["times"].items()
    ]
    ratio_rows = [
        [
            f"`{name}`",
            f"{r['median_of_pair_ratios']:.3f}",
            f"{r['median_ci'][0]:.3f} to {r['median_ci'][1]:.3f} ({r['median_ci_coverage']:.0%})",
            f"{r['ratio_of_medians']:.3f}",
        ]
        for name, r in block["ratios"].items()
    ]
    lines = [
        f"## {MODEL_LABELS[key]}",
        "",
        f"{setup['model']}; {setup['total_parameters']:,} parameters; batch "
        f"{setup['batch_size']} x {setup['seq_len']} tokens; {block['rounds']} interleaved "
        f"rounds of {block['steps_per_round']} step(s) after {setup['warmup_steps']}+ "
        "untimed warm-up step(s) per model.",
        "",
        markdown_table(["variant", "what", "median step", "min", "max", "trainable"], rows),
        "",
        markdown_table(RATIO_HEADERS, ratio_rows),
        "",
        *(goal_line(g) + "\n" for g in block["goals"].values()),
        *dora_lines(block),
        *floor_lines(block),
        f"### Numerics ({MODEL_LABELS[key]}: PEFT's lora_A copied from ours, same batch, same "
        "RNG state per step)",
        "",
    ]
    for label, numerics in block["numerics"].items():
        lines += [
            f"{label.replace('_', ' ')}: losses "
            + ", ".join(
                f"{a:.7f} vs {b:.7f}"
                for a, b in zip(
                    numerics["losses_lora_lightning"], numerics["losses_peft"], strict=True
                )
            )
            + f"; base weights identical after the copy: "
            f"{numerics['max_abs_weight_diff_after_copy'] == 0}; max |loss diff| "
            f"{numerics['max_abs_loss_diff']:.2e} (tolerance {numerics['tolerance']:.0e}); max "
            f"|adapter diff| after {numerics['steps']} steps "
            f"{numerics['max_abs_adapter_diff_after_steps']:.2e} -> "
            f"{'ok' if numerics['ok'] else 'FAILED'}.",
            "",
        ]
    if "profile" in block:
        lines += [f"### Profile ({MODEL_LABELS[key]}, one step, torch.profiler, CPU self time)", ""]
        for name, table in block["profile"].items():
            lines += [
                f"#### {name} (total self CPU {table['total_self_cpu_ms']:.1f} ms)",
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
    return lines


def dora_lines(block: dict[str, Any]) -> list[str]:
    """DoRA's goal and its overhead over plain LoRA in each library, as markdown."""
    if "dora" not in block:
        return []
    over = block["dora"]["overhead_over_plain_lora"]
    return [
        goal_line(block["dora"]["goal"]) + "\n",
        f"DoRA step / plain LoRA step (dropout 0.0): lora_lightning {over['lora_lightning']:.3f}, "
        f"PEFT {over['peft']:.3f}.",
        "",
    ]


def floor_lines(block: dict[str, Any]) -> list[str]:
    """What the floor variant says about the goals, as markdown paragraphs."""
    if not block.get("overhead_over_floor"):
        return []
    best = ", ".join(
        f"{block['ratios'][f'{FLOOR}/peft_d{d}']['median_of_pair_ratios']:.3f} at dropout {d}"
        for d in DROPOUTS
    )
    lines = [
        f"**Floor**: with zero-cost adapters (`{FLOOR}`) a step takes {best} of PEFT's step. "
        "No adapter that leaves the frozen base model's forward and backward as they are can "
        "beat those ratios: the rest of the step is the base model, the same work in both "
        "libraries.",
        "",
    ]
    for label, over in block["overhead_over_floor"].items():
        ours, theirs = over["lora_lightning_ms"], over["peft_ms"]
        share = f" ({ours / theirs:.2f}x PEFT's)" if theirs > 0 else ""
        lines += [
            f"LoRA work over the floor, {label.replace('_', ' ')}: lora_lightning {ours:.1f} ms, "
            f"PEFT {theirs:.1f} ms{share} (medians of per-round differences).",
            "",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write ``train_step.json``/``.md``; return the result."""
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    add_model_options(parser, DEFAULT_BERT_REPEATS)
    parser.add_argument(
        "--bert-batch",
        type=int,
        default=DEFAULT_BERT_BATCH,
        help=f"bert_base batch size (default {DEFAULT_BERT_BATCH}; sequence length 64)",
    )
    parser.add_argument("--steps", type=int, default=1, help="steps per round (default 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps per model before timing (default 1; the models of a numerics "
        f"check are warmed by its max({NUMERICS_STEPS}, warmup) steps instead)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="add a torch.profiler table of one step"
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(MODEL_NAMES))
    if unknown or not keys:
        parser.error(f"--models: unknown {unknown}; expected a subset of {sorted(MODEL_NAMES)}")
    if args.quick:
        sizes = {
            "minilm": Sizes(batch=2, seq_len=8, repeats=args.repeats or 2, steps=1, warmup=1),
            "bert_base": Sizes(
                batch=2, seq_len=8, repeats=args.bert_repeats or 2, steps=1, warmup=1, tiny=True
            ),
        }
    else:
        sizes = {
            "minilm": Sizes(
                batch=32,
                seq_len=64,
                repeats=args.repeats or DEFAULT_REPEATS,
                steps=args.steps,
                warmup=args.warmup,
            ),
            "bert_base": Sizes(
                batch=args.bert_batch,
                seq_len=64,
                repeats=args.bert_repeats or DEFAULT_BERT_REPEATS,
                steps=args.steps,
                warmup=args.warmup,
            ),
        }
    machine = machine_info()
    models = {
        key: run_model(key, sizes[key], args.profile, unfused=key == "minilm") for key in keys
    }
    goals = {
        f"{key}/{name}": g for key, block in models.items() for name, g in block["goals"].items()
    }
    result = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "models": models,
        "goals": goals,
    }
    name = f"{NAME}_profile" if args.profile else NAME  # keep the plain report intact
    paths = write_results(args.out, name, result, render(result))
    print(render(result))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    bad = [
        f"{key} {label}"
        for key, block in models.items()
        for label, numerics in block["numerics"].items()
        if not numerics["ok"]
    ]
    if bad:
        raise SystemExit(f"lora_lightning and PEFT disagree numerically ({bad}); see the report")
    return result


if __name__ == "__main__":
    main()
