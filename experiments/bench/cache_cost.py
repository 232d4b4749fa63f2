"""What keying caches on everything they read costs (issue 21): one training step of a small
BERT (hidden 256, 4 layers, batch 8x64, r=8 on query/key/value/dense), CPU, one thread.

    python -m experiments.bench.cache_cost             # prints one line per setting

DoRA recomputes ``||W||²`` every forward instead of caching it on the weight's version
counter; the query/key/value group (``group_shared_input``) keys its rows on ``lora_A`` too
and drops them at the end of the attention's forward. Run it on the commit before and after
to compare; ``results/cache_cost.md`` holds the numbers.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import LoRAConfig, inject_lora


def step_ms(config: LoRAConfig, steps: int = 25, warmup: int = 5) -> tuple[float, float]:
    """(minimum, median) milliseconds of one forward + backward + AdamW step; on a shared
    machine the minimum is the steadier of the two."""
    torch.manual_seed(0)
    shape = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=1024)  # fmt: skip
    model = BertForSequenceClassification(shape)
    inject_lora(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, labels = torch.randint(0, 1000, (8, 64)), torch.randint(0, 2, (8,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1000 * min(times[warmup:]), 1000 * statistics.median(times[warmup:])


def main() -> None:
    torch.set_num_threads(1)
    targets = ["query", "key", "value", "dense"]
    for label, config in {
        "dora": LoRAConfig(r=8, use_dora=True, target_modules=targets),
        "lora, q/k/v grouped": LoRAConfig(r=8, target_modules=targets),
    }.items():
        fastest, median = step_ms(config)
        print(f"{label}: min {fastest:.1f} ms/step, median {median:.1f}")


if __name__ == "__main__":
    main()
