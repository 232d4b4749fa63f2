"""The causal-LM job (`experiment=llm_sft`) with Hugging Face PEFT doing the LoRA instead of
lora_lightning.

Same Hydra config, data, model, seed, optimizer, schedule, step budget and evaluations as
``train.py experiment=llm_sft``; the only difference is who adapts the model. From the
repository root:

    python -m experiments.llm_sft.peft_baseline experiment=llm_sft '~lora' hydra.run.dir=runs/peft

(``'~lora'`` removes our callback; the LoRA hyperparameters below mirror
``conf/lora/default.yaml`` as ``conf/experiment/llm_sft.yaml`` overrides it.)
"""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from lora_lightning.app import CONF_DIR, register_configs, run

#: PEFT's equivalent of the llm_sft job's LoRA: r=8, alpha=16, dropout=0.05 on every attention
#: and MLP projection of the Llama blocks (PEFT matches a list entry against the name's end).
PEFT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "task_type": "CAUSAL_LM",
}


def use_peft(module: pl.LightningModule) -> None:
    """Wrap the task's Hugging Face causal LM in ``peft.get_peft_model``."""
    from peft import LoraConfig, get_peft_model

    module.model = get_peft_model(module.model, LoraConfig(**PEFT_LORA))


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, prepare_model=use_peft)


if __name__ == "__main__":
    main()
