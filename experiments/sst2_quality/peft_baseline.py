"""The default SST-2 job with Hugging Face PEFT doing the LoRA instead of lora_lightning.

Same Hydra config, data, model, seed, optimizer, schedule and step budget as ``train.py``; the
only difference is who adapts the model. Run from the repository root:

    python -m experiments.sst2_quality.peft_baseline '~lora' hydra.run.dir=runs/peft

(``~lora`` removes our callback; the LoRA hyperparameters below mirror ``conf/lora/default``.)
"""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from lora_lightning.app import CONF_DIR, register_configs, run

#: PEFT's equivalent of conf/lora/default.yaml: r=8, alpha=16, dropout=0.1, every encoder
#: Linear (a list entry matches that name or any path ending in ".<entry>") but the pooler,
#: and the classifier head trained in full.
PEFT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["query", "key", "value", "dense"],
    "exclude_modules": ["pooler.dense"],
    "modules_to_save": ["classifier"],
}


def use_peft(module: pl.LightningModule) -> None:
    """Wrap the task's Hugging Face model in ``peft.get_peft_model``."""
    from peft import LoraConfig, get_peft_model

    module.model = get_peft_model(module.model, LoraConfig(**PEFT_LORA))


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, prepare_model=use_peft)


if __name__ == "__main__":
    main()
