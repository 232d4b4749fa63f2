"""Per-layer overhead of a LoRA train step and an eval forward against PEFT, arithmetic negligible.

``python -m experiments.bench.overhead`` (~1 min; ``--quick``: seconds). A train step
(forward, loss, backward) of a BERT-shaped and a Llama-shaped model whose every matrix is tiny
(hidden size 32, 6 blocks, 2 x 8 tokens, one CPU thread): what is left is the Python and
dispatcher cost per adapted layer, the regime a GPU step of a small model (MiniLM, SmolLM2-135M)
is in, where every op costs one kernel launch whatever its size. The first GPU check run
(2026-12-04, an H200) measured ours / PEFT 1.14-1.19 on MiniLM and 1.06 on a SmolLM2-shaped
model there, while the CPU benchmarks at real sizes had ours faster; this reproduces that gap
without a GPU, and compares the two implementations of ``core.kernels`` (``functions``: the
custom autograd functions, the CPU default; ``plain``: plain differentiable ops, the default on
every other device) in one process, interleaved. Every model: LoRA r=8 on all attention and
MLP projections, dropout 0, the default shared-input groups. Two modes: ``train`` (forward,
loss, backward) and ``eval`` (a forward under ``torch.no_grad``, the unmerged-inference path:
an evaluation loop, a generation step; the first GPU check had ours at 1.07-1.12x PEFT there).
DoRA (``use_dora`` on both sides) is timed on the Llama-shaped train step.
Results: ``results/overhead.{json,md}``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from experiments.bench.common import (
    RATIO_HEADERS,
    apply_threads,
    base_parser,
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
from lora_lightning.core import kernels

TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
STEPS_PER_ROUND = 30
IMPLEMENTATIONS = ("functions", "plain")
MODES = ("train", "eval")


def build(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model of ``kind`` (random weights, eval mode: no base dropout) and its batch."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    if kind == "bert":
        config = BertConfig(
            hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
            vocab_size=100,
        )  # fmt: skip
        return BertForSequenceClassification(config).eval(), {
            "input_ids": ids,
            "labels": torch.tensor([0, 1]),
        }
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=100,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), {"input_ids": ids, "labels": ids}


def variants(
    kind: str, mode: str, steps: int, dora: bool = False
) -> tuple[dict[str, Callable[[], float]], int]:
    """The timed callables of ``kind`` in ``mode`` (DoRA on both sides with ``dora``):
    seconds per step of each variant."""
    base, batch = build(kind)
    if mode == "eval":
        batch = {"input_ids": batch["input_ids"]}
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(target_modules=TARGETS[kind], r=8, alpha=16, use_dora=dora))
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(target_modules=TARGETS[kind], r=8, lora_alpha=16, use_dora=dora),
    )
    adapted = sum(1 for name, _ in ours.named_parameters() if name.endswith("lora_A.weight"))

    def run(model: torch.nn.Module, implementation: str | None) -> Callable[[], float]:
        def step() -> None:
            if mode == "train":
                model(**batch).loss.backward()
            else:
                with torch.no_grad():
                    model(**batch)

        def call() -> float:
            previous = kernels._POLICY
            kernels._POLICY = implementation or previous  # benchmark only: both in one process
            try:
                for _ in range(3):  # untimed: warm caches, the shared-input groups' first call
                    step()

                def steps_() -> None:
                    for _ in range(steps):
                        step()

                return timed(steps_)[0] / steps
            finally:
                kernels._POLICY = previous

        return call

    found = {f"lora_lightning_{name}": run(ours, name) for name in IMPLEMENTATIONS}
    found["peft"] = run(theirs, None)
    return found, adapted


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=10)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    rounds = args.repeats or (2 if args.quick else 10)
    steps = 3 if args.quick else STEPS_PER_ROUND
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "quick": args.quick,
        "machine": machine_info(),
        "setup": {
            "models": "BERT- and Llama-shaped, hidden 32, 6 blocks, intermediate 64, vocab 100",
            "batch": [2, 8],
            "lora": "r=8, alpha 16, dropout 0, every attention and MLP projection",
            "rounds": rounds,
            "steps_per_round": steps,
            "threads": args.threads,
        },
        "models": {},
    }
    cases = [(kind, mode, False) for kind, mode in itertools.product(("bert", "llama"), MODES)]
    for kind, mode, dora in [*cases, ("llama", "train", True)]:
        found, adapted = variants(kind, mode, steps, dora)
        times = interleave(found, rounds)
        result["models"][f"{kind} {mode}{' DoRA' if dora else ''}"] = {
            "adapted_layers": adapted,
            "times": {name: summary(values) for name, values in times.items()},
            "ratios": {
                f"{name}/peft": ratio_summary(times[name], times["peft"])
                for name in found
                if name != "peft"
            },
        }
    paths = write_results(args.out, "overhead", result, render(result))
    print(render(result))
    print("wrote", *paths)
    return 0


def render(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        "# Per-layer overhead of a train step and an eval forward: ours vs PEFT, arithmetic "
        "negligible",
        "",
        f"{setup['models']}; batch {setup['batch'][0]} x {setup['batch'][1]}; LoRA "
        f"{setup['lora']}; {setup['rounds']} interleaved rounds of {setup['steps_per_round']} "
        f"steps (train: forward, loss, backward; eval: a forward under no_grad); "
        f"{setup['threads']} thread(s). "
        "`python -m experiments.bench.overhead`.",
        "",
        *machine_lines(result["machine"]),
        "",
    ]
    for kind, block in result["models"].items():
        lines += [f"## {kind} ({block['adapted_layers']} adapted layers)", ""]  # "llama eval"
        lines.append(
            markdown_table(
                ["variant", "median per step", "min", "max"],
                [
                    [name, ms(t["median_s"]), ms(t["min_s"]), ms(t["max_s"])]
                    for name, t in block["times"].items()
                ],
            )
        )
        lines.append("")
        rows = []
        for name, ratio in block["ratios"].items():
            low, high = ratio["median_ci"]
            rows.append(
                [
                    name,
                    f"{ratio['median_of_pair_ratios']:.3f}",
                    f"{low:.3f} to {high:.3f} ({ratio['median_ci_coverage']:.0%})",
                    f"{ratio['ratio_of_medians']:.3f}",
                ]
            )
        lines += [markdown_table(RATIO_HEADERS, rows), ""]
    lines.append(
        "`lora_lightning_functions` is the CPU default (custom autograd functions), "
        "`lora_lightning_plain` the default on every other device (plain differentiable ops)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
