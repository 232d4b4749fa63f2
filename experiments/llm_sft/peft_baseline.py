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

from experiments.study import peft_main

#: PEFT's equivalent of the llm_sft job's LoRA: r=8, alpha=16, dropout=0.05 on every attention
#: and MLP projection of the Llama blocks (PEFT matches a list entry against the name's end).
PEFT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "task_type": "CAUSAL_LM",
}


main = peft_main(PEFT_LORA)

if __name__ == "__main__":
    main()
