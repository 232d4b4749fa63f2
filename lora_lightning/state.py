"""What LoRA trains and saves: `lora_state_dict` and `count_parameters`."""

from __future__ import annotations

import hashlib
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


def base_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """A short hash of the frozen base: names, shapes, dtypes and a strided sample of values.

    Cheap enough to compute at every setup on a 7B model (``samples`` values per tensor), and
    enough to tell a checkpoint of another base (another model, size or pretrained weights)
    from this one. Meta tensors contribute structure only. Sums are rounded so the same
    weights on another device give the same hash.
    """
    digest = hashlib.sha256()
    trainable = set(trainable_names(model))
    for name, param in model.named_parameters():
        if name in trainable or is_lora_parameter(name):
            continue
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        if param.device.type != "meta" and param.numel() and param.is_floating_point():
            flat = param.detach().reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()
            values = flat[index.to(flat.device)].double()
            digest.update(f"|{values.sum().item():.6g}|{values.abs().sum().item():.6g}".encode())
    return digest.hexdigest()[:16]
