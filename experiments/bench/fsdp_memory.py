"""Per-process memory of LoRA training sharded (FSDP2) vs replicated (DDP), 2 CPU processes.

Model: a Llama built from the SmolLM2-135M config (hidden 576, 30 layers, 9 heads / 3 KV
heads, intermediate 1536, vocabulary 49152, tied embeddings), random weights, float32. LoRA
r=8, alpha=16 on q_proj/k_proj/v_proj/o_proj (``inject_lora``, before any wrapping), AdamW
over the adapters. Two processes on CPU (gloo), each in its own fresh interpreter
(``torch.multiprocessing.spawn``), once per variant:

- ``ddp``: ``DistributedDataParallel`` over the whole model (every process holds it all);
- ``fsdp2``: :func:`lora_lightning.lightning.shard_model` (one ``fully_shard`` unit per
  decoder layer, then the root).

Each process trains ``--steps`` steps (batch 1 x 64 random tokens, next-token loss) and then
counts, exactly, the bytes it holds itself (a sharded tensor counts its local shard):
parameters (frozen base and adapters apart), gradients, optimizer state; plus its resident
set size (``VmRSS``, which includes the interpreter, torch and temporaries). The goal (issue
20): parameters + gradients + optimizer state per process under FSDP2 <= 0.6x DDP's.

Checkpoint bytes: each variant writes what the callback makes Lightning write: DDP a
``torch.save`` of the trimmed state (adapters + AdamW state) on rank zero; FSDP2 a distributed
checkpoint folder (``torch.distributed.checkpoint``, the adapter shards and their optimizer
state: ``save_distributed_checkpoint=True``) and a single file gathered on rank zero
(``save_distributed_checkpoint=False``), through the same functions the strategy wrapper uses
(:func:`lora_lightning.lightning.sharded.trainable_state_dict`).

Run: ``python -m experiments.bench.fsdp_memory [--steps N] [--layers N] [--out DIR]``
(about 2 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.bench.common import (
    RESULTS_DIR,
    machine_info,
    machine_lines,
    markdown_table,
    write_results,
)

NAME = "fsdp_memory"
VARIANTS = ("ddp", "fsdp2")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GOAL = 0.6
MIB = 1 << 20


def smollm2_135m_config(layers: int = 30) -> Any:
    """The SmolLM2-135M architecture (``lora_lightning.tasks.smollm2_config``), ``layers``
    decoder layers."""
    from lora_lightning.tasks import smollm2_config

    return smollm2_config(num_hidden_layers=layers)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from lora_lightning.lightning.sharded import is_dtensor

    return tensor.to_local() if is_dtensor(tensor) else tensor


def _bytes(tensors: Any) -> int:
    """Bytes of the distinct local tensors (a tied weight counted once, by its storage: ids
    of the temporary ``to_local()`` views would be reused once freed)."""
    seen, total = set(), 0
    for tensor in tensors:
        local = _local(tensor)
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(rank: int, variant: str, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from transformers import LlamaForCausalLM

    from lora_lightning import LoRAConfig, inject_lora, lora_state_dict

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_135m_config(args.layers)).train()
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=TARGETS))
    if variant == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from lora_lightning.lightning import shard_model

        shard_model(model, init_device_mesh("cpu", (2,)))
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        ids = torch.randint(0, 49152, (1, 64), generator=generator)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        # Gradients are kept (set_to_none=False keeps them allocated, as between steps).
        optimizer.zero_grad(set_to_none=False)
    params = list(model.parameters())
    record = {
        "frozen_param_bytes": _bytes(p for p in params if not p.requires_grad),
        "trainable_param_bytes": _bytes(p for p in params if p.requires_grad),
        "grad_bytes": _bytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": _bytes(
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        ),
        "rss_bytes": _rss(),
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    record["total_bytes"] = sum(
        record[k]
        for k in ("frozen_param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_bytes")
    )
    record.update(_checkpoint_bytes(variant, model, optimizer, rank, lora_state_dict))
    torch.save(record, Path(out) / f"{variant}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _checkpoint_bytes(variant, model, optimizer, rank, lora_state_dict) -> dict[str, int]:
    # One folder for both ranks (a distributed checkpoint is written by all of them).
    shared = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    root = Path(shared[0])
    try:
        sizes = {}
        if variant == "ddp":
            if rank == 0:
                state = {"state_dict": lora_state_dict(model), "optimizer": optimizer.state_dict()}
                torch.save(state, root / "ddp.ckpt")
                sizes["checkpoint_file_bytes"] = (root / "ddp.ckpt").stat().st_size
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            from lora_lightning.lightning.sharded import trainable_state_dict

            sharded = {
                "state_dict": trainable_state_dict(model, full=False),
                "optimizer_0": get_optimizer_state_dict(model, optimizer),
            }
            dcp.save(sharded, checkpoint_id=str(root / "folder.ckpt"))
            full = {
                "state_dict": trainable_state_dict(model, full=True),
                "optimizer": get_optimizer_state_dict(
                    model,
                    optimizer,
                    options=StateDictOptions(full_state_dict=True, cpu_offload=True),
                ),
            }
            dist.barrier()
            if rank == 0:
                torch.save(full, root / "file.ckpt")
                sizes["checkpoint_folder_bytes"] = _dir_bytes(root / "folder.ckpt")
                sizes["checkpoint_file_bytes"] = (root / "file.ckpt").stat().st_size
        dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    return sizes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    machine = machine_info()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for variant in VARIANTS:
            mp.spawn(worker, args=(variant, args, _free_port(), out), nprocs=2, join=True)
            results[variant] = [
                torch.load(Path(out) / f"{variant}_rank{r}.pt", weights_only=False) for r in (0, 1)
            ]
    ratio = max(r["total_bytes"] for r in results["fsdp2"]) / max(
        r["total_bytes"] for r in results["ddp"]
    )
    frozen_ratio = max(r["frozen_param_bytes"] for r in results["fsdp2"]) / max(
        r["frozen_param_bytes"] for r in results["ddp"]
    )
    payload = {
        "machine": machine,
        "settings": {"steps": args.steps, "layers": args.layers, "targets": TARGETS, "r": 8},
        "results": results,
        "goal": {
            "description": "FSDP2 params+grads+optimizer per process <= 0.6x DDP's (2 processes)",
            "ratio": ratio,
            "frozen_param_ratio": frozen_ratio,
            "target": GOAL,
            "met": ratio <= GOAL,
        },
    }
    rows = []
    for variant in VARIANTS:
        for rank, r in enumerate(results[variant]):
            rows.append([
                variant, rank, f"{r['frozen_param_bytes'] / MIB:.1f}",
                f"{r['trainable_param_bytes'] / MIB:.2f}", f"{r['grad_bytes'] / MIB:.2f}",
                f"{r['optimizer_bytes'] / MIB:.2f}", f"**{r['total_bytes'] / MIB:.1f}**",
                f"{r['rss_bytes'] / MIB:.0f}",
            ])  # fmt: skip
    files = [
        ["DDP: one file (rank 0)", results["ddp"][0]["checkpoint_file_bytes"]],
        ["FSDP2: distributed folder (all ranks' files)", results["fsdp2"][0]["checkpoint_folder_bytes"]],
        ["FSDP2: single file (gathered on rank 0)", results["fsdp2"][0]["checkpoint_file_bytes"]],
    ]  # fmt: skip
    lines = [
        "# FSDP2 vs DDP: per-process memory of LoRA training (2 CPU processes)",
        "",
        "## Machine",
        "",
        *machine_lines(machine),
        "",
        "## Memory per process",
        "",
        f"Llama from the SmolLM2-135M config ({args.layers} layers, tied embeddings, random "
        f"weights, float32, {results['ddp'][0]['parameters']:,} parameters), LoRA r=8 on "
        f"{'/'.join(TARGETS)} ({results['ddp'][0]['trainable_parameters']:,} trainable), AdamW, "
        f"{args.steps} steps of batch 1 x 64. Bytes each process holds itself (a shard counts "
        "its local part), in MiB; RSS includes the interpreter, torch and temporaries.",
        "",
        markdown_table(
            [
                "variant",
                "rank",
                "frozen params",
                "adapters",
                "grads",
                "optimizer",
                "params+grads+optimizer",
                "RSS",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"**Goal** (params+grads+optimizer per process, FSDP2 / DDP <= {GOAL}): ratio "
        f"**{ratio:.3f}** ({'met' if ratio <= GOAL else 'NOT met'}); frozen base alone "
        f"{frozen_ratio:.3f}.",
        "",
        "## Checkpoint bytes (adapters + AdamW state, what the callback keeps)",
        "",
        markdown_table(["checkpoint", "bytes"], [[name, f"{b:,}"] for name, b in files]),
        "",
        f"Reproduce: `python -m experiments.bench.fsdp_memory --steps {args.steps} "
        f"--layers {args.layers}`",
        "",
    ]
    for path in write_results(args.out, NAME, payload, "\n".join(lines)):
        print(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
