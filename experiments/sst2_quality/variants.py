"""SST-2 quality of the LoRA variants, and LoRA against full fine-tuning on all of SST-2.

    python -m experiments.sst2_quality.variants                 # both studies (~2 h, 2 CPUs)
    python -m experiments.sst2_quality.variants --study variants   # default budget, ~25 min
    python -m experiments.sst2_quality.variants --study full       # all of SST-2, ~90 min
    python -m experiments.sst2_quality.variants --quick            # smoke run, meaningless numbers

``variants``: the default job (``python train.py``: 16,000 sentences, 500 steps, lr 2e-3) with
plain LoRA r=8 at training seeds 0, 1 and 2, then DoRA, LoRA+ (ratio 16), PiSSA and QLoRA (an
nf4-quantized base) at seed 0, each changed from the default by one override only.

``full``: the comparison the LoRA paper makes, on all 67,349 training sentences for one epoch
(``experiment=sst2_full trainer.max_epochs=1``): LoRA r=8 at seeds 0, 1, 2 against full
fine-tuning (``~lora``, lr 5e-5) at seed 0.

Each job writes ``results/runs/<study>/<name>/results.json``; a job whose ``results.json``
exists is not rerun, so a study can be resumed or extended. The report is rebuilt from every
finished job: ``results/variants.md``, ``results/full_data.md`` (with ``.json``), and the
variants are drawn into ``results/accuracy_vs_params.png`` next to the rank sweep of ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from experiments.sst2_quality.run import _size
from experiments.study import cpu_name

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUICK = ["data.train_limit=64", "data.val_limit=32", "trainer.max_steps=2"]
FULL_FT_LR = 5e-5
#: Dev accuracy below which a run is taken as failed in the plot (the majority class is 0.509).
CHANCE_PLUS = 0.7

#: name -> overrides of the default job (one change each, plus the seed).
VARIANTS: dict[str, list[str]] = {
    "lora seed 0": ["seed=0"],
    "lora seed 1": ["seed=1"],
    "lora seed 2": ["seed=2"],
    "dora": ["seed=0", "lora.use_dora=true"],
    "lora+ ratio 16": ["seed=0", "lora.loraplus_lr_ratio=16"],
    # At the default lr 2e-3 LoRA+'s B learns at 3.2e-2; one lower lr (B at 4e-3), untuned.
    "lora+ ratio 16, lr 2.5e-4": ["seed=0", "lora.loraplus_lr_ratio=16", "model.lr=2.5e-4"],
    "pissa": ["seed=0", "lora.init=pissa"],
    # PiSSA's adapters start as W's principal part: PEFT advises LoRA dropout 0 with it, and
    # its paper trains at far lower learning rates. One such setting, untuned.
    "pissa, dropout 0, lr 2e-4": ["seed=0", "lora.init=pissa", "lora.dropout=0", "model.lr=2e-4"],
    "lora nf4 base": ["seed=0", "lora.quantize_base=nf4"],
}
FULL: dict[str, list[str]] = {
    "lora r=8 seed 0": ["seed=0"],
    "lora r=8 seed 1": ["seed=1"],
    "lora r=8 seed 2": ["seed=2"],
    "full fine-tuning seed 0": ["seed=0", "~lora", f"model.lr={FULL_FT_LR}"],
}
FULL_COMMON = ["experiment=sst2_full", "trainer.max_epochs=1", "data.num_workers=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=("variants", "full", "both"), default="both")
    parser.add_argument("--only", nargs="*", help="run only these job names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny budget for a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="rebuild reports, run nothing")
    args = parser.parse_args()
    runs = args.out / "runs"
    quick = QUICK if args.quick else []
    studies = ("variants", "full") if args.study == "both" else (args.study,)
    for study in studies:
        jobs, common = (VARIANTS, []) if study == "variants" else (FULL, FULL_COMMON)
        for name, overrides in jobs.items():
            if args.report_only or (args.only and name not in args.only):
                continue
            run_dir = runs / study / _folder(name)
            if (run_dir / "results.json").exists():
                print(f"= {name}: done ({run_dir})", flush=True)
                continue
            command = [sys.executable, "train.py", *common, *overrides, "logger=csv",
                       "data.val_limit=null", *quick, f"hydra.run.dir={run_dir}"]  # fmt: skip
            print("+", " ".join(command), flush=True)
            env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
            subprocess.run(command, cwd=ROOT, env=env, check=True)
        report(study, jobs, runs / study, args.out)


def _folder(name: str) -> str:
    """The job folder of ``name``: ``lora+ ratio 16, lr 2.5e-4`` -> ``loraplus_ratio_16_lr_2.5e-4``."""
    return name.replace(",", "").replace(" ", "_").replace("+", "plus").replace("=", "")


def _row(name: str, run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    params = results["parameters"]
    return {
        "name": name,
        "dev_acc": round(results["metrics"]["test/acc"], 4),
        "dev_f1": round(results["metrics"]["test/f1"], 4),
        "trainable_params": params["trainable"],
        "wall_time_s": results["wall_time_s"],
        "saved_bytes": results["adapter_bytes"] or 4 * params["total"],
        "overrides": results["overrides"],
    }


def report(study: str, jobs: dict[str, list[str]], runs: Path, out: Path) -> None:
    rows = []
    for name in jobs:
        row = _row(name, runs / _folder(name))
        if row is not None:
            rows.append(row)
    if not rows:
        return
    lora = [r["dev_acc"] for r in rows if r["name"].startswith(("lora seed", "lora r=8 seed"))]
    summary = {"lora_mean": round(statistics.mean(lora), 4) if lora else None,
               "lora_stdev": round(statistics.stdev(lora), 4) if len(lora) > 1 else None,
               "lora_seeds": len(lora)}  # fmt: skip
    lines = ["| job | dev acc | dev F1 | trainable params | saved | wall time | overrides |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['dev_acc']:.4f} | {r['dev_f1']:.4f} | "
            f"{r['trainable_params']:,} | {_size(r['saved_bytes'])} | {r['wall_time_s']:.0f} s | "
            f"`{' '.join(o for o in r['overrides'] if not o.startswith('hydra.'))}` |"
        )
    if summary["lora_mean"] is not None:
        spread = f" ± {summary['lora_stdev']:.4f} (sample sd)" if summary["lora_stdev"] else ""
        lines.append(f"\nPlain LoRA mean over {summary['lora_seeds']} seeds: "
                     f"{summary['lora_mean']:.4f}{spread}.")  # fmt: skip
    nf4 = [r for r in rows if "nf4" in r["name"]]
    if nf4 and summary["lora_mean"] is not None:
        gap = 100 * (summary["lora_mean"] - nf4[0]["dev_acc"])
        summary["nf4_gap_points"] = round(gap, 2)
        summary["nf4_goal_met"] = abs(gap) <= 1.0
        verdict = "met" if abs(gap) <= 1.0 else "NOT met"
        lines.append(f"Float32-base LoRA mean minus nf4-base LoRA: {gap:+.2f} points; the goal "
                     f"(within 1 point) is {verdict}.")  # fmt: skip
    if study == "full":
        full = [r for r in rows if r["name"].startswith("full")]
        if full and summary["lora_mean"] is not None:
            gap = 100 * (full[0]["dev_acc"] - summary["lora_mean"])
            summary["gap_points"] = round(gap, 2)
            summary["goal_met"] = gap <= 0.5
            verdict = "met" if gap <= 0.5 else "NOT met"
            lines.append(f"Full fine-tuning minus mean LoRA: {gap:+.2f} points; the goal "
                         f"(LoRA within 0.5 points) is {verdict}.")  # fmt: skip
    machine = {"cpu": cpu_name(), "cores": os.cpu_count()}
    name = "variants" if study == "variants" else "full_data"
    (out / f"{name}.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "summary": summary}, indent=2)
    )
    (out / f"{name}.md").write_text(
        f"# SST-2 {'variants, default budget' if study == 'variants' else 'all data, one epoch'}"
        f"\n\nMachine: {machine['cpu']}, {machine['cores']} cores.\n\n" + "\n".join(lines) + "\n"
    )
    print((out / f"{name}.md").read_text(), flush=True)
    if study == "variants":
        _plot(rows, out)


def _plot(variants: list[dict], out: Path) -> None:
    """Redraw ``accuracy_vs_params.png``: run.py's rank sweep plus the variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = json.loads((out / "results.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    lora = [r for r in sweep if r["method"].startswith("lora_lightning")]
    ax.plot([r["trainable_params"] for r in lora], [r["dev_acc"] for r in lora], "o-",
            color="tab:blue", label="LoRA r = 1..16 (run.py, 2026-11-23)")  # fmt: skip
    for r in lora:
        ax.annotate(r["method"].split()[-1], (r["trainable_params"], r["dev_acc"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)  # fmt: skip
    for r, marker in zip(sweep[len(lora) :], ("s", "^"), strict=False):
        ax.plot(r["trainable_params"], r["dev_acc"], marker, markersize=9, label=r["method"])
    seeds = [r for r in variants if r["name"].startswith("lora seed")]
    if seeds:
        ax.plot([r["trainable_params"] for r in seeds], [r["dev_acc"] for r in seeds], "x",
                color="tab:blue", markersize=8, label="LoRA r=8, seeds 0-2")  # fmt: skip
    others = [r for r in variants if r not in seeds]
    shown = [r for r in others if r["dev_acc"] >= CHANCE_PLUS]
    for r, marker in zip(shown, "DPv*h<>", strict=False):
        ax.plot(r["trainable_params"], r["dev_acc"], marker, markersize=8, label=r["name"])
    # A run at chance would squash the axis: name it below the plot instead.
    off = [f"{r['name']}: {r['dev_acc']:.3f}" for r in others if r["dev_acc"] < CHANCE_PLUS]
    if off:
        ax.set_ylim(bottom=min(r["dev_acc"] for r in sweep + shown + seeds) - 0.01)
        ax.text(0.01, 0.01, "not shown (failed): " + "; ".join(off), transform=ax.transAxes,
                fontsize=7, va="bottom")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("MiniLM-L6 on SST-2 (default budget)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=120)


if __name__ == "__main__":
    main()
