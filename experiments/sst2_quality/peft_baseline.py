"""The default SST-2 job with Hugging Face PEFT doing the LoRA instead of lora_lightning.

Same Hydra config, data, model, seed, optimizer, schedule and step budget as ``train.py``; the
only difference is who adapts the model. Run from the repository root:

    python -m experiments.sst2_quality.peft_baseline '~lora' hydra.run.dir=runs/peft

(``~lora`` removes our callback; the LoRA hyperparameters below mirror ``conf/lora/default``.)
"""

from __future__ import annotations

from experiments.study import peft_main

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


main = peft_main(PEFT_LORA)

if __name__ == "__main__":
    main()
