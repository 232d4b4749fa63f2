"""SST-2 quality: LoRA at r = 1..16, full fine-tuning and PEFT LoRA r=8, on one budget.

    python -m experiments.sst2_quality.run            # the default job's budget (~40 min, 2 CPUs)
    python -m experiments.sst2_quality.run --quick    # a smoke run (tiny budget, numbers meaningless)

Every variant trains the pretrained MiniLM-L6 on the same SST-2 training subset, seed, batch
size, schedule and number of steps as ``python train.py`` and is scored on the SST-2 dev set.
LoRA runs go through ``train.py -m`` (a Hydra multirun), full fine-tuning through
``train.py '~lora'`` (with a learning rate suited to full fine-tuning), PEFT through
``peft_baseline.py``. Writes ``results.md``, ``results.csv``, ``results.json`` and
``accuracy_vs_params.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.study import machine, write_rows

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RANKS = (1, 2, 4, 8, 16)
#: Full fine-tuning of all 22.7M weights needs a far smaller learning rate than LoRA's 2e-3.
FULL_FT_LR = 5e-5
QUICK = ["data.train_limit=64", "data.val_limit=32", "trainer.max_steps=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget for a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--runs", type=Path, help="where the jobs write (default: OUT/runs)")
    args = parser.parse_args()
    out: Path = args.out
    runs = args.runs or out / "runs"
    common = ["logger=csv", "data.val_limit=null", *(QUICK if args.quick else [])]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")

    def job(command: list[str]) -> None:
        print("+", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True)

    ranks = ",".join(map(str, RANKS))
    job([sys.executable, "train.py", "-m", f"lora.r={ranks}", *common,
         f"hydra.sweep.dir={runs / 'lora'}"])  # fmt: skip
    job([sys.executable, "train.py", "~lora", f"model.lr={FULL_FT_LR}", *common,
         f"hydra.run.dir={runs / 'full'}"])  # fmt: skip
    job([sys.executable, "-m", "experiments.sst2_quality.peft_baseline", "~lora", *common,
         f"hydra.run.dir={runs / 'peft'}"])  # fmt: skip

    rows = [_row(f"lora_lightning r={r}", runs / "lora" / str(i)) for i, r in enumerate(RANKS)]
    rows.append(_row("full fine-tuning", runs / "full"))
    rows.append(_row("PEFT LoRA r=8", runs / "peft", peft_dir=runs / "peft"))
    write_reports(rows, out, quick=args.quick)


def _row(method: str, run_dir: Path, peft_dir: Path | None = None) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    params = results["parameters"]
    saved = results["adapter_bytes"]
    if saved is None and peft_dir is None:  # full fine-tuning: the whole model's weights
        saved = 4 * params["total"]
    if peft_dir is not None:
        saved = _peft_adapter_bytes(run_dir)
    return {
        "method": method,
        "dev_acc": round(results["metrics"]["test/acc"], 4),
        "dev_f1": round(results["metrics"]["test/f1"], 4),
        "trainable_params": params["trainable"],
        "trainable_percent": round(params["trainable_percent"], 3),
        "wall_time_s": results["wall_time_s"],
        "saved_bytes": saved,
    }


def _peft_adapter_bytes(run_dir: Path) -> int:
    """Bytes of the adapter PEFT saves for this run (saved from the best checkpoint's tensors)."""
    import torch

    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    trainable = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
    return sum(v.numel() * v.element_size() for v in trainable.values())


def write_reports(rows: list[dict], out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine_info = machine(quick)
    write_rows(rows, machine_info, out)
    header = "| method | dev acc | dev F1 | trainable params | trainable % | wall time | saved |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['dev_acc']:.4f} | {row['dev_f1']:.4f} | "
            f"{row['trainable_params']:,} | {row['trainable_percent']:.3f} | "
            f"{row['wall_time_s']:.0f} s | {_size(row['saved_bytes'])} |"
        )
    (out / "results.md").write_text(
        f"# SST-2 quality ({'QUICK SMOKE RUN, not meaningful' if quick else 'default budget'})\n\n"
        f"Machine: {machine_info['cpu']}, {machine_info['cores']} cores, "
        f"{machine_info['date_utc']}.\n\n" + "\n".join(lines) + "\n"
    )
    _plot(rows, out / "accuracy_vs_params.png")
    print((out / "results.md").read_text())


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lora = [r for r in rows if r["method"].startswith("lora_lightning")]
    ax.plot([r["trainable_params"] for r in lora], [r["dev_acc"] for r in lora], "o-",
            label="lora_lightning (r = 1..16)")  # fmt: skip
    for r in lora:
        ax.annotate(r["method"].split()[-1], (r["trainable_params"], r["dev_acc"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)  # fmt: skip
    for r, marker in zip(rows[len(lora) :], ("s", "^"), strict=True):
        ax.plot(r["trainable_params"], r["dev_acc"], marker, markersize=9, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("MiniLM-L6 on SST-2: accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    main()
