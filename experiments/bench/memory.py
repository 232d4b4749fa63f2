"""Peak memory of a short training run, and checkpoint / adapter sizes on disk.

**Peak memory.** Each variant trains the real MiniLM-L6 (2-way head) for ``--steps`` steps
(default 5) on a fixed random batch of 32 x 64 tokens, in its OWN fresh Python process, so no
variant inherits another's allocations or allocator state. Variants (LoRA r=8, alpha=16 on
query/key/value, AdamW over the trainable parameters; the head stays frozen in LoRA runs):
``lora_lightning_d0.0``, ``peft_d0.0``, ``lora_lightning_d0.1``, ``peft_d0.1`` (LoRA dropout
0.0 / 0.1; ours fuses query/key/value behind one shared dropout mask, PEFT draws one per
module) and ``full_finetune``. A worker loads everything (model, adapters, optimizer, batch),
records its resident set size (``VmRSS``), resets the kernel's peak-RSS mark (writing ``5`` to
``/proc/self/clear_refs``), trains, and reads the peak back with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (``VmHWM`` is recorded too). The headline number
is **peak RSS during training minus RSS after load**: activations, gradients, optimizer state
and temporaries. Where the reset is not allowed, the peak is over the whole process (load
included) and the report says so. Workers run with glibc malloc returning freed blocks
(:data:`ALLOCATOR_ENV`, since 2026-12-04), so RSS follows what is allocated rather than what
the allocator kept. Exact tensor byte counts (parameters, trainable parameters,
optimizer state) are given alongside.

**Checkpoint bytes.** Lightning (``Trainer(max_steps=2)``) trains
``lora_lightning.tasks.TextClassifier`` (MiniLM) on random batches with a ``ModelCheckpoint``:

- with ``LoRACallback`` (config = ``conf/lora/default.yaml``: r=8, alpha=16, dropout 0.1 on
  every encoder Linear (query/key/value/dense, pooler excluded: 36 modules), the new
  classifier head in ``modules_to_save``): our trimmed ``.ckpt``
  (adapter + head + their optimizer state + LoRA metadata) and our exported PEFT-format
  adapter directory;
- without it (full fine-tuning): the plain Lightning ``.ckpt`` (every weight + AdamW state);
- PEFT ``save_pretrained`` of the same LoRA config on the Hugging Face model, adapting
  exactly the modules our adapter file lists (``modules_to_save=["classifier"]``): the PEFT
  adapter directory (PEFT also writes a ``README.md`` model card).

Run: ``python -m experiments.bench.memory [--steps N] [--quick] [--out DIR]``
(``--worker VARIANT`` is the internal per-variant entry point).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
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

NAME = "memory"
RANK, ALPHA, LR = 8, 16, 1e-3
VARIANTS = ("lora_lightning_d0.0", "peft_d0.0", "lora_lightning_d0.1", "peft_d0.1", "full_finetune")
QUICK_VARIANTS = ("lora_lightning_d0.1", "peft_d0.1", "full_finetune")
DEFAULT_STEPS = 5
MIB = 1024**2
VARIANT_NOTES = {
    "lora_lightning_d0.0": "ours, LoRA dropout 0.0",
    "peft_d0.0": "PEFT, LoRA dropout 0.0",
    "lora_lightning_d0.1": "ours, dropout 0.1 (q/k/v fused: one shared mask)",
    "peft_d0.1": "PEFT, dropout 0.1 (one mask per module)",
    "full_finetune": "full fine-tuning",
}


# ------------------------------------------------------------------------------ worker side
def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); True if done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def worker(variant: str, batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Train ``variant`` for ``steps`` steps in this process; return its memory record."""
    from experiments.bench.models import load_model, random_batch

    model = load_model("minilm", num_labels=2)
    if variant.startswith("lora_lightning"):
        from lora_lightning import LoRAConfig, inject_lora

        dropout = float(variant.rsplit("_d", 1)[1])
        inject_lora(
            model,
            LoRAConfig(
                r=RANK,
                alpha=ALPHA,
                dropout=dropout,
                target_modules=[r".*\.(query|key|value)"],
                modules_to_save=[],
            ),
        )
    elif variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        dropout = float(variant.rsplit("_d", 1)[1])
        model = get_peft_model(
            model,
            LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                lora_dropout=dropout,
                target_modules=["query", "key", "value"],
            ),
        )
    elif variant != "full_finetune":
        raise SystemExit(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    data = random_batch(model, batch, seq_len)
    gc.collect()

    rss_after_load = _status_kib("VmRSS")
    peak_during_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak_rss()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = _status_kib("VmHWM")
    rss_end = _status_kib("VmRSS")
    optimizer_state = _tensor_bytes(
        value for state in optimizer.state.values() for value in state.values()
    )
    kib = 1024
    return {
        "variant": variant,
        "steps": steps,
        "batch_size": batch,
        "seq_len": seq_len,
        "train_seconds": seconds,
        "losses": losses,
        "peak_reset_after_load": reset,
        "rss_after_load_bytes": rss_after_load * kib if rss_after_load is not None else None,
        "peak_rss_during_load_bytes": peak_during_load * kib,
        "peak_rss_bytes": peak * kib,
        "vm_hwm_bytes": hwm * kib if hwm is not None else None,
        "rss_after_training_bytes": rss_end * kib if rss_end is not None else None,
        "peak_increase_bytes": (peak - rss_after_load) * kib if rss_after_load else None,
        "parameter_bytes": _tensor_bytes(model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "trainable_parameter_bytes": _tensor_bytes(params),
        "optimizer_state_bytes": optimizer_state,
    }


#: glibc malloc settings of every memory worker (this benchmark's and ``llm_train_step``'s):
#: every block of 128 KiB or more is its own mapping, unmapped when freed, and freed heap is
#: trimmed above 128 KiB. Without them a process's RSS keeps what the allocator happened to
#: retain: measured 2026-12-04 on SmolLM2, PEFT and ours held the same live tensors after a step
#: (541 MiB, by ``gc``) while their RSS differed by 300 MiB, in either direction from one run to
#: the next. With them RSS follows what is allocated.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def allocator_text(env: dict[str, str]) -> str:
    """``env`` (:data:`ALLOCATOR_ENV` as a run recorded it) as the shell would set it."""
    return " ".join(f"{key}={value}" for key, value in env.items())


# ------------------------------------------------------------------------------ parent side
def run_worker(variant: str, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    """Run one variant in a fresh interpreter; return the JSON it prints last."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench.memory",
            "--worker",
            variant,
            "--batch",
            str(batch),
            "--seq-len",
            str(seq_len),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ],
        cwd=REPO_ROOT,
        env=os.environ | ALLOCATOR_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_bytes(directory: Path) -> dict[str, Any]:
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    return {"bytes": sum(files.values()), "files": files}


def checkpoint_breakdown(path: Path) -> dict[str, Any]:
    """File size plus the tensor bytes of the model state and the optimizer state in it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", {})
    optimizer_bytes = 0
    for opt in checkpoint.get("optimizer_states", []):
        for per_param in opt.get("state", {}).values():
            optimizer_bytes += _tensor_bytes(per_param.values())
    return {
        "bytes": path.stat().st_size,
        "state_dict_tensors": len(state),
        "state_dict_bytes": _tensor_bytes(state.values()),
        "optimizer_state_bytes": optimizer_bytes,
        "has_lora_metadata": "lora" in checkpoint,
    }


def lora_default_config() -> Any:
    """``conf/lora/default.yaml`` as a ``LoRAConfig`` (the Hydra ``defaults`` list dropped)."""
    import yaml

    from lora_lightning import LoRAConfig

    values = yaml.safe_load((REPO_ROOT / "conf" / "lora" / "default.yaml").read_text())
    values.pop("defaults", None)
    return LoRAConfig.from_dict(values)


class _RandomBatches(torch.utils.data.Dataset):
    def __init__(self, count: int, seq_len: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (count, seq_len), generator=generator)
        self.labels = torch.randint(0, 2, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def _fit_two_steps(root: Path, with_lora: bool, batch: int, seq_len: int) -> Any:
    """Two Lightning steps of TextClassifier with a ModelCheckpoint; return the callback used."""
    import logging

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lora_lightning import LoRACallback
    from lora_lightning.tasks.classifier import TextClassifier

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    seed_everything(0, verbose=False)
    module = TextClassifier(num_labels=2, warmup_ratio=0.0)
    loader = torch.utils.data.DataLoader(
        _RandomBatches(2 * batch, seq_len, module.model.config.vocab_size), batch_size=batch
    )
    lora = LoRACallback(lora_default_config(), adapter_dir=root / "adapter") if with_lora else None
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", filename="step{step}")
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[checkpoint] + ([lora] if lora is not None else []),
    )
    trainer.fit(module, train_dataloaders=loader)
    return checkpoint


def checkpoint_sizes(batch: int, seq_len: int) -> dict[str, Any]:
    """Train with and without LoRACallback, save a PEFT adapter; measure every file."""
    from peft import LoraConfig, get_peft_model

    from experiments.bench.models import load_model

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        root = Path(tmp)
        ours_ckpt = _fit_two_steps(root / "lora", True, batch, seq_len).best_model_path
        full_ckpt = _fit_two_steps(root / "full", False, batch, seq_len).best_model_path
        config = lora_default_config()
        # PEFT adapts exactly the modules ours adapted: the names our adapter file lists.
        ours_adapter = json.loads((root / "lora" / "adapter" / "adapter_config.json").read_text())
        peft_model = get_peft_model(
            load_model("minilm", num_labels=2),
            LoraConfig(
                r=config.r,
                lora_alpha=config.alpha,
                lora_dropout=config.dropout,
                target_modules=ours_adapter["target_modules"],
                modules_to_save=["classifier"],
            ),
        )
        peft_model.save_pretrained(root / "peft_adapter")
        result = {
            "lora_config": config.to_dict(),
            "lora_lightning_trimmed_ckpt": checkpoint_breakdown(Path(ours_ckpt)),
            "full_finetune_plain_ckpt": checkpoint_breakdown(Path(full_ckpt)),
            "lora_lightning_adapter_dir": dir_bytes(root / "lora" / "adapter"),
            "lora_lightning_adapter_beside_ckpt": dir_bytes(
                Path(ours_ckpt).with_name(Path(ours_ckpt).stem + "_adapter")
            ),
            "peft_adapter_dir": dir_bytes(root / "peft_adapter"),
        }
    peft_files = result["peft_adapter_dir"]["files"]
    ours_files = result["lora_lightning_adapter_dir"]["files"]
    result["ratios"] = {
        "lora_lightning_trimmed_ckpt/full_finetune_plain_ckpt": (
            result["lora_lightning_trimmed_ckpt"]["bytes"]
            / result["full_finetune_plain_ckpt"]["bytes"]
        ),
        "lora_lightning_adapter_dir/peft_adapter_dir": (
            result["lora_lightning_adapter_dir"]["bytes"] / result["peft_adapter_dir"]["bytes"]
        ),
        "lora_lightning_adapter_safetensors/peft_adapter_safetensors": (
            ours_files["adapter_model.safetensors"] / peft_files["adapter_model.safetensors"]
        ),
    }
    return result


def run(variants: Sequence[str], batch: int, seq_len: int, steps: int, threads: int) -> dict:
    runs = {v: run_worker(v, batch, seq_len, steps, threads) for v in variants}

    def increase(v: str) -> int:
        return runs[v]["peak_increase_bytes"]

    ratios = {}
    for d in ("0.0", "0.1"):
        ours, peft = f"lora_lightning_d{d}", f"peft_d{d}"
        if ours in runs and peft in runs:
            ratios[f"{ours}/{peft}"] = increase(ours) / increase(peft)
        if ours in runs and "full_finetune" in runs:
            ratios[f"{ours}/full_finetune"] = increase(ours) / increase("full_finetune")
        if peft in runs and "full_finetune" in runs:
            ratios[f"{peft}/full_finetune"] = increase(peft) / increase("full_finetune")
    return {
        "setup": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, num_labels=2)",
            "batch_size": batch,
            "seq_len": seq_len,
            "steps": steps,
            "r": RANK,
            "alpha": ALPHA,
            "targets": ["query", "key", "value"],
            "optimizer": f"AdamW(lr={LR}) over trainable parameters",
            "measure": "peak RSS during training (ru_maxrss after resetting the peak mark once "
            "loaded) minus RSS after load; each variant in its own process, glibc malloc "
            "returning freed blocks (allocator_env)",
            "allocator_env": ALLOCATOR_ENV,
        },
        "peak_memory": runs,
        "peak_increase_ratios": ratios,
    }


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


def _size(value: int) -> str:
    return f"{value / MIB:.2f} MiB ({value:,} B)" if value >= MIB else f"{value:,} B"


def render(result: dict[str, Any]) -> str:
    setup, runs = result["setup"], result["peak_memory"]
    rows = [
        [
            f"`{name}`",
            VARIANT_NOTES[name],
            f"**{_mib(r['peak_increase_bytes'])}**",
            _mib(r["rss_after_load_bytes"]),
            _mib(r["peak_rss_bytes"]),
            f"{r['trainable_parameters']:,}",
            _mib(r["optimizer_state_bytes"]),
            f"{r['train_seconds']:.1f} s",
        ]
        for name, r in runs.items()
    ]
    not_reset = [name for name, r in runs.items() if not r["peak_reset_after_load"]]
    lines = [
        "# Memory benchmark: peak training memory and checkpoint sizes",
        "",
        "## Machine",
        "",
        *machine_lines(result["machine"]),
        "",
        "## Peak memory of a short training run",
        "",
        f"{setup['model']}, batch {setup['batch_size']} x {setup['seq_len']} tokens, "
        f"{setup['steps']} steps, LoRA r={setup['r']} alpha={setup['alpha']} on "
        f"query/key/value, {setup['optimizer']}. Each variant runs in its own fresh process; "
        "**peak increase** = peak RSS while training minus RSS once model, adapters, "
        "optimizer and batch are loaded (the peak mark is reset after loading)."
        + (
            f" glibc malloc returns freed blocks ({allocator_text(setup['allocator_env'])}), so "
            "RSS follows what is allocated."
            if "allocator_env" in setup  # runs before 2026-12-04 did not set it
            else ""
        ),
        "",
        markdown_table(
            [
                "variant",
                "what",
                "peak increase",
                "RSS after load",
                "peak RSS",
                "trainable",
                "optimizer state",
                "time",
            ],
            rows,
        ),
        "",
        markdown_table(
            ["ratio of peak increases", "value"],
            [[f"`{k}`", f"{v:.3f}"] for k, v in result["peak_increase_ratios"].items()],
        ),
        "",
    ]
    if not_reset:
        lines += [
            f"The peak mark could not be reset in {not_reset}: their peak includes loading.",
            "",
        ]
    ck = result["checkpoints"]
    ours, full = ck["lora_lightning_trimmed_ckpt"], ck["full_finetune_plain_ckpt"]
    adapter, peft = ck["lora_lightning_adapter_dir"], ck["peft_adapter_dir"]
    cfg = ck["lora_config"]
    lines += [
        "## Checkpoint bytes",
        "",
        f"Lightning, `TextClassifier` (MiniLM), 2 steps, `ModelCheckpoint`. LoRA config "
        f"(`conf/lora/default.yaml`): r={cfg['r']}, alpha={cfg['alpha']}, dropout "
        f"{cfg['dropout']}, targets {cfg['target_modules']}, modules_to_save "
        f"{cfg['modules_to_save']}; PEFT with the same settings on exactly the modules our "
        "adapter file lists (`modules_to_save=['classifier']`).",
        "",
        markdown_table(
            ["file", "bytes", "model tensors", "optimizer state"],
            [
                [
                    "our trimmed Lightning `.ckpt` (LoRACallback)",
                    _size(ours["bytes"]),
                    f"{ours['state_dict_tensors']} tensors, {_size(ours['state_dict_bytes'])}",
                    _size(ours["optimizer_state_bytes"]),
                ],
                [
                    "plain full Lightning `.ckpt` (full fine-tuning)",
                    _size(full["bytes"]),
                    f"{full['state_dict_tensors']} tensors, {_size(full['state_dict_bytes'])}",
                    _size(full["optimizer_state_bytes"]),
                ],
                [
                    "our exported adapter directory",
                    _size(adapter["bytes"]),
                    ", ".join(f"{k}: {v:,} B" for k, v in adapter["files"].items()),
                    "",
                ],
                [
                    "PEFT `save_pretrained` adapter directory",
                    _size(peft["bytes"]),
                    ", ".join(f"{k}: {v:,} B" for k, v in peft["files"].items()),
                    "",
                ],
            ],
        ),
        "",
        markdown_table(
            ["ratio", "value"],
            [[f"`{k}`", f"{v:.4f}"] for k, v in ck["ratios"].items()],
        ),
        "",
        "The trimmed checkpoint keeps only the trainable tensors (adapters + classifier head), "
        "their optimizer state and the LoRA metadata; the full checkpoint holds every weight "
        "and AdamW's two moments for each. The adapter directories differ mainly by PEFT's "
        "README.md model card.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write ``memory.json``/``.md``; return the result."""
    parser = base_parser(__doc__.splitlines()[0], 1)
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default 64)")
    parser.add_argument("--worker", default=None, help="internal: run one variant, print JSON")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    batch = args.batch or (2 if args.quick else 32)
    seq_len = args.seq_len or (8 if args.quick else 64)
    steps = args.steps or (2 if args.quick else DEFAULT_STEPS)
    if args.worker:
        print(json.dumps(worker(args.worker, batch, seq_len, steps)))
        return {}
    machine = machine_info()
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    result = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        **run(variants, batch, seq_len, steps, args.threads),
        "checkpoints": checkpoint_sizes(batch=min(batch, 8), seq_len=min(seq_len, 32)),
    }
    paths = write_results(args.out, NAME, result, render(result))
    print(render(result))
    print("\nwrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
