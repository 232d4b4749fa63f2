"""Plain FSDP1 (no LoRA, no Lightning), one process: can a full state dict be written after a
backward when the root FSDP unit's own parameters are all frozen?

``python -m experiments.gpu.frozen_root cpu|cuda [rootfrozen]`` (from the repository root;
the tests' tiny Llama, blocks as the units, the root holding embeddings, final norm and
``lm_head``). Prints ``RESULT ... keys N`` (it could) or ``RESULT ... AssertionError ...``
(torch's ``FSDP assumes ... is in the state_dict``). Measured 2026-12-04: fails with
``rootfrozen`` on the H200 (torch 2.11, ``results/after_fsdp1_fix/frozen_root.txt``) and on the
CPU (torch 2.13), passes without it. Why: one process means ``NO_SHARD``, and torch's
catch-all reshard after backward skips a unit whose flat parameter already points at its shard,
so a unit no post-backward hook ran for (all frozen) keeps its parameters as plain tensors.
``LoRACallback`` refuses that setup before the first step (``callback._check_fsdp1_root``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from models import tiny_llama

    device = torch.device(argv[0])
    frozen_root = "rootfrozen" in argv[1:]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model = tiny_llama(0).to(device)
        for name, param in model.named_parameters():
            if frozen_root and "layers" not in name:
                param.requires_grad_(False)
        wrapped = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            device_id=device,
            use_orig_params=True,
        )
        ids = torch.randint(0, 64, (2, 8), device=device)
        wrapped(input_ids=ids).logits.sum().backward()
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        try:
            with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
                print("RESULT", argv, "keys", len(wrapped.state_dict()))
        except AssertionError as err:
            print("RESULT", argv, "AssertionError", str(err)[:120])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
