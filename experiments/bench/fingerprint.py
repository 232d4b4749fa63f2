"""Cost of the base-model fingerprint that ``LoRACallback`` computes at ``setup``.

``lora_lightning.lightning.fingerprint.base_fingerprint`` checksums every value of every frozen
parameter (raw bits as 64-bit words, position-weighted wrapping int64 sums per 512 KiB row,
mixed into sha256 with names, shapes and dtypes). This times it on the LoRA-adapted models of
the other benchmarks, MiniLM-L6 (real weights) and the BERT-base-shaped random model, both
float32 on CPU (where ``setup`` computes it: Lightning moves the model to the accelerator
afterwards), and reports seconds and GB/s of frozen weights read. For scale it also times one
plain read of the same tensors (``tensor.sum()`` each: what memory speed means on this machine)
and hashlib's sha256 over the same bytes (CPU only).

At scale (``--llama``, on by default): a 1.1B-parameter float16 Llama (TinyLlama-1.1B's shape,
built from a ``LlamaConfig`` in real memory, 2.2 GB, values a repeated random pattern), LoRA
r=8 on q/k/v/o. Before: the whole checksum in one process (what every rank computed until
2026-12-03, and what one process still computes). After: ``base_fingerprint(model,
shared=True)`` in 2 processes of a gloo group, each checksumming its half of the frozen bytes
and swapping the results (``all_gather_object``); the time per rank includes the exchange,
and both values must equal the one-process value.

Run: ``python -m experiments.bench.fingerprint [--repeats N] [--threads N] [--quick]
[--no-llama]``
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from experiments.bench.common import (
    add_model_options,
    apply_threads,
    base_parser,
    machine_info,
    machine_lines,
    markdown_table,
    ms,
    timed,
    write_results,
)
from experiments.bench.models import MODEL_NAMES, load_model
from lora_lightning.core import LoRAConfig, inject_lora, trainable_names
from lora_lightning.lightning.fingerprint import base_fingerprint

NAME = "fingerprint"
DEFAULT_REPEATS = 5
TARGETS = ["query", "key", "value"]
#: TinyLlama-1.1B's shape; the quick run uses a few-MB stand-in.
LLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
LLAMA_QUICK = {**LLAMA, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = 2


def frozen(model: nn.Module) -> list[torch.Tensor]:
    """The parameters the fingerprint reads: every one that is not trained."""
    trainable = set(trainable_names(model))
    return [
        p.detach()
        for name, p in model.named_parameters()
        if name not in trainable and not name.endswith(("lora_A.weight", "lora_B.weight"))
    ]


def sha256_of_weights(model: nn.Module) -> str:
    """hashlib's sha256 over the raw bytes of every frozen parameter (reference only)."""
    digest = hashlib.sha256()
    for tensor in frozen(model):
        digest.update(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def read_once(tensors: list[torch.Tensor]) -> float:
    """One reading pass over every tensor (a float sum each): the memory-speed yardstick."""
    return float(sum(float(t.sum()) for t in tensors))


def measure(key: str, repeats: int, tiny: bool) -> dict[str, Any]:
    """Adapt ``key`` with r=8 on query/key/value; time the fingerprint and sha256."""
    model = load_model(key, tiny=tiny)
    inject_lora(model, LoRAConfig(r=8, target_modules=TARGETS))
    tensors = frozen(model)
    size = sum(t.numel() * t.element_size() for t in tensors)
    first = base_fingerprint(model)  # warm-up (and the value all rounds must reproduce)
    ours, reference, read, same = [], [], [], True
    for _ in range(repeats):
        seconds, value = timed(lambda: base_fingerprint(model))
        ours.append(seconds)
        same &= value == first
        reference.append(timed(lambda: sha256_of_weights(model))[0])
        read.append(timed(lambda: read_once(tensors))[0])
    median = statistics.median(ours)
    ref_median = statistics.median(reference)
    return {
        "model": MODEL_NAMES[key] + (" (tiny stand-in)" if tiny else ""),
        "frozen_parameters": sum(t.numel() for t in tensors),
        "frozen_bytes": size,
        "fingerprint": first,
        "stable_across_rounds": same,
        "fingerprint_s": {"median": median, "min": min(ours), "max": max(ours), "all": ours},
        "fingerprint_gb_per_s": size / median / 1e9,
        "read_s": {"median": statistics.median(read), "all": read},
        "read_gb_per_s": size / statistics.median(read) / 1e9,
        "sha256_s": {"median": ref_median, "all": reference},
        "sha256_gb_per_s": size / ref_median / 1e9,
    }


def build_llama(quick: bool) -> nn.Module:
    """A float16 Llama in real CPU memory, adapted with r=8 on q/k/v/o; every value from a
    seeded 16M-value random pattern (filling 1.1B values one by one would take minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(LLAMA_QUICK if quick else LLAMA))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    pattern = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), pattern.numel()):
                chunk = flat[start : start + pattern.numel()]
                chunk.copy_(pattern[: chunk.numel()])
    inject_lora(model, LoRAConfig(r=8, target_modules=LLAMA_TARGETS))
    return model


def cpu_timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), CPU seconds this process spent in it)``: the work done,
    whatever share of a core the process got on a busy machine."""
    start = time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - start


def _shared_rank(rank: int, port: int, quick: bool, repeats: int, out: str) -> None:
    """One rank of the 2-process run: time ``base_fingerprint(shared=True)`` and, in the same
    conditions (both ranks busy at once), the whole checksum on every rank as before."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        model = build_llama(quick)
        record: dict[str, Any] = {"times": [], "cpu": [], "all_times": [], "all_cpu": []}
        values = set()
        for _ in range(repeats):
            for prefix, shared in (("all_", False), ("", True)):
                dist.barrier()
                seconds, (value, cpu) = timed(
                    lambda shared=shared: cpu_timed(base_fingerprint, model, shared=shared)
                )
                record[f"{prefix}times"].append(seconds)
                record[f"{prefix}cpu"].append(cpu)
                values.add(value)
        record["values"] = sorted(values)
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def measure_llama(repeats: int, quick: bool) -> dict[str, Any]:
    """Before (one process, every tensor) and after (2 ranks sharing the work) on the same
    1.1B float16 model."""
    before, before_cpu, value, count, size = _one_process(repeats, quick)
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(_shared_rank, args=(port, quick, repeats, out), nprocs=RANKS)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(RANKS)]
    after = [max(times) for times in zip(*(r["times"] for r in ranks), strict=True)]
    after_cpu = [max(times) for times in zip(*(r["cpu"] for r in ranks), strict=True)]
    every_rank = [max(times) for times in zip(*(r["all_times"] for r in ranks), strict=True)]
    every_rank_cpu = [max(times) for times in zip(*(r["all_cpu"] for r in ranks), strict=True)]
    return {
        "model": "Llama, TinyLlama-1.1B shape (hidden 2048, 22 layers, MLP 5632, vocab 32000), "
        "float16, LoRA r=8 on q/k/v/o" + (" (tiny stand-in)" if quick else ""),
        "frozen_parameters": count,
        "frozen_bytes": size,
        "fingerprint": value,
        "same_value_one_process_and_shared": all(r["values"] == [value] for r in ranks),
        "before_one_process_s": summary_of(before),
        "before_gb_per_s": size / statistics.median(before) / 1e9,
        "before_cpu_s": summary_of(before_cpu),
        "after_ranks": RANKS,
        "after_slowest_rank_s": summary_of(after),
        "after_per_rank_s": [r["times"] for r in ranks],
        "after_busiest_rank_cpu_s": summary_of(after_cpu),
        "after_per_rank_cpu_s": [r["cpu"] for r in ranks],
        "before_on_every_rank_slowest_s": summary_of(every_rank),
        "before_on_every_rank_busiest_cpu_s": summary_of(every_rank_cpu),
        "speedup_same_conditions": statistics.median(every_rank) / statistics.median(after),
        "cpu_per_rank_ratio": statistics.median(after_cpu) / statistics.median(every_rank_cpu),
    }


def _one_process(repeats: int, quick: bool) -> tuple[list[float], list[float], str, int, int]:
    """Wall and CPU times of the whole checksum in this process, its value, frozen values and
    bytes (the model is freed on return: the ranks build their own copies)."""
    model = build_llama(quick)
    tensors = frozen(model)
    runs = [timed(lambda: cpu_timed(base_fingerprint, model)) for _ in range(repeats)]
    values = {value for _, (value, _) in runs}
    assert len(values) == 1, "the fingerprint changed between rounds"
    count = sum(t.numel() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    wall = [seconds for seconds, _ in runs]
    return wall, [cpu for _, (_, cpu) in runs], values.pop(), count, size


def summary_of(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "all": times}


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            key,
            f"{r['frozen_parameters'] / 1e6:.1f} M",
            f"{r['frozen_bytes'] / 1e6:.0f} MB",
            ms(r["fingerprint_s"]["median"]),
            f"{r['fingerprint_gb_per_s']:.2f}",
            f"{ms(r['read_s']['median'])} ({r['read_gb_per_s']:.2f} GB/s)",
            ms(r["sha256_s"]["median"]),
            f"{r['sha256_gb_per_s']:.2f}",
            "yes" if r["stable_across_rounds"] else "NO",
        ]
        for key, r in result["models"].items()
    ]
    headers = [
        "model",
        "frozen params",
        "frozen bytes",
        "fingerprint (median)",
        "GB/s",
        "one read pass (sum)",
        "sha256 of the bytes (reference)",
        "GB/s",
        "same hash every round",
    ]
    lines = [
        "# Base fingerprint benchmark",
        "",
        "`base_fingerprint` (what `LoRACallback.setup` computes to tie checkpoints to their "
        "base model) over every frozen parameter of the LoRA-adapted model (r=8 on query, key, "
        f"value), float32 on CPU; median of {result['repeats']} rounds. GB/s = frozen bytes / "
        "median seconds.",
        "",
        markdown_table(headers, rows),
        "",
        "References: one read pass is `tensor.sum()` over every frozen tensor (what reading "
        "the weights once costs here); sha256 is hashlib over the same bytes (CPU only, not an "
        "option for weights on a GPU). The fingerprint runs once per `setup`.",
        "",
        *_render_llama(result.get("llama")),
        "## Machine",
        "",
        *machine_lines(result["machine"]),
    ]
    return "\n".join(lines)


def _render_llama(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return []
    row = [
        f"{r['frozen_parameters'] / 1e9:.2f} B",
        f"{r['frozen_bytes'] / 1e9:.2f} GB",
        f"{r['before_one_process_s']['median']:.2f} s ({r['before_gb_per_s']:.2f} GB/s)",
        f"{r['before_on_every_rank_slowest_s']['median']:.2f} s "
        f"(CPU {r['before_on_every_rank_busiest_cpu_s']['median']:.2f} s)",
        f"{r['after_slowest_rank_s']['median']:.2f} s "
        f"(CPU {r['after_busiest_rank_cpu_s']['median']:.2f} s)",
        f"{r['speedup_same_conditions']:.2f}x (CPU {r['cpu_per_rank_ratio']:.2f})",
        "yes" if r["same_value_one_process_and_shared"] else "NO",
    ]
    headers = [
        "frozen params",
        "frozen bytes",
        "one process, whole checksum (median wall)",
        f"before: each of {r['after_ranks']} ranks, whole checksum (slowest rank)",
        f"after: {r['after_ranks']} ranks sharing, incl. exchange (slowest rank)",
        "after / before per rank: wall speedup (CPU ratio)",
        "same value",
    ]
    return [
        "## At scale: a 1.1B float16 Llama, before and after sharing the work",
        "",
        r["model"] + ", built from a `LlamaConfig` in real CPU memory.",
        "",
        markdown_table(headers, [row]),
        "",
        "Before is what every rank computed at every `setup` until 2026-12-03: the whole "
        "checksum (a single process still does: same kernel, same value). After, each of "
        f"the {r['after_ranks']} ranks of a gloo group checksums about half of the frozen "
        "bytes (whole tensors, largest first to the least loaded rank) and the ranks swap "
        "their row sums (`all_gather_object`). Before and after per rank are measured in the "
        "same 2-process run, alternating, both ranks busy at once; CPU is the time the "
        "process spent (one torch thread), i.e. the work per rank whatever share of a core "
        "it got. This machine's 2 cores are shared with other jobs (load below), so the one-"
        "process time is the best case. With N ranks each reads about 1/N of the base.",
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    add_model_options(parser, DEFAULT_REPEATS)
    parser.add_argument(
        "--no-llama",
        dest="llama",
        action="store_false",
        help="skip the 1.1B float16 Llama (one process vs 2 ranks sharing the work)",
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS)
    models = {}
    for key in args.models.split(","):
        count = (args.bert_repeats or repeats) if key == "bert_base" else repeats
        models[key] = measure(key, count, tiny=args.quick)
        print(f"{key}: {ms(models[key]['fingerprint_s']['median'])}", file=sys.stderr)
    result = {
        "benchmark": NAME,
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine_info(),
        "models": models,
    }
    if args.llama:
        result["llama"] = measure_llama(3 if not args.quick else 1, args.quick)
        llama = result["llama"]
        print(f"llama: {llama['speedup_same_conditions']:.2f}x per rank", file=sys.stderr)
    for path in write_results(args.out, NAME, result, render(result)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
