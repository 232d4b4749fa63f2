"""Inference time: the bare base model vs ours unmerged, ours merged, and PEFT unmerged.

Models: the real MiniLM-L6 encoder (``BertModel``, all-MiniLM-L6-v2 weights) and a
BERT-base-shaped encoder (``BertConfig()`` defaults, seeded random weights). One forward pass
of a batch of 32 x 64 random token ids (attention mask all ones) under ``torch.no_grad()``,
model in eval mode. Variants, each its own copy of the same weights, interleaved (order rotated
every round); the output check below is every variant's first (untimed) call, and MiniLM gets
one more untimed round (a BERT-base forward of this batch takes seconds, a warm-up round
would cost a minute):

- ``base``: the bare model, no LoRA anywhere
- ``lora_lightning``: ``inject_lora`` r=8, alpha=16, dropout 0.1 (the project default; a no-op
  in eval) on query/key/value, unmerged: the forward hooks add ``s * B A x``
  (query/key/value share one ``[A_q; A_k; A_v]`` matmul)
- ``lora_lightning_merged``: the same adapters folded in with ``merge_lora`` (the hooks stay
  attached and return the base output untouched)
- ``peft``: PEFT's ``get_peft_model`` with the same config and the same A/B values, unmerged

``lora_B`` is set to seeded random values (not the zeros of a fresh adapter), so every LoRA
variant computes a real, identical function; the outputs are checked against each other
(merged vs unmerged vs PEFT) and against the base (they must differ).

Goal (issue #5): merged inference at the base model's speed: ``lora_lightning_merged / base``
<= 1.05 (median of per-round ratios; 5% allows for timer noise on a shared machine). The
unmerged overheads (``lora_lightning / base``, ``peft / base``) are stated, no target.

Run: ``python -m experiments.bench.inference [--repeats N] [--bert-repeats N] [--quick]
[--out DIR]``
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from experiments.bench.common import (
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
from lora_lightning import LoRAConfig, inject_lora, lora_state_dict, merge_lora

NAME = "inference"
RANK, ALPHA, DROPOUT = 8, 16, 0.1
GOAL_RATIO = 1.05
DEFAULT_REPEATS = 10
DEFAULT_BERT_REPEATS = 5
BATCH, SEQ_LEN = 32, 64
#: Merged vs unmerged vs PEFT outputs must agree to this, relative to the output scale.
TOLERANCE = 1e-5
MODEL_LABELS = {"minilm": "MiniLM-L6", "bert_base": "BERT-base"}
VARIANT_NOTES = {
    "base": "bare base model, no LoRA",
    "lora_lightning": "ours, unmerged (forward hooks)",
    "lora_lightning_merged": "ours after merge_lora",
    "peft": "PEFT, unmerged",
}


def our_config() -> LoRAConfig:
    return LoRAConfig(
        r=RANK,
        alpha=ALPHA,
        dropout=DROPOUT,
        target_modules=[r".*\.(query|key|value)"],
        modules_to_save=[],
    )


def randomize_b(model: nn.Module) -> None:
    """Give every ``lora_B`` seeded random values so the adapters change the output."""
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("lora_B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_variants(key: str, tiny: bool) -> dict[str, nn.Module]:
    """The four variants of model ``key``, in eval mode, with identical adapter values."""

    def fresh() -> nn.Module:
        return load_model(key, num_labels=None, tiny=tiny).eval()

    base = fresh()
    ours = fresh()
    inject_lora(ours, our_config())
    randomize_b(ours)
    adapters = lora_state_dict(ours)

    merged = fresh()
    inject_lora(merged, our_config())
    missing = set(adapters) - set(dict(merged.named_parameters()))
    assert not missing, missing
    merged.load_state_dict(adapters, strict=False)
    merge_lora(merged)

    peft_model = get_peft_model(
        fresh(),
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=["query", "key", "value"],
        ),
    )
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, value in adapters.items():
            module_path, part, _ = name.rsplit(".", 2)  # <path>.lora_A.weight
            getattr(inner.get_submodule(module_path), part)["default"].weight.copy_(value)
    # .eval() again after injection: a freshly attached nn.Dropout starts in train mode
    # whatever the mode of the model it joins (PEFT's get_peft_model does the same), so
    # without it the LoRA dropout would stay active in these "inference" passes.
    return {
        "base": base,
        "lora_lightning": ours.eval(),
        "lora_lightning_merged": merged.eval(),
        "peft": peft_model.eval(),
    }


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def check_outputs(models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Max |diff| of each LoRA variant's output to ours unmerged, relative to its scale."""
    outputs = {name: forward(model, batch) for name, model in models.items()}
    reference = outputs["lora_lightning"]
    scale = reference.abs().max().item()
    diffs = {
        name: (out - reference).abs().max().item() / scale
        for name, out in outputs.items()
        if name != "lora_lightning"
    }
    return {
        "output_shape": list(reference.shape),
        "output_scale_max_abs": scale,
        "max_rel_diff_to_lora_lightning": diffs,
        "tolerance": TOLERANCE,
        "adapter_changes_output": diffs["base"] > 100 * TOLERANCE,
        "ok": diffs["lora_lightning_merged"] <= TOLERANCE
        and diffs["peft"] <= TOLERANCE
        and diffs["base"] > 100 * TOLERANCE,
    }


def run_model(
    key: str, batch_size: int, seq_len: int, repeats: int, warmup: int, tiny: bool
) -> dict[str, Any]:
    models = build_variants(key, tiny)
    batch = random_batch(models["base"], batch_size, seq_len, labels=False)
    checks = check_outputs(models, batch)  # also the first, untimed call of every variant

    def variant(model: nn.Module) -> Callable[[], float]:
        return lambda: timed(lambda: forward(model, batch))[0]

    variants = {name: variant(model) for name, model in models.items()}
    interleave(variants, warmup)  # untimed warm-up rounds
    times = interleave(variants, repeats)
    ratios = {
        f"{name}/base": ratio_summary(times[name], times["base"])
        for name in ("lora_lightning_merged", "lora_lightning", "peft")
    }
    ratios["lora_lightning/peft"] = ratio_summary(times["lora_lightning"], times["peft"])
    config = models["base"].config
    return {
        "setup": {
            "model": MODEL_NAMES[key] + (" [tiny stand-in: --quick]" if tiny else ""),
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "r": RANK,
            "alpha": ALPHA,
            "dropout": DROPOUT,
            "targets": ["query", "key", "value"],
            "mode": "eval, torch.no_grad(), last_hidden_state of the encoder",
        },
        "rounds": repeats,
        "warmup_rounds": warmup,
        "times": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
        "unmerged_overhead": {
            name: ratios[f"{name}/base"]["median_of_pair_ratios"] - 1.0
            for name in ("lora_lightning", "peft")
        },
        "checks": checks,
        "goals": {
            "merged": goal(
                f"{MODEL_LABELS[key]} inference: lora_lightning merged / base <= {GOAL_RATIO} "
                "(the base model's speed)",
                ratios["lora_lightning_merged/base"],
                GOAL_RATIO,
            )
        },
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Inference benchmark: base vs lora_lightning (unmerged, merged) vs PEFT",
        "",
        "One forward pass under torch.no_grad(), eval mode, random token ids, LoRA r=8 alpha=16 "
        "dropout 0.1 on query/key/value with random (non-zero) B, the same adapter values in "
        f"every LoRA variant. Goal (issue #5): merged / base <= {GOAL_RATIO}; the unmerged "
        "overhead is stated.",
        "",
        "## Machine",
        "",
        *machine_lines(result["machine"]),
        "",
    ]
    for key, block in result["models"].items():
        setup, checks = block["setup"], block["checks"]
        rows = [
            [
                f"`{name}`",
                VARIANT_NOTES[name],
                ms(t["median_s"]),
                ms(t["min_s"]),
                ms(t["max_s"]),
            ]
            for name, t in block["times"].items()
        ]
        ratio_rows = [
            [
                f"`{name}`",
                f"{r['median_of_pair_ratios']:.3f}",
                f"{r['median_ci'][0]:.3f} to {r['median_ci'][1]:.3f} "
                f"({r['median_ci_coverage']:.0%})",
                f"{r['ratio_of_medians']:.3f}",
            ]
            for name, r in block["ratios"].items()
        ]
        overhead = block["unmerged_overhead"]
        diffs = checks["max_rel_diff_to_lora_lightning"]
        lines += [
            f"## {MODEL_LABELS[key]}",
            "",
            f"{setup['model']}; batch {setup['batch_size']} x {setup['seq_len']} tokens; "
            f"{block['rounds']} interleaved rounds after the output check (every variant's "
            f"first call) and {block['warmup_rounds']} untimed warm-up round(s).",
            "",
            markdown_table(["variant", "what", "median forward", "min", "max"], rows),
            "",
            markdown_table(RATIO_HEADERS, ratio_rows),
            "",
            goal_line(block["goals"]["merged"]),
            "",
            f"Unmerged overhead vs the bare base (median of per-round ratios - 1): "
            f"lora_lightning {overhead['lora_lightning']:+.1%}, "
            f"peft {overhead['peft']:+.1%}.",
            "",
            f"Outputs (max |diff| / max |output|, vs ours unmerged): merged "
            f"{diffs['lora_lightning_merged']:.1e}, PEFT {diffs['peft']:.1e} (tolerance "
            f"{checks['tolerance']:.0e}); bare base {diffs['base']:.1e} (the adapters change "
            f"the output) -> {'ok' if checks['ok'] else 'FAILED'}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write ``inference.json``/``.md``; return the result."""
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    add_model_options(parser, DEFAULT_BERT_REPEATS)
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"batch size (default {BATCH}; both models)"
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(MODEL_NAMES))
    if unknown or not keys:
        parser.error(f"--models: unknown {unknown}; expected a subset of {sorted(MODEL_NAMES)}")
    if args.quick:
        batch, seq_len = 2, 8
        repeats = {"minilm": args.repeats or 2, "bert_base": args.bert_repeats or 2}
    else:
        batch, seq_len = args.batch, SEQ_LEN
        repeats = {
            "minilm": args.repeats or DEFAULT_REPEATS,
            "bert_base": args.bert_repeats or DEFAULT_BERT_REPEATS,
        }
    machine = machine_info()
    warmup = {"minilm": 1, "bert_base": 0}
    models = {
        key: run_model(
            key, batch, seq_len, repeats[key], warmup[key], tiny=args.quick and key == "bert_base"
        )
        for key in keys
    }
    result = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "models": models,
        "goals": {f"{key}/merged": block["goals"]["merged"] for key, block in models.items()},
    }
    paths = write_results(args.out, NAME, result, render(result))
    print(render(result))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if not all(block["checks"]["ok"] for block in models.values()):
        raise SystemExit("merged, unmerged and PEFT outputs disagree; see the report")
    return result


if __name__ == "__main__":
    main()
