"""The default task: SST-2 sentiment classification with a pretrained MiniLM encoder.

A plain Lightning task with no knowledge of LoRA; the Hydra configuration adds the LoRA
callback. `transformers` (the `task` extra) is imported only when a model or tokenizer is built,
so the names below import without it.
"""

from lora_lightning.tasks.classifier import TextClassifier, linear_warmup_decay
from lora_lightning.tasks.minilm import minilm_path
from lora_lightning.tasks.sst2 import (
    SST2_SPLITS,
    SST2DataModule,
    random_subset,
    read_labelled_tsv,
    sst2_path,
)

__all__ = [
    "SST2DataModule",
    "SST2_SPLITS",
    "TextClassifier",
    "linear_warmup_decay",
    "minilm_path",
    "random_subset",
    "read_labelled_tsv",
    "sst2_path",
]
