"""QLoRA memory (issue 14): peak training memory and step time, nf4 base vs float32 base.

Runs (``--runs``, default ``minilm@32,bert_base@8,bert_base@1``): the real MiniLM-L6 at batch
32 x 64 and the BERT-base-shaped random model at 8 x 64 (the other benchmarks' batches) and
at 1 x 64 (where weights, not activations, dominate). For each run and each base
(``float32``: plain LoRA; ``nf4``: ``quantize_base=nf4``), one worker in its OWN fresh Python
process: records its resident set size (``VmRSS``) after imports (interpreter, torch,
transformers, torchao: the *baseline*), builds the model, copies every parameter into
anonymous memory, injects LoRA (r=8, alpha=16, dropout 0, on every encoder Linear:
query/key/value/dense as the default job, the pooler excluded, the classifier head in
``modules_to_save``), hands freed heap pages back to the OS (``malloc_trim(0)``), records the
RSS after load, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), trains
``--warmup`` + ``--steps`` AdamW steps on a fixed random batch, and reads the peak back
(``VmHWM``).

Two things would otherwise measure the allocator instead of the tensors. **mmapped weights:**
``from_pretrained`` can leave MiniLM's weights mapped from the safetensors file, resident only
once touched, which hides the float weights from the float run's RSS after load and keeps the
replaced pages resident in the nf4 run; copying every parameter first gives both runs
ordinary memory. **glibc heap retention:** freed blocks stay in the process's heap (its mmap
threshold grows after large frees), so RSS keeps the high-water mark of whatever was freed;
the workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so each tensor of 64 KiB or more is its
own mapping, returned when freed (without it the peaks were ~500 MiB higher in both runs).

Reported per run: the **training peak above baseline** (peak RSS while training minus the
baseline: weights, activations, gradients, optimizer state, temporaries; the headline, ratio
nf4 / float32), the exact bytes of the stored weights (every parameter, a quantized one by its
storage tensors) and their ratio, the RSS after load, and the median step time.

Run: ``python -m experiments.bench.memory_qlora [--runs MODEL@BATCH,...] [--steps N]
[--out DIR]`` (``--worker MODEL:BASE:BATCH`` is the internal per-run entry point). Needs the
``experiments`` and ``quant`` extras.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from experiments.bench.common import (
    REPO_ROOT,
    apply_threads,
    base_parser,
    machine_info,
    machine_lines,
    markdown_table,
    write_results,
)
from experiments.bench.memory import _reset_peak_rss, _status_kib

BASES = ("float32", "nf4")
#: Runs: model key @ batch size (MiniLM and BERT-base at the other benchmarks' batches, and
#: BERT-base at batch 1, where the weights dominate the training memory).
RUNS = "minilm@32,bert_base@8,bert_base@1"
#: glibc: every allocation from 64 KiB up is its own mmap, returned to the OS when freed.
MMAP_THRESHOLD = 65536
SEQ_LEN = 64
GOAL = 0.5  # nf4 / float32 training peak for BERT-base (issue 14)


def worker(
    model_key: str, base: str, batch_size: int, steps: int, warmup: int, tiny: bool
) -> dict[str, Any]:
    """One run (see the module docstring); returns every number as a dict."""
    import torch.nn.functional as F

    from experiments.bench.models import load_model, random_batch
    from lora_lightning import LoRAConfig, count_parameters, inject_lora
    from lora_lightning.core import quantize

    quantize.backend()  # import torchao before the baseline in both runs: same baseline
    baseline = _status_kib("VmRSS")
    model = load_model(model_key, num_labels=2, tiny=tiny).train()
    with torch.no_grad():  # into anonymous memory: see "mmapped weights" in the docstring
        for param in model.parameters():
            param.data = param.data.clone()
    gc.collect()
    config = LoRAConfig(
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=[r".*\.(query|key|value|dense)"],
        exclude_modules=[".*pooler.*"],
        modules_to_save=["classifier"],
        quantize_base="none" if base == "float32" else base,
    )
    inject_lora(model, config)
    batch = random_batch(model, batch_size, SEQ_LEN)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weight_bytes = sum(quantize.stored_bytes(p) for p in model.parameters())
    gc.collect()
    trimmed = _malloc_trim()
    rss_loaded = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    counts = count_parameters(model)
    return {
        "model": model_key,
        "base": base,
        "batch": [batch_size, SEQ_LEN],
        "baseline_rss_kib": baseline,
        "rss_after_load_kib": rss_loaded,
        "peak_rss_training_kib": peak,
        "peak_was_reset_after_load": reset,
        "malloc_trim_after_load": trimmed,
        "training_peak_above_baseline_kib": peak - baseline,
        "weight_bytes": weight_bytes,
        "quantized_parameters": len(quantize.quantized_parameter_names(model)),
        "parameters_total": counts.total,
        "parameters_trainable": counts.trainable,
        "step_seconds": times,
        "step_seconds_median": statistics.median(times),
        "final_loss": float(loss),
    }


def _malloc_trim() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim(0)``); True if done.

    The float weights a quantized run replaces are freed, but glibc keeps freed heap pages
    (its mmap threshold grows after large frees), so without this the RSS after load still
    counts them. Both runs call it, at the same point."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def run_worker(model_key: str, batch: int, base: str, args: Any) -> dict[str, Any]:
    """One run in a fresh interpreter; returns the JSON it prints last."""
    command = [sys.executable, "-m", "experiments.bench.memory_qlora"]
    command += ["--worker", f"{model_key}:{base}:{batch}", "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {model_key}:{base} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(result: dict[str, Any]) -> str:
    rows, goal_lines = [], []
    for model_key, runs in result["runs"].items():
        f32, q = runs["float32"], runs["nf4"]
        for r in (f32, q):
            rows.append(
                [
                    r["model"],
                    "x".join(map(str, r["batch"])),
                    r["base"],
                    f"{r['weight_bytes'] / 2**20:.1f}",
                    f"{r['rss_after_load_kib'] / 1024:.0f}",
                    f"{r['training_peak_above_baseline_kib'] / 1024:.0f}",
                    f"{r['step_seconds_median'] * 1e3:.0f}",
                ]
            )
        ratios = result["ratios"][model_key]
        rows.append(
            [
                model_key,
                "",
                "**nf4 / float32**",
                f"**{ratios['weight_bytes']:.3f}**",
                f"{ratios['rss_after_load']:.3f}",
                f"**{ratios['training_peak_above_baseline']:.3f}**",
                f"{ratios['step_time']:.2f}",
            ]
        )
        if model_key.startswith("bert_base"):
            met = ratios["training_peak_above_baseline"] <= GOAL
            goal_lines.append(
                f"- Goal (BERT-base training peak nf4 / float32 <= {GOAL}), batch "
                f"{f32['batch'][0]}: "
                f"{ratios['training_peak_above_baseline']:.3f}, **{'met' if met else 'NOT met'}**"
                f" (weights alone: {ratios['weight_bytes']:.3f})"
            )
    return "\n".join(
        [
            "# QLoRA memory: nf4 base vs float32 base (issue 14)",
            "",
            *machine_lines(result["machine"]),
            f"- torchao {result['machine']['versions'].get('torchao')}; steps: "
            f"{result['warmup']} warm-up + {result['steps']} timed, one process per run",
            "",
            "LoRA r=8 on every encoder Linear (query/key/value/dense), classifier trained in "
            "full, AdamW. MiB columns: weights = exact bytes of every stored parameter; RSS "
            "after load; training peak above baseline = peak RSS while training minus the RSS "
            "of the process before the model was built.",
            "",
            markdown_table(
                [
                    "model",
                    "batch",
                    "base",
                    "weights MiB",
                    "RSS after load MiB",
                    "training peak above baseline MiB",
                    "step ms (median)",
                ],
                rows,
            ),  # fmt: skip
            "",
            *goal_lines,
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=1)
    parser.add_argument("--runs", default=RUNS, help=f"MODEL@BATCH,... (default {RUNS})")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--worker", default=None, help="internal: run one MODEL:BASE here, print its JSON"
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.worker:
        model_key, base, batch = args.worker.split(":")
        print(json.dumps(worker(model_key, base, int(batch), args.steps, args.warmup, args.quick)))
        return {}
    if args.quick:  # MiniLM only: the tiny BERT stand-in's 64 x 64 weights are too small for nf4
        args.steps, args.warmup, args.runs = 1, 0, "minilm@4"
    machine = machine_info()
    import importlib.metadata as md

    machine["versions"]["torchao"] = md.version("torchao")
    runs: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for run in args.runs.split(","):
        model_key, batch = run.split("@")
        runs[run] = {base: run_worker(model_key, int(batch), base, args) for base in BASES}
        f32, q = runs[run]["float32"], runs[run]["nf4"]
        ratios[run] = {
            "weight_bytes": q["weight_bytes"] / f32["weight_bytes"],
            "rss_after_load": q["rss_after_load_kib"] / f32["rss_after_load_kib"],
            "training_peak_above_baseline": q["training_peak_above_baseline_kib"]
            / f32["training_peak_above_baseline_kib"],
            "step_time": q["step_seconds_median"] / f32["step_seconds_median"],
        }
    result = {
        "machine": machine,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": runs,
        "ratios": ratios,
    }
    text = render(result)
    paths = write_results(args.out, "memory_qlora", result, text)
    print(text)
    print("wrote", *paths)
    return result


if __name__ == "__main__":
    main()
