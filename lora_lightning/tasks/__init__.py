"""The tasks: SST-2 sentiment classification with a pretrained MiniLM encoder (the default) and
instruction tuning of a causal LM (SmolLM2-135M-Instruct by default, `experiment=llm_sft`).

Plain Lightning tasks with no knowledge of LoRA; the Hydra configuration adds the LoRA
callback. `transformers` (the `task` extra) is imported only when a model or tokenizer is built,
so the names below import without it.
"""

from lora_lightning.tasks.causal_lm import CausalLMTask, CausalLMTaskError
from lora_lightning.tasks.chat import DataError
from lora_lightning.tasks.classifier import TextClassifier
from lora_lightning.tasks.instruct import InstructDataModule
from lora_lightning.tasks.instruct_set import instruct_path
from lora_lightning.tasks.minilm import minilm_path
from lora_lightning.tasks.schedule import WarmupDecaySchedule, linear_warmup_decay
from lora_lightning.tasks.smollm2 import smollm2_config, smollm2_path
from lora_lightning.tasks.sst2 import (
    SST2_SPLITS,
    SST2DataModule,
    random_subset,
    read_labelled_tsv,
    sst2_path,
)

__all__ = [
    "CausalLMTask",
    "CausalLMTaskError",
    "DataError",
    "InstructDataModule",
    "instruct_path",
    "SST2DataModule",
    "SST2_SPLITS",
    "TextClassifier",
    "WarmupDecaySchedule",
    "linear_warmup_decay",
    "minilm_path",
    "random_subset",
    "read_labelled_tsv",
    "smollm2_config",
    "smollm2_path",
    "sst2_path",
]
