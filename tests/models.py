"""Tiny, seeded models for the test suite, built from configs (no hub, no network).

Every builder takes a ``seed`` and returns a model in eval mode, so two calls with the same
seed give bit-identical weights and deterministic outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 64
SEQ_LEN = 8
M = TypeVar("M", bound=nn.Module)
C = TypeVar("C")


def seeded(model_class: type[M], config: Any, seed: int) -> M:
    """``model_class(config)`` with weights drawn after ``torch.manual_seed(seed)``, in eval
    mode: the one way every builder here makes a model from its config."""
    torch.manual_seed(seed)
    return model_class(config).eval()


#: What "tiny" means for every Hugging Face config built here: width 16, 2 layers of 2
#: heads, no dropout. A config takes the fields it has (GPT-2 names its own).
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_config(config_class: type[C], **fields: Any) -> C:
    """A ``config_class`` with the :data:`TINY` fields it has, ``fields`` overriding them."""
    known = config_class().to_dict()
    return config_class(**{**{k: v for k, v in TINY.items() if k in known}, **fields})


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    """A 2-layer, width-16 BERT for sequence classification (query/key/value are Linear)."""
    # Weights of scale 0.2: logits of order 1, so output comparisons mean something.
    config = tiny_config(BertConfig, num_labels=num_labels, initializer_range=0.2)
    return seeded(BertForSequenceClassification, config, seed)


def save_tiny_classifier(directory: Path) -> Path:
    """A 2-layer, width-32 BERT classifier (2 labels, dropout on) with the real MiniLM
    tokenizer, saved in ``directory`` like a pretrained model (for the default task and the
    app, which load by path)."""
    from transformers import AutoTokenizer

    from lora_lightning.tasks import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=2,
    )
    seeded(BertForSequenceClassification, config, 0).save_pretrained(directory)
    return directory


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, width-16 GPT-2 LM (``c_attn`` is a transformers ``Conv1D``)."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return seeded(GPT2LMHeadModel, config, seed)


@dataclass
class ConvNetConfig:
    """Sizes of :class:`ConvEmbedNet`."""

    vocab_size: int = 20
    embed_dim: int = 6
    in_channels: int = 3
    conv_channels: int = 5
    kernel_size: int = 3
    num_classes: int = 4


class ConvEmbedNet(nn.Module):
    """Image ``(N, C, H, W)`` and token ids ``(N, L)`` -> logits ``(N, classes)``.

    Holds one ``nn.Conv2d`` (``conv``), one ``nn.Embedding`` (``embed``) and a Linear ``head``.
    """

    def __init__(self, config: ConvNetConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.conv = nn.Conv2d(
            config.in_channels, config.conv_channels, config.kernel_size, padding=1
        )
        self.head = nn.Linear(config.conv_channels + config.embed_dim, config.num_classes)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(image)).mean(dim=(2, 3))
        tokens = self.embed(ids).mean(dim=1)
        return self.head(torch.cat([pooled, tokens], dim=-1))


def conv_embed_net(seed: int = 0, config: ConvNetConfig | None = None) -> ConvEmbedNet:
    """A seeded :class:`ConvEmbedNet` in eval mode."""
    torch.manual_seed(seed)
    return ConvEmbedNet(config or ConvNetConfig()).eval()


class MLP(nn.Module):
    """``(N, sizes[0]) -> (N, sizes[-1])``: Linear layers ``layers.0``, ``layers.1``, ... with
    ReLU between them."""

    def __init__(self, sizes: tuple[int, ...] = (6, 10, 8, 4)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def mlp(seed: int = 0, sizes: tuple[int, ...] = (6, 10, 8, 4)) -> MLP:
    """A seeded :class:`MLP` in eval mode."""
    torch.manual_seed(seed)
    return MLP(sizes).eval()


# --- inputs -------------------------------------------------------------------------------


def token_ids(seed: int = 1, batch: int = 2, length: int = SEQ_LEN, vocab: int = VOCAB):
    """Random token ids ``(batch, length)`` plus an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def conv_inputs(seed: int = 1, config: ConvNetConfig | None = None, batch: int = 2):
    """Inputs of :class:`ConvEmbedNet`: an image batch and token ids."""
    config = config or ConvNetConfig()
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch, config.in_channels, 7, 7, generator=generator),
        "ids": torch.randint(0, config.vocab_size, (batch, 5), generator=generator),
    }


def mlp_inputs(seed: int = 1, batch: int = 3, features: int = 6) -> torch.Tensor:
    """A random batch ``(batch, features)`` for :class:`MLP`."""
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed))


# --- adapter helpers ----------------------------------------------------------------------


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 123, scale: float = 0.2) -> None:
    """Fill every LoRA tensor (ours or PEFT's) with seeded random values.

    At init ``B = 0`` (or ``A = 0`` for embeddings), so parity tests would pass trivially;
    random A and B make the low-rank term change the output.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            values = torch.randn(param.shape, generator=generator) * scale
            param.copy_(values.to(param.dtype))


def logits(model: nn.Module, inputs) -> torch.Tensor:
    """The model's main output for ``inputs`` (a tensor or a dict of keyword arguments)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5):
    """max |actual - expected| <= rtol * max |expected| (SPEC section 8's merge criterion)."""
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rtol * max(scale, 1e-12), f"max abs diff {diff:.3g} > {rtol} * {scale:.3g}"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, width-16 Llama (untied ``embed_tokens`` and ``lm_head``)."""
    config = tiny_config(LlamaConfig, num_key_value_heads=1, tie_word_embeddings=False)
    return seeded(LlamaForCausalLM, config, seed)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A 1-layer, width-16 ViT classifier on 8x8 images (the patch embedding is a Conv2d)."""
    config = tiny_config(
        ViTConfig, image_size=8, patch_size=4, num_channels=3, num_hidden_layers=1, num_labels=3
    )
    return seeded(ViTForImageClassification, config, seed)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed operation could have changed: values, hooks, flags, modes, attrs."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [
            (
                name,
                type(m).__name__,
                m.training,
                sorted(m.__dict__),
                list(m._modules),
                list(m._parameters),
                list(m._forward_hooks),
                list(m._forward_pre_hooks),
            )
            for name, m in model.named_modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
