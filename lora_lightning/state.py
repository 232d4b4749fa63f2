"""What LoRA trains and saves: `lora_state_dict` and `count_parameters`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning.inject import adapted_modules, is_lora_parameter, trainable_names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a LoRA run produces, keyed as in ``model.state_dict()``.

    That is ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` of every adapted module, the
    parameters of ``modules_to_save``, and the biases that ``config.bias`` trains. Frozen base
    weights are never included. Tensors are detached and share storage with the model.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name].detach() for name in trainable_names(model)}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model (each shared parameter counted once)."""

    trainable: int
    total: int
    adapter: int
    adapted_modules: int

    @property
    def trainable_percent(self) -> float:
        """``100 * trainable / total`` (0 for an empty model)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count trainable, total and adapter (A/B) parameters; works on ``meta`` models too."""
    trainable = total = adapter = 0
    for name, param in model.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        adapter += param.numel() if is_lora_parameter(name) else 0
    return ParameterCounts(
        trainable=trainable,
        total=total,
        adapter=adapter,
        adapted_modules=sum(1 for _ in adapted_modules(model)),
    )
