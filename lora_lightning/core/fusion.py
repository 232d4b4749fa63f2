"""Shared-input fusion: adapted siblings that read one input compute one ``A`` product.

Owns: :class:`SharedInput` groups and :func:`group_shared_inputs`, which forms them. Enabled
by ``LoRAConfig.group_shared_input``. Must not import: ``core.layers``/``core.inject`` (the
layer asks its group for its rows; the group asks the layer only for its ``lora_A``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_lightning.core import kernels
from lora_lightning.core.errors import LoRAStateError
from lora_lightning.core.state import active_dropout, layer_state

#: ``project(module, x, a) -> A dropout(x)``: the layer's own down-projection, given stacked A.
Project = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class SharedInput:
    """Adapted siblings that read the same input, e.g. an attention's query, key and value.

    The first member called with an input computes ``[A_q; A_k; A_v] dropout(x)`` as one
    matmul with one dropout mask; the others find their rows ready when called with the very
    same tensor (same object, same version). With dropout 0 this is the per-module maths
    regrouped; with dropout > 0 the siblings share a mask where PEFT draws one per module
    (``LoRAConfig.group_shared_input=False`` gives PEFT's behaviour). A member called with
    another input (cross-attention keys, say) recomputes, correctly but at the cost of a
    product of the whole stack; so the group learns which members really share an input from
    the first call of ``parent`` (the grouping is by parent and input size, which cannot see
    that a Llama attention's ``o_proj`` reads the attention output, not the hidden states):
    it computes as before and records each member's input, then, at that call's end, splits
    into groups of the members that read one tensor (members alone compute alone). The maths
    and the random draws are unchanged by the split (a dropout mask is drawn over the input,
    shared or not), so a run split at its first call and a resumed run that splits at its own
    first call stay the same.

    The rows are a copy of state, so they are dropped whenever what they were computed from
    may have changed: they are keyed on the input (object, version, storage) and on every
    member's ``lora_A`` (storage, version), and they never outlive one call of ``parent``
    (the module whose forward calls the members): its forward pre-hook and hook clear them. So
    an in-place edit that bumps no version counter (``x.data.copy_(...)``, an EMA swapping
    ``lora_A.data`` between steps) cannot be served rows of the old values across calls.
    """

    def __init__(
        self, members: list[nn.Module], parent: nn.Module | None = None, *, learnt: bool = False
    ) -> None:
        self.members = members
        self._parent = parent
        self._handles: list[Any] = []
        if parent is not None:
            self._handles = [
                parent.register_forward_pre_hook(self._scope_start),
                parent.register_forward_hook(self._scope_end, always_call=True),
            ]
        # Until the first call of ``parent`` ends: (member, input) of every member call.
        self._learning = parent is not None and not learnt
        self._seen: list[tuple[nn.Module, torch.Tensor]] = []
        self._tainted = False
        self._clear()

    # The parent's forward starts or ends: rows computed before are not served after. (Two
    # methods of fixed arity, not one ``*args`` hook: under torch.compile each call shape
    # would be a recompile of one function.)
    def _scope_start(self, module: nn.Module, args: Any) -> None:
        self._clear()

    def _scope_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._clear()
        if self._learning and self._tainted:
            # A call whose graph may be run again (non-reentrant activation checkpointing,
            # whose recompute must save tensors of the very same shapes; torch.compile's
            # tracing): the grouping must not change after it, so learn from a later call.
            self._seen, self._tainted = [], False
        elif self._learning and self._seen:
            self._split_by_input()

    def _split_by_input(self) -> None:
        """Regroup the members by the input each read in the first call of the parent."""
        seen, self._seen, self._learning = self._seen, [], False
        read: dict[int, list[int]] = {}  # member -> ids of its inputs (alive in ``seen``)
        for member, x in seen:
            read.setdefault(id(member), []).append(id(x))
        parts: dict[tuple[int, ...], list[nn.Module]] = {}
        for member in self.members:
            parts.setdefault(tuple(read.get(id(member), ())), []).append(member)
        if len(parts) == 1 and () not in parts:
            return  # they all read one input: the group stays
        parent = self._parent
        self.disband()
        for inputs, part in parts.items():
            if inputs and len(part) > 1:  # never called: alone, like a member read alone
                group = SharedInput(part, parent, learnt=True)
                for member in part:
                    layer_state(member).group = group

    def _index(self, module: nn.Module) -> int:
        """``module``'s place among the members (found by identity, so deep copies work)."""
        for index, member in enumerate(self.members):
            if member is module:
                return index
        raise LoRAStateError(f"{type(module).__name__} is not a member of this LoRA group")

    def _clear(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._pending: list[bool] = []  # per member: rows computed and not yet served
        self._unserved = 0

    def hidden(self, module: nn.Module, x: torch.Tensor, project: Project) -> torch.Tensor:
        """``A dropout(x)`` of ``module`` (``(..., r)``), from the group's one ``A`` product.

        With no dropout in effect, under ``torch.compile`` or without autograd, each member
        computes its own product: the same maths (no mask to share). Under compile there is
        then no rows cache, whose keys (storage addresses, version counters) dynamo cannot
        trace: it broke the graph at every adapted layer and recompiled in later steps. With
        dropout the group's shared mask is kept under compile too (correct, at the cost of
        those graph breaks). Without autograd the group's one product saves nothing a forward
        can see (no shared backward) and its bookkeeping costs Python per member: SmolLM2-shaped
        forwards under ``no_grad`` on 2 CPU cores took the same time per member and grouped
        at 16 x 80 tokens, and per member was 4-12% faster at 16 x 1 and 1 x 1 (decode steps)."""
        if (kernels.compiling() or not torch.is_grad_enabled()) and not active_dropout(
            module, layer_state(module)
        ):
            return project(module, x, module.lora_A.weight)
        if self._learning:
            if kernels.compiling() or _saved_tensors_hooked():
                self._tainted = True  # see _scope_end
            else:
                self._seen.append((module, x))
        index = self._index(module)
        weights = [member.lora_A.weight for member in self.members]  # now (maybe replaced)
        key = _key(module, x, weights)
        # Serve the rows computed for this very input if nothing they were computed from has
        # changed since: the input's and every lora_A's (storage, version), grad and train
        # mode. No storage to key on (torch.func transforms): recompute, never serve.
        if key is None or self._input is not x or not self._pending[index] or self._key != key:
            stacked = project(module, x, torch.cat(weights))
            self._parts = stacked.split([w.shape[0] for w in weights], dim=-1)
            self._input, self._key = x, key
            self._pending = [True] * len(weights)
            self._unserved = len(weights)
        self._pending[index] = False
        self._unserved -= 1
        hidden = self._parts[index]
        if not self._unserved:  # every sibling served: hold no activation past this point
            self._clear()
        return hidden

    def disband(self) -> None:
        """Return every member to per-module computation (used when adapters are removed)."""
        for member in self.members:
            layer = layer_state(member)
            if layer is not None:
                layer.group = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen, self._learning = [], False
        self._clear()


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant activation checkpointing,
    activation offloading): a graph built now may be recomputed later. True when torch does
    not say (the safe answer: the group then never changes)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    return top(False) is not None


def _key(module: nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[Any, ...] | None:
    """What rows computed from ``x`` and ``weights`` depend on: every tensor's place (see
    :func:`_place`), the grad mode and ``module``'s train mode; None for tensors without
    storage (torch.func wrappers), which are never served."""
    places = [_place(x), *map(_place, weights)]
    if None in places:
        return None
    return (*places, torch.is_grad_enabled(), module.training)


def _place(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(storage address, version counter)`` of ``tensor``; version -1 for an inference
    tensor (it keeps none); None for a tensor without storage (a torch.func wrapper)."""
    try:
        address = tensor.data_ptr()
    except RuntimeError:
        return None
    return address, -1 if tensor.is_inference() else tensor._version


def group_shared_inputs(
    model: nn.Module, modules: list[tuple[str, nn.Module]], kinds: tuple[str, ...]
) -> None:
    """Put adapted siblings of one parent in ``model``, of a layer kind in ``kinds``, with the
    same input size and adapter dtype into a :class:`SharedInput` group (groups of one are
    left alone)."""
    parents = dict(model.named_modules())
    groups: dict[tuple[Any, ...], list[nn.Module]] = {}
    for name, module in modules:
        layer = layer_state(module)
        if layer is None or layer.group is not None or layer.kind not in kinds:
            continue
        parent = name.rpartition(".")[0]
        a = module.lora_A.weight
        groups.setdefault((parent, a.shape[1], a.dtype, id(layer.owner)), []).append(module)
    for (parent, *_), members in groups.items():
        if len(members) > 1:
            group = SharedInput(members, parents.get(parent))
            for member in members:
                layer_state(member).group = group
