"""Tiny LightningModules and data for the LoRACallback tests (CPU, seconds per fit).

``MLPModule`` wraps the seeded :class:`models.MLP` (``net.layers.0/1/2``) and builds its
optimizers in one of the ``configure_optimizers`` return forms listed in ``OPTIMIZER_FORMS``;
``BertModule`` holds a tiny Hugging Face BERT as ``self.model``. Everything is deterministic:
same seed, same weights, same batches (no shuffling, no dropout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from models import VOCAB, mlp, tiny_bert
from torch.utils.data import DataLoader, TensorDataset

# Adapt the first two layers of the MLP; ``net.layers.2`` stays a plain (frozen) Linear.
MLP_TARGETS = [r"net\.layers\.[01]"]
FEATURES = 6
CLASSES = 4


def mlp_dataset(n: int = 16, seed: int = 0) -> TensorDataset:
    """``n`` random samples ``(x [6], label in 0..3)``, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    return TensorDataset(x, y)


def token_dataset(n: int = 8, length: int = 8, seed: int = 0, classes: int = 3) -> TensorDataset:
    """``n`` random token sequences with labels, for :class:`BertModule`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(ids, y)


# ---------------------------------------------------------------- configure_optimizers forms
def _single(m: pl.LightningModule) -> Any:
    return torch.optim.SGD(m.parameters(), lr=m.lr)


def _adamw(m: pl.LightningModule) -> Any:
    return torch.optim.AdamW(m.parameters(), lr=m.lr)


def _list(m: pl.LightningModule) -> Any:
    return [torch.optim.Adam(m.parameters(), lr=m.lr)]


def _tuple(m: pl.LightningModule) -> Any:
    opt = torch.optim.SGD(m.parameters(), lr=m.lr)
    return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def _dict(m: pl.LightningModule) -> Any:
    opt = torch.optim.SGD(m.parameters(), lr=m.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _groups(m: pl.LightningModule) -> Any:
    """Two param groups, one per layer; the group for frozen ``net.layers.2`` ends up empty."""
    layers = m.net.layers
    opt = torch.optim.SGD(
        [
            {"params": list(layers[0].parameters()) + list(layers[1].parameters())},
            {"params": list(layers[2].parameters()), "lr": m.lr / 10},
        ],
        lr=m.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _adam_step_lr(m: pl.LightningModule) -> Any:
    """Adam + a per-step StepLR: optimizer and scheduler state both matter for a resume."""
    opt = torch.optim.Adam(m.parameters(), lr=m.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _frozen_only(m: pl.LightningModule) -> Any:
    """An optimizer over ``net.layers.2`` only, which LoRA freezes."""
    return torch.optim.SGD(m.net.layers[2].parameters(), lr=m.lr)


OPTIMIZER_FORMS: dict[str, Callable[[pl.LightningModule], Any]] = {
    "single": _single,
    "adamw": _adamw,
    "list": _list,
    "tuple": _tuple,
    "dict": _dict,
    "groups": _groups,
    "adam_step_lr": _adam_step_lr,
    "frozen_only": _frozen_only,
}


class MLPModule(pl.LightningModule):
    """Classifier over :func:`mlp_dataset` with a seeded MLP as ``self.net``.

    Records, when ``configure_optimizers`` runs, which parameters required grad then.
    """

    def __init__(
        self,
        seed: int = 0,
        optim: str = "adam_step_lr",
        lr: float = 0.05,
        n: int = 16,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.net = mlp(seed, sizes=(FEATURES, 10, 8, CLASSES)).train()
        self.optim = optim
        self.lr = lr
        self.n = n
        self.batch_size = batch_size
        self.requires_grad_at_configure: dict[str, bool] | None = None
        self.configured: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        # A metric that improves every epoch: ModelCheckpoint(save_top_k=1, mode="max")
        # then replaces (and deletes) the previous checkpoint each epoch.
        self.log("epoch_score", float(self.current_epoch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        self.requires_grad_at_configure = {
            name: p.requires_grad for name, p in self.named_parameters()
        }
        self.configured = OPTIMIZER_FORMS[self.optim](self)
        return self.configured

    def _loader(self) -> DataLoader:
        return DataLoader(mlp_dataset(self.n), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class ResumableLoader(DataLoader):
    """A DataLoader Lightning resumes mid-epoch (it has ``state_dict``/``load_state_dict``, as
    torchdata's ``StatefulDataLoader`` has): its next iteration skips the ``batches_done``
    batches of the interrupted epoch.

    Iteration starts at the first ``next``, not at ``iter``: a resumed run creates its
    iterator before Lightning sets the sampler's epoch (a shuffled sampler would give the
    first epoch's order). Give it a ``generator``: the iterator's base seed is then not drawn
    from the global RNG, which a resumed run has restored by the time of that first ``next``.
    """

    batches_done = 0
    _skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done % len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["batches_done"]

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        yield from batches


class ResumableMLPModule(MLPModule):
    """MLPModule whose training loader resumes mid-epoch: the position in the data is the
    loader's, so a mid-epoch resume repeats the uninterrupted run's batches."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # Counted before the step's checkpoint callbacks run (they run before module hooks).
        self.trainer.train_dataloader.batches_done = batch_idx + 1
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return ResumableLoader(mlp_dataset(self.n), batch_size=self.batch_size, generator=generator)


class TwoOptimizerModule(MLPModule):
    """Manual optimization with two optimizers returned as a list of dicts.

    The first optimizer covers ``net.layers.0`` (with a StepLR), the second the rest of the
    network; each also sees that layer's frozen weight and bias.
    """

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__(seed=seed, lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt_a, opt_b = self.optimizers()
        loss = self._loss(batch)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        self.lr_schedulers().step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        layers = self.net.layers
        opt_a = torch.optim.SGD(layers[0].parameters(), lr=self.lr)
        rest = list(layers[1].parameters()) + list(layers[2].parameters())
        opt_b = torch.optim.Adam(rest, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
        self.configured = [
            {"optimizer": opt_a, "lr_scheduler": scheduler},
            {"optimizer": opt_b},
        ]
        return self.configured


class BertModule(pl.LightningModule):
    """Sequence classification with a tiny HF BERT held as ``self.model``."""

    def __init__(self, seed: int = 0, lr: float = 0.05, n: int = 8) -> None:
        super().__init__()
        self.model = tiny_bert(seed).train()
        self.lr = lr
        self.n = n

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_dataset(self.n), batch_size=4, shuffle=False)


class BertHeadModule(BertModule):
    """A tiny HF BERT as ``self.model`` plus a new head outside it (``self.head``)."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__(seed=seed, lr=lr)
        torch.manual_seed(seed + 100)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(ids))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y % 2)


class TiedHeadModule(MLPModule):
    """MLPModule plus ``self.alias``, a Linear whose weight *is* ``net.layers.2.weight``.

    The weight has two state-dict names, like the tied input embedding and LM head of many
    language models; training ``alias`` in full (``modules_to_save``) trains the shared tensor.
    """

    def __init__(self, seed: int = 0, optim: str = "adam_step_lr") -> None:
        super().__init__(seed=seed, optim=optim)
        self.alias = torch.nn.Linear(8, CLASSES)
        self.alias.weight = self.net.layers[2].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x
        for layer in self.net.layers[:2]:
            hidden = torch.relu(layer(hidden))
        return self.alias(hidden)


class RecordingLogger(Logger):
    """A Logger that keeps every ``log_hyperparams`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams_calls: list[dict[str, Any]] = []
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams_calls.append(dict(params) if isinstance(params, dict) else vars(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


def trainer(root: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; ``kwargs`` override the defaults."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def lora_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the module's LoRA state dict."""
    from lora_lightning import lora_state_dict

    return {k: v.detach().cpu().clone() for k, v in lora_state_dict(module).items()}
