"""Switching between named adapters on MiniLM-L6 (``set_active_adapter``, ``hotswap_adapter``).

    python -m experiments.bench.switch            # writes results/switch.{json,md}

Three adapters are loaded by name onto the real MiniLM classifier: ``a`` and ``b`` have the
same layout (query/value, r=8, the classifier head in ``modules_to_save``), so switching
between them copies values in place; ``c`` (query/key/value, r=16, no head) has another
layout, so switching to and from it re-injects. Timed per switch (median of the rounds), with
a hot-swap of a file into the active adapter and a forward of one batch for scale.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.bench.common import (
    apply_threads,
    base_parser,
    machine_info,
    machine_lines,
    markdown_table,
    ms,
    summary,
    timed,
    write_results,
)
from experiments.bench.models import load_minilm, random_batch
from lora_lightning import (
    LoRAConfig,
    hotswap_adapter,
    inject_lora,
    load_adapter,
    save_adapter,
    set_active_adapter,
)

NAME = "switch"
DEFAULT_REPEATS = 20
LAYOUTS = {
    "a": dict(target_modules=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"]),
    "b": dict(target_modules=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"]),
    "c": dict(target_modules=["query", "key", "value"], r=16, alpha=32),
}


@torch.no_grad()
def _write_adapters(folder: Path) -> dict[str, Path]:
    dirs = {}
    for seed, (name, fields) in enumerate(LAYOUTS.items()):
        model = load_minilm()
        inject_lora(model, LoRAConfig(**fields, seed=seed))
        generator = torch.Generator().manual_seed(seed)
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        dirs[name] = save_adapter(model, folder / name)
    return dirs


def measure(repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _write_adapters(Path(tmp))
        model = load_minilm().eval()
        for name, directory in dirs.items():
            load_adapter(model, directory, name=name)
        batch = random_batch(model, batch=8, seq_len=64, labels=False)
        times: dict[str, list[float]] = {"in_place": [], "reinject": [], "hotswap": []}
        forward: list[float] = []
        for _ in range(repeats):
            for target in ("b", "a"):
                times["in_place"].append(timed(lambda t=target: set_active_adapter(model, t))[0])
            for target in ("c", "a"):
                times["reinject"].append(timed(lambda t=target: set_active_adapter(model, t))[0])
            times["hotswap"].append(timed(lambda: hotswap_adapter(model, dirs["a"], "a"))[0])
            with torch.no_grad():
                forward.append(timed(lambda: model(**batch))[0])
    result = {key: summary(values) for key, values in times.items()}
    result["forward_batch_8x64"] = summary(forward)
    return result


def render(result: dict[str, Any]) -> str:
    labels = {
        "in_place": "set_active_adapter, same layout (in-place copy)",
        "reinject": "set_active_adapter, other layout (unload + apply plan + copy)",
        "hotswap": "hotswap_adapter into the active adapter (read + check + copy)",
        "forward_batch_8x64": "for scale: one forward, batch 8 x 64 tokens",
    }
    rows = [
        [labels[k], ms(v["median_s"]), ms(v["min_s"]), ms(v["max_s"])]
        for k, v in result["timings"].items()
    ]
    return "\n".join(
        [
            "# Switching adapters on MiniLM-L6 (CPU)",
            "",
            f"{result['repeats']} rounds; adapters a, b: query/value r=8 + classifier head; "
            "c: query/key/value r=16.",
            "",
            markdown_table(["operation", "median", "min", "max"], rows),
            "",
            "## Machine",
            "",
            *machine_lines(result["machine"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_REPEATS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS)
    result = {
        "benchmark": NAME,
        "repeats": repeats,
        "machine": machine_info(),
        "timings": measure(repeats),
    }
    for path in write_results(args.out, NAME, result, render(result)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
