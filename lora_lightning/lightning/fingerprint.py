"""The base-model fingerprint: a checksum of every frozen value, tying a checkpoint to its base.

Owns: :func:`base_fingerprint` (whose docstring defines the value, so that other tools can
compute it from their pieces) and the word checksums it is built from (:func:`word_checksums`).
``lightning.checkpoint`` stores the fingerprint in a checkpoint's LoRA entry and compares it on
resume. Must not import: Lightning (a plain function of a model), Hydra, ``app/``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lora_lightning.core import quantize, trainable_names
from lora_lightning.core.state import adapter_parameter_names
from lora_lightning.lightning.checkpoint import clean_name

# The fingerprint reads every tensor as 64-bit words in rows of _ROW words (512 KiB).
_ROW = 1 << 16
_BLOCK_ROWS = 64  # rows per step: the elementwise (non-CPU) path's temporary is 32 MiB


def base_fingerprint(model: nn.Module, *, shared: bool = False) -> str:
    """A hash of the frozen base: the clean name, shape and dtype of every frozen parameter
    and a checksum of every one of its values.

    The value, defined so that any split of the work gives the same one: sha256 over, for
    each frozen parameter in ``named_parameters`` order, the line ``name|shape|dtype`` (plus
    ``stored <scheme>`` for a quantized base), then the checksum of each of its storage
    tensors (the tensor itself, or a quantized base's codes and scales, each after its
    name). A checksum reads the tensor's raw bytes (row-major) as little-endian 64-bit words
    in rows of 65536 words (512 KiB) and takes per row ``sum(word[j] * (2j + 1))`` in
    wrapping int64 arithmetic (``j`` counted from the row's start), written as int64
    little-endian, after the 1-7 bytes that follow the last whole word, if any, as they are.

    Changing any one element changes its row's sum (the weight is odd, so invertible modulo
    2**64); wrapping integer sums do not depend on the order of the additions, so the hash
    is the same on every device, after a save and load, and from pieces: a shard holding the
    words ``[a, b)`` of a tensor (a dim-0 shard whose byte offset is a multiple of 8)
    computes its share of each row it touches, with ``j`` counted from that row's start, and
    the shares of a row add up (wrapping) to its sum; shards cut elsewhere, and the trailing
    1-7 bytes, need their bytes gathered first. Meta tensors contribute structure only.
    Parameters only: buffers (e.g. batch-norm statistics) may change while training.

    A base stored quantized (``quantize_base``) is hashed as stored: its scheme and every
    storage tensor (codes, block scales), which is what the run computes with. Quantizing is
    deterministic, so the same float base gives the same fingerprint on every rank and on
    resume; a change of the float base too small to move any stored code is not seen (and
    changes no output).

    A sharded (FSDP2) base is gathered one parameter at a time, so it hashes as the unsharded
    model does; every rank must call this then (a collective).

    Args:
        model: the adapted model (adapters and trainable tensors are left out).
        shared: with an initialised ``torch.distributed`` process group of several ranks,
            each rank checksums about ``1/world_size`` of the frozen bytes (whole tensors)
            and the ranks exchange their checksums (``all_gather_object``): a collective that
            every rank must call, each with the same model. Same value as without it; the
            cost on each rank shrinks with the number of ranks. Without a group of several
            ranks it is ignored.
    """
    frozen = _frozen_parameters(model)
    rank, world = _rank_and_world() if shared else (0, 1)
    owners = _owners([quantize.stored_bytes(param) for _, param in frozen], world)
    weights: dict[torch.device, torch.Tensor] = {}  # the row weights, made once per device
    sums: dict[int, bytes] = {}
    for i, (_, param) in enumerate(frozen):
        whole = _whole(param.detach())  # a collective for a sharded parameter: on every rank
        if owners[i] == rank:
            sums[i] = _value_checksum(whole, weights)
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, sums)
        sums = {i: part for shares in gathered for i, part in shares.items()}
    digest = hashlib.sha256(b"lora-lightning base fingerprint 2\n")
    for i, (name, param) in enumerate(frozen):
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}\n".encode())
        scheme = quantize.scheme_of(param)
        if scheme is not None:
            digest.update(f"stored {scheme}\n".encode())
        digest.update(sums[i])
    return digest.hexdigest()[:32]


def _frozen_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(clean name, parameter)`` of every frozen base parameter, in model order."""
    trainable = set(trainable_names(model)) | adapter_parameter_names(model)
    return [
        (clean_name(name), param)
        for name, param in model.named_parameters()
        if name not in trainable
    ]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 ``DTensor``) parameter gathered whole, so a sharded base hashes as
    the unsharded one; a collective, which every rank reaches in the same parameter order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _owners(sizes: list[int], world: int) -> list[int]:
    """The rank that checksums each tensor: the least loaded so far, largest tensors first
    (the same answer on every rank: it depends on the sizes only)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


def _value_checksum(param: torch.Tensor, weights: dict[torch.device, torch.Tensor]) -> bytes:
    """What the fingerprint takes from one parameter's values (see :func:`base_fingerprint`)."""
    if param.device.type == "meta" or not param.numel():
        return b""
    out: list[bytes] = []
    for part, tensor in quantize.storage(param.detach()):
        out.append(part.encode())
        if part:  # storage tensors may have odd strides (a 1-element stride-256 view)
            tensor = torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)
        _hash_values(out, tensor, weights)
    return b"".join(out)


def _hash_values(out: list[bytes], tensor: torch.Tensor, weights: dict) -> None:
    if tensor.is_quantized:
        out.append(f"{tensor.qscheme()}".encode())
        tensor = tensor.int_repr()
    data = tensor.reshape(-1).view(torch.uint8)  # copies only a non-contiguous tensor
    whole = data.numel() // 8 * 8
    if data.numel() > whole:  # the last 1-7 bytes
        out.append(data[whole:].cpu().numpy().tobytes())
    if not whole:
        return
    device = data.device
    if device not in weights:
        weights[device] = torch.arange(1, 2 * _ROW, 2, dtype=torch.int64, device=device)
    sums = word_checksums(_words(data[:whole]), weights[device])
    out.append(sums.cpu().numpy().tobytes())


def _words(data: torch.Tensor) -> torch.Tensor:
    try:
        return data.view(torch.int64)
    except RuntimeError:  # a view at a storage offset that is not a multiple of 8 bytes
        return data.clone().view(torch.int64)


def word_checksums(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """For each row of ``_ROW`` words of the 1-D int64 ``words`` (the last row may be
    shorter): ``sum(word[j] * weights[j])`` in wrapping int64, on ``words``' device."""
    n = words.numel()
    rows = -(-n // _ROW)
    out = torch.empty(rows, dtype=torch.int64, device=words.device)
    full = n // _ROW
    if full:
        matrix = words[: full * _ROW].view(full, _ROW)
        # CPU: one integer matrix-vector product, no temporary; elsewhere blocks of rows.
        step = full if words.device.type == "cpu" else _BLOCK_ROWS
        for start in range(0, full, step):
            stop = min(start + step, full)
            out[start:stop] = _weighted_rows(matrix[start:stop], weights)
    if n > full * _ROW:
        tail = words[full * _ROW :]
        out[full:] = _weighted_rows(tail.view(1, -1), weights[: tail.numel()])
    return out


def _weighted_rows(block: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if block.device.type == "cpu":
        return torch.mv(block, weights)  # one pass, no temporary (CPU has integer mv)
    return (block * weights).sum(1)
