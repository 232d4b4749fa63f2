"""Cost of the base-model fingerprint that ``LoRACallback`` computes at every ``setup``.

``lora_lightning.lightning.checkpoint.base_fingerprint`` checksums every value of every frozen
parameter (raw bits as 64-bit words, position-weighted wrapping int64 sums per 512 KiB row,
mixed into sha256 with names, shapes and dtypes). This times it on the LoRA-adapted models of
the other benchmarks, MiniLM-L6 (real weights) and the BERT-base-shaped random model, both
float32 on CPU (where ``setup`` computes it: Lightning moves the model to the accelerator
afterwards), and reports seconds and GB/s of frozen weights read. For scale it also times one
plain read of the same tensors (``tensor.sum()`` each: what memory speed means on this machine)
and hashlib's sha256 over the same bytes (CPU only).

Run: ``python -m experiments.bench.fingerprint [--repeats N] [--threads N] [--quick]``
"""

from __future__ import annotations

import hashlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
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
from lora_lightning.lightning.checkpoint import base_fingerprint

NAME = "fingerprint"
DEFAULT_REPEATS = 5
TARGETS = ["query", "key", "value"]


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
        "## Machine",
        "",
        *machine_lines(result["machine"]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    add_model_options(parser, DEFAULT_REPEATS)
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
    for path in write_results(args.out, NAME, result, render(result)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
