"""Every benchmark, one command: injection, train_step, inference, memory, then a summary.

Each benchmark runs in its own fresh Python process, one after the other (no benchmark's
allocations or thread pools affect the next), and writes its own ``<name>.json``/``.md`` into
``--out``. Then ``summary.json`` and ``summary.md`` gather every goal with its measured ratio
and verdict (``met`` / ``NOT met``), and every other ratio the benchmarks state.

Run: ``python -m experiments.bench.run_all [--quick] [--only a,b] [--summary-only] [--out DIR]``
(about 10-15 minutes on 2 shared CPU cores; ``--quick`` is a smoke run of a minute or two
whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.bench.common import (
    FLOOR,
    REPO_ROOT,
    RESULTS_DIR,
    apply_threads,
    machine_info,
    machine_lines,
    markdown_table,
    ms,
    verdict,
    write_results,
)

NAME = "summary"
BENCHMARKS = ("injection", "train_step", "inference", "memory")
MIB = 1024**2


def run_benchmark(name: str, out: Path, quick: bool, threads: int) -> dict[str, Any]:
    """``python -m experiments.bench.<name>`` in a fresh process; its exit code and time."""
    command = [sys.executable, "-m", f"experiments.bench.{name}", "--out", str(out)]
    command += ["--threads", str(threads)] + (["--quick"] if quick else [])
    print(f"[run_all] {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    start = time.perf_counter()
    # The child's stdout repeats its markdown report (written to --out anyway).
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f"[run_all] {name}: exit {done.returncode} after {seconds:.0f} s", file=sys.stderr)
    json_path = out / f"{name}.json"
    fresh = json_path.is_file() and json_path.stat().st_mtime >= started
    return {"exit_code": done.returncode, "wall_seconds": seconds, "wrote_results": fresh}


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _goal_row(benchmark: str, key: str, goal: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "key": key,
        "description": goal["description"],
        "target_ratio": goal["target_ratio"],
        "measured_ratio": goal["measured_ratio"],
        "ci": goal["ci"],
        "ci_coverage": goal["ci_coverage"],
        "met": goal["met"],
        "verdict": verdict(goal),
        "best_possible_ratio": goal.get("best_possible_ratio"),
    }


def _overhead(block: dict[str, Any], dropout: str) -> str:
    over = block.get("overhead_over_floor", {}).get(f"dropout_{dropout}")
    if not over:
        return ""
    return f"{over['lora_lightning_ms']:.0f} ms vs {over['peft_ms']:.0f} ms"


def collect(results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Every goal and every stated ratio of the benchmark results, flat."""
    goals: list[dict[str, Any]] = []
    stated: dict[str, Any] = {}
    injection = results.get("injection")
    if injection:
        goals.append(_goal_row("injection", "injection", injection["goal"]))
        stated["injection"] = {
            "median_s": {k: v["median_s"] for k, v in injection["times"].items()},
            "lora_lightning/peft_low_cpu_mem_usage": injection["ratios"][
                "lora_lightning/peft_low_cpu_mem_usage"
            ]["median_of_pair_ratios"],
        }
    train = results.get("train_step")
    if train:
        for key, block in train["models"].items():
            for name, goal in block["goals"].items():
                goals.append(_goal_row("train_step", f"{key}/{name}", goal))
            stated[f"train_step/{key}"] = {
                "median_s": {k: v["median_s"] for k, v in block["times"].items()},
                "ratios": {k: v["median_of_pair_ratios"] for k, v in block["ratios"].items()},
                "numerics_ok": {k: v["ok"] for k, v in block["numerics"].items()},
            }
    inference = results.get("inference")
    if inference:
        for key, block in inference["models"].items():
            goals.append(_goal_row("inference", f"{key}/merged", block["goals"]["merged"]))
            stated[f"inference/{key}"] = {
                "median_s": {k: v["median_s"] for k, v in block["times"].items()},
                "ratios": {k: v["median_of_pair_ratios"] for k, v in block["ratios"].items()},
                "unmerged_overhead": block["unmerged_overhead"],
                "outputs_ok": block["checks"]["ok"],
            }
    memory = results.get("memory")
    if memory:
        ck = memory["checkpoints"]
        stated["memory"] = {
            "peak_increase_bytes": {
                k: v["peak_increase_bytes"] for k, v in memory["peak_memory"].items()
            },
            "peak_increase_ratios": memory["peak_increase_ratios"],
            "checkpoint_bytes": {
                "lora_lightning_trimmed_ckpt": ck["lora_lightning_trimmed_ckpt"]["bytes"],
                "full_finetune_plain_ckpt": ck["full_finetune_plain_ckpt"]["bytes"],
                "lora_lightning_adapter_dir": ck["lora_lightning_adapter_dir"]["bytes"],
                "peft_adapter_dir": ck["peft_adapter_dir"]["bytes"],
            },
            "checkpoint_ratios": ck["ratios"],
        }
    return {"goals": goals, "stated": stated}


def render(summary: dict[str, Any], results: dict[str, dict[str, Any] | None]) -> str:
    goals = summary["goals"]
    met = sum(g["met"] for g in goals)
    lines = [
        "# Benchmark summary: lora_lightning vs Hugging Face PEFT",
        "",
        f"One command (`python -m experiments.bench.run_all`{' --quick' if summary['quick'] else ''}"
        f"), every benchmark in its own process, interleaved repeats, medians. {met} of "
        f"{len(goals)} goals met. Ratios are medians of per-round ratios (below 1: ours "
        "faster/smaller); intervals are distribution-free intervals for that median.",
        "",
    ]
    if summary["quick"]:
        lines += ["**QUICK SMOKE RUN: tiny sizes, the numbers mean nothing.**", ""]
    lines += ["## Machine", "", *machine_lines(summary["machine"]), ""]
    lines += [
        "## Goals (issue #5)",
        "",
        markdown_table(
            ["goal", "target", "measured", "interval (coverage)", "verdict", "floor"],
            [
                [
                    g["description"],
                    f"<= {g['target_ratio']}",
                    f"**{g['measured_ratio']:.3f}**",
                    f"{g['ci'][0]:.3f} to {g['ci'][1]:.3f} ({g['ci_coverage']:.0%})",
                    f"**{g['verdict']}**",
                    ""
                    if g.get("best_possible_ratio") is None
                    else f"{g['best_possible_ratio']:.3f}",
                ]
                for g in goals
            ],
        ),
        "",
        "`floor` (train step): the ratio a zero-cost adapter reaches, measured in the same run "
        "(only query/key/value biases train, so the backward through the frozen base is the one "
        "LoRA needs). No LoRA that leaves the base model's computation as it is can go below it; "
        "a goal under its floor cannot be met that way.",
        "",
    ]
    lines += _render_details(results)
    runs = summary["runs"]
    lines += [
        "## Runs",
        "",
        markdown_table(
            ["benchmark", "exit code", "wall time", "report"],
            [
                [name, r["exit_code"], f"{r['wall_seconds']:.0f} s", f"`{name}.md`"]
                for name, r in runs.items()
            ],
        ),
        "",
        f"Total: {sum(r['wall_seconds'] for r in runs.values()):.0f} s.",
    ]
    return "\n".join(lines)


def _render_details(results: dict[str, dict[str, Any] | None]) -> list[str]:
    lines: list[str] = []
    injection = results.get("injection")
    if injection:
        t, r = injection["times"], injection["ratios"]
        lines += [
            "## Injection (7B-shaped Llama on meta, r=8, 224 projections)",
            "",
            f"lora_lightning {ms(t['lora_lightning']['median_s'])}, PEFT "
            f"{ms(t['peft']['median_s'])}, PEFT low_cpu_mem_usage "
            f"{ms(t['peft_low_cpu_mem_usage']['median_s'])}: ours / PEFT "
            f"**{r['lora_lightning/peft']['median_of_pair_ratios']:.3f}**, ours / PEFT "
            "low_cpu_mem_usage "
            f"{r['lora_lightning/peft_low_cpu_mem_usage']['median_of_pair_ratios']:.3f}.",
            "",
        ]
    train = results.get("train_step")
    if train:
        lines += [
            "## Training step (r=8, query/key/value)",
            "",
            "Dropout 0.1 is the project's default config. Our fused query/key/value share ONE "
            "LoRA dropout mask (one A matmul and one dropout for the three); PEFT draws one mask "
            "per module. `unfused` is ours with PEFT's per-module masks. `floor / PEFT`: a "
            "zero-cost adapter's step (only query/key/value biases train) over PEFT's, the best "
            "ratio any LoRA reaches without changing the base model's computation; `LoRA work "
            "over the floor`: step minus floor, per round, median.",
            "",
        ]
        rows = []
        for key, block in train["models"].items():
            t, r = block["times"], block["ratios"]
            setup = block["setup"]
            label = f"{key} ({setup['batch_size']}x{setup['seq_len']})"
            for d in ("0.0", "0.1"):
                rows.append(
                    [
                        label,
                        d,
                        ms(t[f"lora_lightning_d{d}"]["median_s"]),
                        ms(t[f"peft_d{d}"]["median_s"]),
                        ms(t["full_finetune"]["median_s"]) if d == "0.0" else "",
                        f"**{r[f'lora_lightning_d{d}/peft_d{d}']['median_of_pair_ratios']:.3f}**",
                        (
                            f"{r[f'lora_lightning_d{d}/full_finetune']['median_of_pair_ratios']:.3f}"
                            if f"lora_lightning_d{d}/full_finetune" in r
                            else ""
                        ),
                        (
                            f"{r['lora_lightning_unfused_d0.1/peft_d0.1']['median_of_pair_ratios']:.3f}"
                            if d == "0.1" and "lora_lightning_unfused_d0.1/peft_d0.1" in r
                            else ""
                        ),
                        (
                            f"{r[f'{FLOOR}/peft_d{d}']['median_of_pair_ratios']:.3f}"
                            if f"{FLOOR}/peft_d{d}" in r
                            else ""
                        ),
                        _overhead(block, d),
                    ]
                )
        lines += [
            markdown_table(
                [
                    "model (batch)",
                    "LoRA dropout",
                    "ours",
                    "PEFT",
                    "full FT",
                    "ours / PEFT",
                    "ours / full FT",
                    "ours unfused / PEFT",
                    "floor / PEFT",
                    "LoRA work over the floor: ours vs PEFT",
                ],
                rows,
            ),
            "",
            "Numerics (losses vs PEFT over 3 steps, same A, same RNG): "
            + "; ".join(
                f"{key} {label.replace('_', ' ')} {'ok' if n['ok'] else 'FAILED'} "
                f"(max |loss diff| {n['max_abs_loss_diff']:.1e})"
                for key, block in train["models"].items()
                for label, n in block["numerics"].items()
            )
            + ".",
            "",
        ]
    inference = results.get("inference")
    if inference:
        rows = []
        for key, block in inference["models"].items():
            t, r = block["times"], block["ratios"]
            setup = block["setup"]
            rows.append(
                [
                    f"{key} ({setup['batch_size']}x{setup['seq_len']})",
                    ms(t["base"]["median_s"]),
                    ms(t["lora_lightning_merged"]["median_s"]),
                    ms(t["lora_lightning"]["median_s"]),
                    ms(t["peft"]["median_s"]),
                    f"**{r['lora_lightning_merged/base']['median_of_pair_ratios']:.3f}**",
                    f"{r['lora_lightning/base']['median_of_pair_ratios']:.3f}",
                    f"{r['peft/base']['median_of_pair_ratios']:.3f}",
                    f"{r['lora_lightning/peft']['median_of_pair_ratios']:.3f}",
                ]
            )
        lines += [
            "## Inference (eval, torch.no_grad)",
            "",
            markdown_table(
                [
                    "model (batch)",
                    "base",
                    "ours merged",
                    "ours unmerged",
                    "PEFT unmerged",
                    "merged / base",
                    "ours unmerged / base",
                    "PEFT unmerged / base",
                    "ours / PEFT (unmerged)",
                ],
                rows,
            ),
            "",
            "Unmerged overhead (unmerged / base - 1): "
            + "; ".join(
                f"{key}: ours {b['unmerged_overhead']['lora_lightning']:+.1%}, PEFT "
                f"{b['unmerged_overhead']['peft']:+.1%}"
                for key, b in inference["models"].items()
            )
            + ". Outputs merged vs unmerged vs PEFT: "
            + ", ".join(
                f"{key} {'ok' if b['checks']['ok'] else 'FAILED'}"
                for key, b in inference["models"].items()
            )
            + ".",
            "",
        ]
    memory = results.get("memory")
    if memory:
        runs, setup = memory["peak_memory"], memory["setup"]
        ck = memory["checkpoints"]
        lines += [
            f"## Peak training memory (MiniLM, batch {setup['batch_size']}x{setup['seq_len']}, "
            f"{setup['steps']} steps, each in its own process)",
            "",
            markdown_table(
                ["variant", "peak RSS increase over the loaded model", "optimizer state"],
                [
                    [
                        f"`{name}`",
                        f"{r['peak_increase_bytes'] / MIB:.1f} MiB",
                        f"{r['optimizer_state_bytes'] / MIB:.2f} MiB",
                    ]
                    for name, r in runs.items()
                ],
            ),
            "",
            "Ratios of the increases: "
            + ", ".join(f"{k} {v:.3f}" for k, v in memory["peak_increase_ratios"].items())
            + ".",
            "",
            "## Checkpoint bytes (MiniLM TextClassifier, Lightning, 2 steps)",
            "",
            markdown_table(
                ["file", "bytes"],
                [
                    [
                        "our trimmed Lightning checkpoint",
                        f"{ck['lora_lightning_trimmed_ckpt']['bytes']:,}",
                    ],
                    [
                        "plain full Lightning checkpoint (full fine-tuning)",
                        f"{ck['full_finetune_plain_ckpt']['bytes']:,}",
                    ],
                    ["our adapter directory", f"{ck['lora_lightning_adapter_dir']['bytes']:,}"],
                    ["PEFT adapter directory", f"{ck['peft_adapter_dir']['bytes']:,}"],
                ],
            ),
            "",
            "Ratios: " + ", ".join(f"{k} {v:.4f}" for k, v in ck["ratios"].items()) + ".",
            "",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default all)",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: rebuild the summary from the JSON files already in --out",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for every benchmark (default 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; expected a subset of {list(BENCHMARKS)}")

    apply_threads(args.threads)  # so the machine record shows the benchmarks' setting
    machine = machine_info()
    runs: dict[str, dict[str, Any]] = {}
    if args.summary_only:  # the runs and the machine they ran on stay those of the last run
        previous = load(args.out, NAME)
        runs = (previous or {}).get("runs", {})
        machine = (previous or {}).get("machine", machine)
    else:
        for name in selected:
            runs[name] = run_benchmark(name, args.out, args.quick, args.threads)
    results = {name: load(args.out, name) for name in BENCHMARKS}
    if not args.summary_only:  # never summarise a stale file from an earlier run
        results = {
            name: results[name] if runs.get(name, {}).get("wrote_results") else None
            for name in BENCHMARKS
        }
    summary = {
        "benchmark": NAME,
        "quick": args.quick or any(r and r.get("quick") for r in results.values()),
        "machine": machine,
        "runs": runs,
        **collect(results),
    }
    paths = write_results(args.out, NAME, summary, render(summary, results))
    print(render(summary, results))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    failed = [name for name, r in runs.items() if r["exit_code"] != 0]
    if failed:
        raise SystemExit(f"benchmark(s) failed: {failed}; see their reports and output above")
    return summary


if __name__ == "__main__":
    main()
