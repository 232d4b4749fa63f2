"""Hot-swapping: new values for an existing named adapter, in the same parameters.

Owns: :func:`hotswap_adapter` and what a file may differ in from the installed adapter (a
smaller rank, a power-of-two scaling ratio) while the result stays exact. Must not import:
``core.combine``, ``core.mixed``, Lightning, Hydra, transformers.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lora_lightning.core import variants
from lora_lightning.core.bank import A_KEY, B_KEY, active_adapter, check_known, uncompiled
from lora_lightning.core.config import LoRAConfig
from lora_lightning.core.errors import AdapterFileError
from lora_lightning.core.loading import read_adapter
from lora_lightning.core.state import adapter_bank, config_of, lora_state_dict
from lora_lightning.core.switch import check_switchable


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str) -> None:
    """Load the values of the adapter in ``directory`` into the existing adapter ``name``, in
    place: no re-injection, the same ``Parameter`` objects, so a ``torch.compile``'d model
    does not recompile.

    The file is checked in full against its own plan, then against the installed layout:
    the same adapted modules, ``modules_to_save`` and trained biases, dtypes and shapes, the
    same variant flags (``use_dora``) and ``bias``. Two differences are absorbed because the result is exact:

    - a smaller rank: ``A`` is zero-padded to the installed rows and ``B`` to its columns
      (``[B, 0] [A; 0] = B A``);
    - another scaling (alpha, rank or rsLoRA): the ratio ``k = s_file / s_installed`` is
      folded into ``B`` only when ``k`` is a power of two (multiplying by it is exact, and
      checked to be); any other ratio is refused, since ``k·B`` would be rounded.

    PEFT's ``hotswap_adapter`` instead pads ranks and turns the scalings into tensors after
    ``prepare_model_for_compiled_hotswap``; here the scaling stays a Python float of the
    layer, so a scaling change that is not exact in ``B`` is refused. The adapter keeps its
    installed config (ranks, alphas, dropout): saving it writes the installed layout with the
    new values, which computes the file's adapter.

    Raises:
        LoRAStateError: an unknown name; hot-swapping the active adapter of a merged model or
            an unconverted PiSSA/OLoRA one.
        AdapterFileError: the file does not load (as ``load_adapter``) or does not fit the
            installed adapter; every mismatch is listed with the installed and the file's
            shape. The model is then unchanged.
    """
    model = uncompiled(model)
    check_known(model, name, "hotswap_adapter")
    active = name == active_adapter(model)
    if active:
        check_switchable(model, "hotswap_adapter")
        config, slot = config_of(model), lora_state_dict(model)
    else:
        stored = adapter_bank(model).stored[name]
        config, slot = stored.config, stored.tensors
    checked = read_adapter(model, directory, alongside=True)
    values = _fit_to_slot(checked.config, checked.tensors, config, slot, directory, name)
    with torch.no_grad():
        for key, value in values.items():
            slot[key].copy_(value)


def _fit_to_slot(
    file_config: LoRAConfig,
    found: dict[str, torch.Tensor],
    config: LoRAConfig,
    slot: dict[str, torch.Tensor],
    directory: str | os.PathLike[str],
    name: str,
) -> dict[str, torch.Tensor]:
    """The file's values in the installed adapter's layout (zero-padded ranks, a power-of-two
    scaling ratio folded into B), or every reason they cannot be, raised at once."""
    problems = [
        f"missing {n} (the installed adapter has it)" for n in sorted(set(slot) - set(found))
    ]
    problems += [f"unexpected {n} (not in the installed adapter)" for n in sorted(set(found) - set(slot))]  # fmt: skip
    for field in (*variants.config_fields(), "bias"):
        if getattr(file_config, field) != getattr(config, field):
            problems.append(
                f"{field} differs (installed {getattr(config, field)!r}, file "
                f"{getattr(file_config, field)!r})"
            )
    values = {}
    for key in sorted(set(slot) & set(found)):
        have, got = slot[key], found[key]
        if got.dtype != have.dtype:
            problems.append(f"{key}: dtype {got.dtype} in the file, installed {have.dtype}")
            continue
        dim = 0 if key.endswith(A_KEY) else 1 if key.endswith(B_KEY) else None
        padded = _padded(got, tuple(have.shape), dim)
        if padded is None:
            problems.append(
                f"{key}: shape {tuple(got.shape)} in the file, installed {tuple(have.shape)}"
                + (" (a rank can only grow into a larger slot, by zero padding)" if dim is not None else "")
            )  # fmt: skip
            continue
        values[key] = padded
    for key in [k for k in values if k.endswith(B_KEY)]:
        layer = key[: -len(B_KEY)]
        r_file, alpha_file = file_config.rank_for(layer), file_config.alpha_for(layer)
        r_slot, alpha_slot = config.rank_for(layer), config.alpha_for(layer)
        s_file = file_config.scaling(r_file, alpha_file)
        s_slot = config.scaling(r_slot, alpha_slot)
        if s_file == s_slot:
            continue
        ratio = s_file / s_slot
        folded = values[key] * ratio
        exact = (
            math.frexp(ratio)[0] == 0.5
            and ratio * s_slot == s_file
            and bool(torch.isfinite(folded).all())
            and torch.equal(folded / ratio, values[key])
        )
        if not exact:
            problems.append(
                f"{layer}: scaling {s_file:g} in the file (r={r_file}, alpha={alpha_file:g}), "
                f"installed {s_slot:g} (r={r_slot}, alpha={alpha_slot:g}); their ratio {ratio:g} "
                "is not a power of two, so folding it into lora_B would round the values"
            )
            continue
        values[key] = folded
    if problems:
        listed = "\n  ".join(problems[:10])
        raise AdapterFileError(
            f"hotswap_adapter: adapter {directory} does not fit the installed adapter {name!r} "
            f"({len(problems)} problem(s); nothing was changed):\n  {listed}\nHot-swapping keeps "
            "the installed parameters, so it needs the same modules, dtypes and shapes (a "
            "smaller rank is zero-padded); load it under a new name instead "
            "(load_adapter(model, directory, name=...))"
        )
    return values


def _padded(tensor: torch.Tensor, shape: tuple[int, ...], dim: int | None) -> torch.Tensor | None:
    """``tensor`` zero-padded along ``dim`` to ``shape``; None if it does not fit."""
    if tuple(tensor.shape) == shape:
        return tensor
    if dim is None or tensor.dim() != len(shape) or tensor.shape[dim] > shape[dim]:
        return None
    if any(tensor.shape[d] != shape[d] for d in range(len(shape)) if d != dim):
        return None
    out = torch.zeros(shape, dtype=tensor.dtype)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out
