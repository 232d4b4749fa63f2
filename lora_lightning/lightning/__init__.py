"""The Lightning integration: :class:`LoRACallback` and its checkpoint functions.

=================  ===============================================================
module             owns
=================  ===============================================================
``callback``       ``LoRACallback``: hooks only, calling the core
``checkpoint``     trimming and validating checkpoint dicts (pure)
``fingerprint``    ``base_fingerprint``: a checksum of every frozen base value
``checkpoint_io``  the atomic, adapter-exporting ``CheckpointIO`` wrapper
``rng``            ``RNGStateCallback``: every rank's RNG states in the checkpoint
``sharded``        FSDP2: ``shard_model``, ``FSDP2Strategy``, adapter-only sharded checkpoints
=================  ===============================================================

Uses the core; the core never imports this package. Must not import: ``app/``, Hydra, W&B.
"""

from lora_lightning.lightning.callback import LoRACallback
from lora_lightning.lightning.checkpoint import (
    CHECKPOINT_KEY,
    adapter_dir_for,
    trim_checkpoint,
    validate_checkpoint,
)
from lora_lightning.lightning.fingerprint import base_fingerprint
from lora_lightning.lightning.rng import RNGStateCallback
from lora_lightning.lightning.sharded import FSDP2Strategy, shard_model

__all__ = [
    "CHECKPOINT_KEY",
    "FSDP2Strategy",
    "LoRACallback",
    "RNGStateCallback",
    "adapter_dir_for",
    "base_fingerprint",
    "shard_model",
    "trim_checkpoint",
    "validate_checkpoint",
]
