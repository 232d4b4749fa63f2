"""What a serving engine will refuse in an adapter, said when the adapter is written.

vLLM (the usual way to serve many LoRA adapters on one base) loads PEFT-format adapters but
refuses some of what PEFT can express (vllm `lora/peft_helper.py`, `lora/models.py`): DoRA
magnitudes, biases trained with the adapter (`bias` other than `none`), and `modules_to_save`
other than the embeddings and the output head. An adapter with any of these trains and loads in
PEFT exactly; it just cannot be served by vLLM, which a user should learn at export time, not
at deployment. :func:`save_adapter` warns with :class:`ServingCompatibilityWarning` when the
model generates text (it has a `generate` method, as Hugging Face's generative models do):
vLLM serves generation, so a classifier's trained head is no reason to warn.
"""

from __future__ import annotations

from torch import nn

from lora_lightning.core import variants
from lora_lightning.core.state import config_of, saved_modules

#: modules_to_save vLLM accepts: the input embeddings and the output head.
VLLM_SAVABLE = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


class ServingCompatibilityWarning(UserWarning):
    """An adapter feature that vLLM refuses to load (PEFT loads it)."""


def vllm_unsupported(model: nn.Module) -> list[str]:
    """The features of `model`'s adapter that vLLM refuses, each named; empty if none.

    Reads the adapter's config (its variant, see `core.variants`; `bias`) and its `modules_to_save` modules. A model
    without a `generate` method (a classifier, an encoder) is not vLLM's to serve: empty list.
    """
    config = config_of(model)
    if config is None or not callable(getattr(model, "generate", None)):
        return []
    problems = []
    problems += [
        v.vllm_refusal for v in variants.VARIANTS.values() if v.enabled(config) and v.vllm_refusal
    ]
    if config.bias != "none":
        problems.append(f"trained biases (bias={config.bias!r})")
    others = [n for n, _ in saved_modules(model) if n.rsplit(".", 1)[-1] not in VLLM_SAVABLE]
    if others:
        problems.append(
            f"modules_to_save {others[:4]} (vLLM takes only the embeddings and lm_head)"
        )
    return problems
