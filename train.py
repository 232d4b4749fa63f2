"""Train LoRA from a Hydra config: ``python train.py lora.r=8 trainer.devices=2``.

A thin entry point, the same as the installed ``lora-lightning-train`` console script. See
``conf/train.yaml`` for the defaults and README.md for the configuration reference.
"""

from lora_lightning.app import main

if __name__ == "__main__":
    main()
