"""A plain Lightning text classifier around a Hugging Face sequence-classification model.

It knows nothing about LoRA: the LoRA callback adapts `self.model` from the outside, and the
Hugging Face model sits at the attribute `model` so that module paths inside it
(`model.bert.encoder.layer.0.attention.self.query`) map onto the Hugging Face/PEFT names.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score

from lora_lightning.tasks.minilm import import_transformers, resolve_pretrained
from lora_lightning.tasks.schedule import WarmupDecaySchedule


class TextClassifier(LightningModule):
    """Fine-tunes `AutoModelForSequenceClassification` with cross-entropy and AdamW.

    Batches are dicts with `input_ids` and `attention_mask` of shape `(batch, seq)` and, for
    training/validation/test, `labels` of shape `(batch,)`. Logs `train/loss` per step and
    `val/loss`, `val/acc`, `val/f1` (and `test/...`) per epoch; F1 is macro-averaged.

    The learning rate warms up linearly from 0 over `warmup_ratio` of the run's optimizer steps
    (`trainer.estimated_stepping_batches`, read when training starts so that a resumed run's
    train loader is restored), then decays linearly to 0.

    Args:
        model_name_or_path: a model directory or Hub name; None means the bundled MiniLM.
            Loaded with `local_files_only=True` (no network) and kept in float32.
        num_labels: number of classes (a fresh classification head of this size is created when
            the checkpoint has none).
        lr: peak learning rate. weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the optimizer steps spent warming up, in [0, 1].
        gradient_checkpointing: recompute activations in the backward pass to save memory.

    Raises:
        ValueError: `num_labels < 2`, or `warmup_ratio` outside [0, 1].
        ModuleNotFoundError: `model_name_or_path` is None and the MiniLM package is missing.
        OSError: the model cannot be found locally (from transformers).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str] | None = None,
        num_labels: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"TextClassifier: num_labels must be at least 2, not {num_labels}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"TextClassifier: warmup_ratio must be in [0, 1], not {warmup_ratio}")
        self.save_hyperparameters()
        # The learning-rate schedule, whose length is read when training starts.
        self._schedule = WarmupDecaySchedule(self, warmup_ratio, "TextClassifier")
        transformers = import_transformers()
        # .float(): transformers 5 loads in the checkpoint's dtype by default; training and the
        # merge precision guarantees assume float32 whatever the checkpoint holds.
        # .train(): from_pretrained returns the model in eval mode, and Lightning (>= 2.2) keeps
        # each submodule's mode as it finds it, so without this dropout never runs in training.
        self.model = (
            transformers.AutoModelForSequenceClassification.from_pretrained(
                resolve_pretrained(model_name_or_path), num_labels=num_labels, local_files_only=True
            )
            .float()
            .train()
        )
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        metrics = MetricCollection(
            {
                "acc": Accuracy(task="multiclass", num_classes=num_labels),
                "f1": F1Score(task="multiclass", num_classes=num_labels, average="macro"),
            }
        )
        # One collection per stage: validation during fit must not mix with a later test run.
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, **batch: Tensor) -> Tensor:
        """Return logits of shape `(batch, num_labels)`; a `labels` entry is ignored."""
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        return self.model(**inputs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(**batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].size(0))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Return the predicted class of each example, shape `(batch,)`."""
        return self(**batch).argmax(dim=-1)

    def _evaluate(self, batch: dict[str, Tensor], stage: str, metrics: MetricCollection) -> None:
        labels = batch["labels"]
        logits = self(**batch)
        # sync_dist averages the loss over DDP ranks; the torchmetrics objects sync their own
        # states when computed, so they need no flag.
        self.log(
            f"{stage}/loss",
            F.cross_entropy(logits, labels),
            on_epoch=True,
            sync_dist=True,
            prog_bar=True,
            batch_size=labels.size(0),
        )
        metrics.update(logits.argmax(dim=-1), labels)
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=labels.size(0))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over `self.parameters()` with linear warmup and decay, stepped every batch.

        All parameters are passed on purpose: frozen ones get no gradient and AdamW skips them,
        so a callback that freezes the base model leaves only its trainable parameters updating.

        The run length is not read here but when training starts (:meth:`on_train_start`,
        see :class:`~lora_lightning.tasks.schedule.WarmupDecaySchedule`):
        `trainer.estimated_stepping_batches` builds the train loader when it does not exist
        yet, and a loader built before Lightning restores a checkpoint's loop state keeps
        its position at the start of the epoch: a resumed epoch would start over.

        Raises:
            ValueError: the trainer has no finite number of steps (`max_epochs=-1` and no
                `max_steps`), so the decay has no end.
        """
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._schedule.build(optimizer), "interval": "step"},
        }

    def on_train_start(self) -> None:
        """Read the run length (the train loader exists now, so nothing is rebuilt) and set
        the learning rates of the scheduler's current step from it.

        Raises:
            ValueError: the run has no finite number of steps (an iterable train set without
                `max_steps`).
        """
        self._schedule.start()


def enable_activation_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing: the reentrant variant drops gradients when the inputs of a
    # checkpointed block do not require grad, which is the case once the embeddings are frozen.
    # transformers 5 renamed the method (the old name warns); support both.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
