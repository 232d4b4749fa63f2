"""Injection time on a 7B-shaped Llama: ``inject_lora`` vs PEFT's ``get_peft_model``.

The model is built on the ``meta`` device (no memory, no weights), so what is timed is the work
of finding the 224 targets (q, k, v, o, gate, up, down in each of 32 layers) and attaching r=8
adapters to them. Each round builds a fresh model per variant, untimed, then times only the
injection call. Variants, interleaved:

- ``lora_lightning``: ``inject_lora(model, LoRAConfig(r=8, target_modules=[...]))``
- ``peft``: ``get_peft_model(model, LoraConfig(r=8, target_modules=[...]))`` (its default)
- ``peft_low_cpu_mem_usage``: the same with ``low_cpu_mem_usage=True``, PEFT's fast path that
  creates the adapters on ``meta`` too (ours never allocates on a meta model), shown for
  reference

One untimed warm-up round comes first. Goal: ``lora_lightning`` <= 0.25x ``peft``.

Run: ``python -m experiments.bench.injection [--repeats N] [--quick] [--out DIR]``
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

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
    ms,
    ratio_summary,
    summary,
    timed,
    write_results,
)
from lora_lightning import LoRAConfig, inject_lora

NAME = "injection"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
GOAL_RATIO = 0.25
DEFAULT_REPEATS = 7


def llama_7b_config(num_layers: int = 32) -> Any:
    """A Llama-2-7B-shaped ``LlamaConfig`` (4096 wide, 11008 MLP, 32 heads, 32k vocab)."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )


def build_meta_model(config: Any) -> nn.Module:
    """``LlamaForCausalLM(config)`` on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def inject_ours(model: nn.Module) -> list[str]:
    """Adapt every projection of ``model`` with lora_lightning; return the adapted names."""
    pattern = rf".*\.({'|'.join(TARGETS)})"
    return inject_lora(model, LoRAConfig(r=RANK, target_modules=[pattern]))


def inject_peft(model: nn.Module, low_cpu_mem_usage: bool = False) -> nn.Module:
    """Adapt every projection of ``model`` with PEFT; return the ``PeftModel``."""
    config = LoraConfig(r=RANK, target_modules=list(TARGETS))
    return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)


def peft_adapted_names(peft_model: nn.Module) -> list[str]:
    """Qualified names (in the base model) of the modules PEFT turned into LoRA layers."""
    prefix = "base_model.model."
    return [
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    ]


def run(repeats: int, num_layers: int) -> dict[str, Any]:
    """Time the three variants interleaved; verify each adapted the expected modules."""
    config = llama_7b_config(num_layers)
    expected = len(TARGETS) * num_layers
    adapted: dict[str, list[list[str]]] = {}

    def variant(name: str, inject: Any, names_of: Any) -> Any:
        def one_round() -> float:
            model = build_meta_model(config)  # not timed
            seconds, result = timed(lambda: inject(model))
            adapted.setdefault(name, []).append(sorted(names_of(result)))
            return seconds

        return one_round

    variants = {
        "lora_lightning": variant("lora_lightning", inject_ours, lambda names: names),
        "peft": variant("peft", inject_peft, peft_adapted_names),
        "peft_low_cpu_mem_usage": variant(
            "peft_low_cpu_mem_usage",
            lambda model: inject_peft(model, low_cpu_mem_usage=True),
            peft_adapted_names,
        ),
    }
    interleave(variants, 1)  # untimed warm-up: first-call costs (regex and import caches)
    adapted.clear()
    times = interleave(variants, repeats)

    reference = adapted["lora_lightning"][0]
    checks = {
        name: {
            "adapted_modules": [len(names) for names in runs],
            "expected_modules": expected,
            "ok": all(len(names) == expected for names in runs),
            "same_modules_as_lora_lightning": all(names == reference for names in runs),
        }
        for name, runs in adapted.items()
    }
    ratios = {
        "lora_lightning/peft": ratio_summary(times["lora_lightning"], times["peft"]),
        "lora_lightning/peft_low_cpu_mem_usage": ratio_summary(
            times["lora_lightning"], times["peft_low_cpu_mem_usage"]
        ),
    }
    return {
        "benchmark": NAME,
        "setup": {
            "model": "LlamaForCausalLM on meta (7B shape)",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "targets": list(TARGETS),
            "r": RANK,
            "repeats": repeats,
            "timed": "the injection call only; a fresh meta model per variant and round",
        },
        "times": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
        "checks": checks,
        "goal": goal(
            f"injection into a 7B-shaped Llama (meta device): lora_lightning <= {GOAL_RATIO}x "
            "peft (median of per-round ratios)",
            ratios["lora_lightning/peft"],
            GOAL_RATIO,
        ),
    }


def render(result: dict[str, Any]) -> str:
    """The markdown report of one run."""
    setup, times, ratios = result["setup"], result["times"], result["ratios"]
    rows = [
        [
            name,
            ms(t["median_s"]),
            ms(t["min_s"]),
            ms(t["max_s"]),
            f"{result['checks'][name]['adapted_modules'][0]} / "
            f"{result['checks'][name]['expected_modules']}",
        ]
        for name, t in times.items()
    ]
    ratio_rows = [
        [
            name,
            f"{r['median_of_pair_ratios']:.4f}",
            f"{r['median_ci'][0]:.4f} to {r['median_ci'][1]:.4f} ({r['median_ci_coverage']:.0%})",
            f"{r['ratio_of_medians']:.4f}",
        ]
        for name, r in ratios.items()
    ]
    lines = [
        "# Injection benchmark: lora_lightning vs PEFT",
        "",
        f"LoRA r={setup['r']} on all seven projections "
        f"({', '.join(setup['targets'])}) of a 7B-shaped Llama "
        f"({setup['num_hidden_layers']} layers) built on the meta device; "
        f"{setup['repeats']} interleaved rounds; only the injection call is timed.",
        "",
        "## Machine",
        "",
        *machine_lines(result["machine"]),
        "",
        "## Times",
        "",
        markdown_table(["variant", "median", "min", "max", "adapted modules"], rows),
        "",
        markdown_table(RATIO_HEADERS, ratio_rows),
        "",
        goal_line(result["goal"], digits=4),
        "",
        "Checks: "
        + "; ".join(
            f"{name}: {'ok' if c['ok'] and c['same_modules_as_lora_lightning'] else 'FAILED'}"
            for name, c in result["checks"].items()
        )
        + " (every round adapted the expected modules, the same ones as lora_lightning).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write ``injection.json``/``.md``; return the result."""
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS)
    num_layers = 4 if args.quick else 32
    machine = machine_info()
    result = run(repeats, num_layers)
    result = {"benchmark": NAME, "quick": args.quick, "machine": machine, **result}
    paths = write_results(args.out, NAME, result, render(result))
    print(render(result))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if not all(c["ok"] and c["same_modules_as_lora_lightning"] for c in result["checks"].values()):
        raise SystemExit("a variant did not adapt the expected modules; see the report")
    return result


if __name__ == "__main__":
    main()
