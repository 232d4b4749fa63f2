"""Train LoRA from a Hydra config: ``python train.py lora.r=8 trainer.devices=2``.

See ``conf/train.yaml`` for the defaults and README.md for the configuration reference.
"""

import hydra
from omegaconf import DictConfig

from lora_lightning.app import register_configs, run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
