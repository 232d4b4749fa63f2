"""Whether loaded or to-be-written tensors fit the model: the rules, in one place.

Owns :func:`tensor_problems`, used by adapter files (``core.adapter``: saving and loading,
exact dtypes, no meta tensors) and by resumed checkpoints (``lightning.checkpoint``: a dtype
change is cast on load, meta tensors are accepted where the model is itself built on meta).
Each caller words the problems for its own error (the file or the checkpoint, what to do
next); which values are refused is decided here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

#: The rules, in the order they are checked (the first that fails names the problem).
NOT_TENSOR, META, SHAPE, DTYPE, NON_FINITE = "not_tensor", "meta", "shape", "dtype", "non_finite"


class TensorProblem(NamedTuple):
    """One tensor that does not fit: its ``name``, the ``rule`` it breaks (one of
    ``NOT_TENSOR``, ``META``, ``SHAPE``, ``DTYPE``, ``NON_FINITE``), what was ``found`` (the
    value itself for ``NOT_TENSOR``, else its shape or dtype; None for ``META`` and
    ``NON_FINITE``) and what the model ``expected`` (shape or dtype; None otherwise)."""

    name: str
    rule: str
    found: Any = None
    expected: Any = None


def tensor_problems(
    tensors: Mapping[str, Any],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    dtype_changes: bool = False,
    meta: bool = False,
) -> list[TensorProblem]:
    """How the values in ``tensors`` fail to fit ``expected`` (name -> (shape, dtype)), for
    every name in both (missing and extra names are the caller's: which names may be absent
    differs), in ``expected``'s order; empty when all fit.

    Rules: a tensor at all; not on the meta device (no values), unless ``meta``; the model's
    shape; the model's dtype, or with ``dtype_changes`` any floating or complex dtype for a
    floating model tensor (loading casts it), while integer or boolean values stay refused;
    no NaN or Inf (meta tensors have no values to check).
    """
    problems = []
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            continue
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            problems.append(TensorProblem(name, NOT_TENSOR, value))
        elif value.device.type == "meta" and not meta:
            problems.append(TensorProblem(name, META))
        elif tuple(value.shape) != tuple(shape):
            problems.append(TensorProblem(name, SHAPE, tuple(value.shape), tuple(shape)))
        elif not _dtype_fits(value.dtype, dtype, dtype_changes):
            problems.append(TensorProblem(name, DTYPE, value.dtype, dtype))
        elif value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            problems.append(TensorProblem(name, NON_FINITE))
    return problems


def _dtype_fits(found: torch.dtype, dtype: torch.dtype, changes: bool) -> bool:
    if not changes:
        return found == dtype
    return found.is_floating_point or found.is_complex or not dtype.is_floating_point


__all__ = ["TensorProblem", "tensor_problems"]
