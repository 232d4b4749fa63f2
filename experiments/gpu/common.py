"""What the steps of the GPU check share: the run context, the per-check recorder, numeric
helpers, the models built from configs and a small Lightning module.

Only the public API of ``lora_lightning`` is used (``from lora_lightning import ...``), and the
benchmark helpers of ``experiments/bench`` (interleaved timing, the MiniLM loader, random
batches) are reused rather than copied.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Step statuses. A step is ``passed`` when at least one check passed and none failed,
#: ``skipped`` when every check was skipped (each with its reason), ``failed`` when a check
#: failed or the step raised, ``timed_out`` when it overran its budget.
PASSED, FAILED, SKIPPED, TIMED_OUT = "passed", "failed", "skipped", "timed_out"
SEED = 0
#: LoRA settings every step uses unless it says otherwise (the bench's: r=8, alpha=16).
RANK, ALPHA = 8, 16
#: Relative error floors by the lowest precision a computation runs in (max |err| / max
#: |exact|): below them a result is accepted whatever plain autograd's own error is.
REL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
#: ...and above them ours may be at most this many times plain autograd's error.
REF_FACTOR = 4.0


class SkipCheck(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised inside a check to record it as skipped, with the message as the reason."""


@dataclass
class Context:
    """Everything a step needs to know about this run (sent to the worker as JSON)."""

    smoke: bool
    device: str  # "cuda" or "cpu"
    workdir: str  # scratch space (checkpoints, adapters): deleted after the run
    result_path: str  # where the worker writes its (partial) step record
    budget_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))

    def need_cuda(self, what: str) -> None:
        """Skip the current check unless this run is on CUDA."""
        if not self.cuda:
            raise SkipCheck(f"needs CUDA ({what}); this run is on {self.device}")


class Recorder:
    """Collects a step's checks; rewrites the step record after each one, so that a step
    killed at its time budget still reports what it finished."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.record: dict[str, Any] = {"name": name, "checks": [], "data": {}}
        self.started = time.perf_counter()
        self.flush()

    def flush(self) -> None:
        self.record["worker_wall_s"] = round(time.perf_counter() - self.started, 3)
        path = Path(self.ctx.result_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=_jsonable) + "\n")
        tmp.replace(path)

    @contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """Run one check: the body fills the yielded dict (numbers, ``summary``) and sets
        ``ok``; an exception is recorded as a failure with its traceback, :class:`SkipCheck`
        as a skip with its reason. Never raises (except KeyboardInterrupt/SystemExit)."""
        entry: dict[str, Any] = {"name": name, "status": "running"}
        self.record["checks"].append(entry)
        self.flush()
        print(f"[{self.record['name']}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            yield entry
        except SkipCheck as skip:
            entry["status"], entry["reason"] = SKIPPED, str(skip)
        except Exception as err:  # noqa: BLE001 - recorded, the next check still runs
            entry["status"] = FAILED
            entry["error"] = f"{type(err).__name__}: {err}"[:2000]
            entry["traceback"] = traceback.format_exc()
        else:
            ok = entry.pop("ok", None)
            if ok is None:
                entry["status"] = FAILED
                entry["error"] = "the check set no verdict (internal error of the check)"
            else:
                entry["status"] = PASSED if ok else FAILED
        entry["wall_s"] = round(time.perf_counter() - start, 3)
        print(f"[{self.record['name']}] {name}: {entry['status']} ({entry['wall_s']} s)"
              + (f" {entry.get('summary', '')}" if entry.get("summary") else "")
              + (f" -- {entry.get('reason') or entry.get('error')}"
                 if entry["status"] in (SKIPPED, FAILED) else ""), flush=True)  # fmt: skip
        if self.ctx.cuda:
            torch.cuda.empty_cache()
        self.flush()

    def skip(self, name: str, reason: str) -> None:
        """Record a check that is not run at all, with its reason."""
        with self.check(name):
            raise SkipCheck(reason)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return repr(value)


# ----------------------------------------------------------------------------------- numerics
def rel_err(value: torch.Tensor, exact: torch.Tensor) -> float:
    """``max |value - exact| / max |exact|``, computed in float64."""
    exact64 = exact.detach().double()
    scale = exact64.abs().max().item() or 1.0
    return (value.detach().double() - exact64).abs().max().item() / scale


def lowest_precision(*dtypes: torch.dtype | None) -> torch.dtype:
    """The least precise of the given floating dtypes (None entries ignored)."""
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    present = [d for d in dtypes if d is not None]
    return min(present, key=order.index)


def accept(err_ours: float, err_ref: float, dtype: torch.dtype) -> bool:
    """Ours is acceptable when within the dtype's floor or ``REF_FACTOR`` x plain autograd's
    own error against the float64 result."""
    return err_ours <= max(REL_FLOOR.get(dtype, 1e-12), REF_FACTOR * err_ref)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------- LoRA configs
#: Per model: PEFT's target_modules (names) and ours (one full-match regex), same modules.
TARGETS = {
    "minilm": (["query", "key", "value"], r".*\.(query|key|value)"),
    "llama_1b": (["q_proj", "k_proj", "v_proj", "o_proj"], r".*\.(q_proj|k_proj|v_proj|o_proj)"),
    # Every projection of a Llama block (attention and MLP): the causal-LM task's LoRA.
    "smollm2": (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    ),
}


def ours_config(key: str, dtype: str = "float32", dropout: float = 0.0, **extra: Any) -> Any:
    """Our LoRA (r=8, alpha=16) on the attention projections of ``key``; nothing else trains."""
    from lora_lightning import LoRAConfig

    return LoRAConfig(r=RANK, alpha=ALPHA, dropout=dropout, dtype=dtype,
                      target_modules=[TARGETS[key][1]], modules_to_save=[], **extra)  # fmt: skip


def peft_config(key: str, dropout: float = 0.0, **extra: Any) -> Any:
    """PEFT's ``LoraConfig`` for the same modules (no task type: the head stays frozen)."""
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                      target_modules=TARGETS[key][0], **extra)  # fmt: skip


def peft_adapter_name(name: str) -> str:
    """PEFT's in-memory name (inside ``get_base_model()``) of our adapter parameter ``name``:
    ``<path>.lora_A.weight`` -> ``<path>.lora_A.default.weight``."""
    path, part, leaf = name.rsplit(".", 2)
    return f"{path}.{part}.default.{leaf}"


def is_adapter_name(name: str) -> bool:
    """Whether ``name`` is one of our LoRA A/B parameters (not a DoRA magnitude)."""
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def copy_adapters_to_peft(ours: torch.nn.Module, peft_model: Any) -> int:
    """Give PEFT's ``default`` adapter our ``lora_A``/``lora_B`` values (cast to PEFT's
    dtype), so that both models compute the same function; returns how many tensors were
    copied. Raises ``KeyError`` when PEFT adapted another set of modules than ours."""
    inner = dict(peft_model.get_base_model().named_parameters())
    copied = 0
    with torch.no_grad():
        for name, value in ours.named_parameters():
            if is_adapter_name(name):
                inner[peft_adapter_name(name)].copy_(value)
                copied += 1
    return copied


# ------------------------------------------------------------------------------------ models
#: Llama-3.2-1B's shape (tied embeddings: 1.24B parameters) and a 2-layer stand-in for smoke
#: runs: (hidden, MLP, layers, heads, KV heads, vocabulary, positions).
LLAMA_SHAPES = {
    False: (2048, 8192, 16, 32, 8, 128256, 2048),
    True: (64, 128, 2, 4, 2, 1000, 256),
}


def llama_1b_config(tiny: bool) -> Any:
    """A Llama-3.2-1B-shaped config (16 layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192,
    vocab 128256, tied embeddings); ``tiny`` for smoke runs."""
    from transformers import LlamaConfig

    hidden, mlp, layers, heads, kv_heads, vocab, positions = LLAMA_SHAPES[tiny]
    return LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       vocab_size=vocab, max_position_embeddings=positions,
                       tie_word_embeddings=True)  # fmt: skip


def build_llama(device: str, dtype: torch.dtype, tiny: bool, causal_lm: bool) -> torch.nn.Module:
    """A Llama-1B-shaped model with seeded random weights, built directly on ``device`` in
    ``dtype`` (no float32 copy on the host): ``LlamaForCausalLM`` or the bare ``LlamaModel``."""
    from transformers import LlamaForCausalLM, LlamaModel

    config = llama_1b_config(tiny)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(SEED)
        with torch.device(device):
            model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def minilm(num_labels: int | None = 2, no_dropout: bool = False) -> torch.nn.Module:
    """The real all-MiniLM-L6-v2 (float32, on the CPU; the bench's loader), optionally with
    every dropout of the encoder set to 0 (for runs that must be reproducible)."""
    from transformers.utils import logging as hf_logging

    from experiments.bench.models import load_model

    hf_logging.disable_progress_bar()  # "Loading weights" bars in every log
    model = load_model("minilm", num_labels=num_labels)
    if no_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model.train()


def token_batches(
    vocab_size: int, count: int, batch: int, seq_len: int, device: str | None = None
) -> list[dict[str, torch.Tensor]]:
    """``count`` seeded random batches for a 2-way sequence classifier."""
    generator = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
        item = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=generator),
        }
        out.append({k: v.to(device) for k, v in item.items()} if device else item)
    return out


def batch_loader(batches: list[dict[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    """A DataLoader yielding exactly ``batches`` in order (one pre-built batch per item)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def lightning_classifier(model: torch.nn.Module, lr: float = 1e-3) -> Any:
    """A minimal LightningModule around a Hugging Face sequence classifier at ``.model``
    (so exported adapters map onto the Hugging Face names); it records every training loss.
    ``configure_optimizers`` hands all parameters to AdamW: the LoRA callback drops frozen
    ones, and without the callback only those requiring grad are passed."""
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach().float().item()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    return Classifier()


def quiet_trainer(ctx: Context, **kwargs: Any) -> Any:
    """A Lightning Trainer on the run's device with no logger, progress bar or summary."""
    import lightning.pytorch as pl

    options: dict[str, Any] = {
        "accelerator": "gpu" if ctx.cuda else "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": ctx.workdir,
    }
    options.update(kwargs)
    return pl.Trainer(**options)
