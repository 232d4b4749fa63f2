"""The PEFT format table (docs/peft-format.md), tested row by row against the installed PEFT.

Supported rows cross both ways with the same outputs: PEFT saves -> ``load_adapter`` here, and
``save_adapter`` here -> PEFT loads. Refused rows: PEFT writes the feature, ``load_adapter``
raises :class:`AdapterFileError` naming it, and the model is exactly as before. Tiny models
built from transformers configs (GPT-2 with tied ``lm_head``/``wte``, Llama, BERT, ViT) or
in the test; adapters and trained tensors hold random values so every row changes the output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from models import (
    assert_close_relative,
    assert_unchanged,
    logits,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
    token_ids,
)
from torch import nn

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from lora_lightning.core.peft_format import REFUSED_FIELDS, SUPPORTED_FIELDS, unmapped_fields

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def images() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict]]] = {
    "gpt2": (tiny_gpt2, token_ids),
    "llama": (tiny_llama, token_ids),
    "bert": (tiny_bert, token_ids),
    "vit": (tiny_vit, images),
}


@torch.no_grad()
def perturb(tensors: list[torch.Tensor], seed: int = 5) -> None:
    """Give every trained tensor random values: at init LoRA is a no-op (B or A is zero)."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in tensors:
        tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def peft_model(model_name: str, **kwargs) -> nn.Module:
    build, _ = MODELS[model_name]
    model = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    perturb([p for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return model.eval()


# --- supported rows: (model, PEFT LoraConfig kwargs, the equivalent LoRAConfig here) --------

SUPPORTED = {
    "llama-plain-names": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                          LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": ("llama", {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"},
                         LoRAConfig(r=2, alpha=4, target_modules=[r".*_proj"])),
    "llama-layers-to-transform": ("llama", {"r": 2, "target_modules": ["q_proj"],
                                            "layers_to_transform": [1], "layers_pattern": "layers"},
                                  LoRAConfig(r=2, alpha=8, target_modules=[r"model\.layers\.1\..*q_proj"])),
    "llama-rank-alpha-pattern-rslora": ("llama", {"r": 4, "lora_alpha": 8, "use_rslora": True,
                                                  "target_modules": ["q_proj", "v_proj"],
                                                  "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                                        LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                                   rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "llama-embed-tokens-and-lm-head": ("llama", {"r": 2, "target_modules": ["embed_tokens", "lm_head", "q_proj"]},
                                       LoRAConfig(r=2, alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "llama-modules-to-save-embedding": ("llama", {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
                                        LoRAConfig(r=2, alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "llama-init-gaussian": ("llama", {"r": 2, "target_modules": ["k_proj"], "init_lora_weights": "gaussian"},
                            LoRAConfig(r=2, alpha=8, target_modules=["k_proj"], init="gaussian")),
    "llama-init-orthogonal": ("llama", {"r": 2, "target_modules": ["k_proj"], "init_lora_weights": "orthogonal"},
                              LoRAConfig(r=2, alpha=8, target_modules=["k_proj"])),
    "llama-init-mica": ("llama", {"r": 2, "target_modules": ["k_proj"], "init_lora_weights": "mica"},
                        LoRAConfig(r=2, alpha=8, target_modules=["k_proj"])),
    "llama-init-eva": ("llama", {"r": 2, "target_modules": ["k_proj"], "init_lora_weights": "eva"},
                       LoRAConfig(r=2, alpha=8, target_modules=["k_proj"])),
    "bert-bias-lora-only": ("bert", {"r": 2, "target_modules": ["query", "value"], "bias": "lora_only",
                                     "modules_to_save": ["classifier"]},
                            LoRAConfig(r=2, alpha=8, target_modules=["query", "value"], bias="lora_only",
                                       modules_to_save=["classifier"])),
    "bert-bias-all-modules-to-save": ("bert", {"r": 2, "target_modules": ["query"], "bias": "all",
                                               "modules_to_save": ["classifier"]},
                                      LoRAConfig(r=2, alpha=8, target_modules=["query"], bias="all",
                                                 modules_to_save=["classifier"])),
    "bert-regex-target": ("bert", {"r": 2, "target_modules": r".*layer\.0\.attention\.self\.(query|key)"},
                          LoRAConfig(r=2, alpha=8, target_modules=[r".*layer\.0\.attention\.self\.(query|key)"])),
    "gpt2-conv1d-and-tied-lm-head": ("gpt2", {"r": 2, "target_modules": ["c_attn", "lm_head"], "fan_in_fan_out": True},
                                     LoRAConfig(r=2, alpha=8, target_modules=["c_attn", "lm_head"])),
    "gpt2-tied-wte-embedding": ("gpt2", {"r": 2, "target_modules": ["wte"]},
                                LoRAConfig(r=2, alpha=8, target_modules=["wte"])),
    "vit-conv2d-patch-and-head": ("vit", {"r": 2, "target_modules": ["projection", "q_proj"],
                                          "modules_to_save": ["classifier"]},
                                  LoRAConfig(r=2, alpha=8, target_modules=["projection", "q_proj"],
                                             modules_to_save=["classifier"])),
}  # fmt: skip


@pytest.mark.parametrize("row", SUPPORTED)
def test_supported_peft_file_loads_here_with_the_same_outputs(row, tmp_path):
    model_name, kwargs, _ = SUPPORTED[row]
    build, inputs = MODELS[model_name]
    reference = peft_model(model_name, **kwargs)
    expected = logits(reference, inputs())
    assert (expected - logits(build(), inputs())).abs().max() > 1e-3, "the adapter is a no-op"
    reference.save_pretrained(str(tmp_path))
    model = build()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, inputs()), expected, rtol=1e-5)


@pytest.mark.parametrize("row", SUPPORTED)
def test_supported_adapter_saved_here_loads_in_peft_with_the_same_outputs(row, tmp_path):
    model_name, _, config = SUPPORTED[row]
    build, inputs = MODELS[model_name]
    model = build()
    inject_lora(model, config)
    perturb(list(lora_state_dict(model).values()))
    expected = logits(model, inputs())
    assert (expected - logits(build(), inputs())).abs().max() > 1e-3, "the adapter is a no-op"
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert_close_relative(logits(loaded, inputs()), expected, rtol=1e-5)


def test_bias_of_an_adapted_layer_is_written_with_peft_base_layer_key(tmp_path):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=2, target_modules=["query"], bias="lora_only"))
    save_adapter(model, tmp_path)
    keys = set(peft.utils.load_peft_weights(str(tmp_path), device="cpu"))
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert f"{query}.base_layer.bias" in keys
    assert f"{query}.bias" not in keys


def test_converted_pissa_file_loads_here_on_the_original_base(tmp_path):
    reference = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa")
    )
    reference.save_pretrained(str(tmp_path / "init"))
    perturb([p for _, p in sorted(reference.named_parameters()) if "lora_" in _])
    expected = logits(reference.eval(), token_ids())
    reference.save_pretrained(
        str(tmp_path / "converted"),
        path_initial_model_for_weight_conversion=str(tmp_path / "init"),
    )
    model = tiny_bert()
    load_adapter(model, tmp_path / "converted")
    assert_close_relative(logits(model, token_ids()), expected, rtol=1e-4)


def test_each_adapter_of_a_multi_adapter_directory_loads_from_its_own_folder(tmp_path):
    reference = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    reference.add_adapter("other", peft.LoraConfig(r=4, target_modules=["value"]))
    perturb([p for n, p in sorted(reference.named_parameters()) if "lora_" in n])
    reference.eval().save_pretrained(str(tmp_path))  # "default" at the root, "other" below
    for folder, name in ((tmp_path, "default"), (tmp_path / "other", "other")):
        reference.set_adapter(name)
        model = tiny_bert()
        load_adapter(model, folder)
        assert_close_relative(logits(model, token_ids()), logits(reference, token_ids()))


def test_saved_embedding_base_weights_equal_to_the_model_are_accepted(tmp_path):
    reference = peft_model("llama", r=2, target_modules=["q_proj"])
    reference.save_pretrained(str(tmp_path), save_embedding_layers=True)
    assert "base_model.model.model.embed_tokens.weight" in peft.utils.load_peft_weights(
        str(tmp_path), device="cpu"
    )
    model = tiny_llama()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, token_ids()), logits(reference, token_ids()))


# --- refused rows: PEFT writes the feature, loading here names it ---------------------------


def edit_config(**fields) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def perturb_embeddings(model: nn.Module) -> nn.Module:
    perturb([model.get_input_embeddings().weight])
    return model


def resized_llama() -> nn.Module:
    model = peft.get_peft_model(
        tiny_llama_resized(), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    return model


def tiny_llama_resized() -> nn.Module:
    model = tiny_llama()
    model.resize_token_embeddings(72)
    return model


# id -> (model, PEFT kwargs, save_pretrained kwargs, edit of the written files, model to
#        load into (None: a fresh one), words the error must contain)
REFUSED = {
    "dora-keys-config-edited": ("llama", {"target_modules": ["q_proj"], "use_dora": True}, {},
                                edit_config(use_dora=False), None, ["DoRA magnitudes", "use_dora=false"]),
    "lora-bias": ("bert", {"target_modules": ["query"], "lora_bias": True}, {}, None, None,
                  ["lora_bias=True is not supported", "bias on lora_B"]),
    "alora": ("llama", {"target_modules": ["q_proj"], "alora_invocation_tokens": [3, 4],
                        "task_type": "CAUSAL_LM"}, {}, None, None, ["alora_invocation_tokens", "aLoRA"]),
    "target-parameters": ("llama", {"target_modules": [], "target_parameters": ["q_proj.weight"]}, {}, None,
                          None, ["target_parameters", "raw nn.Parameters"]),
    "layer-replication": ("llama", {"target_modules": ["q_proj"], "layer_replication": [[0, 2], [1, 2]]}, {},
                          None, None, ["layer_replication", "layers are stacked again"]),
    "trainable-token-indices": ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]},
                                {}, None, None, ["trainable_token_indices", "trainable tokens"]),
    "velora": ("llama", {"target_modules": ["q_proj"], "velora_config": {"num_groups": 2}}, {}, None, None,
               ["velora_config", "VeLoRA"]),
    "pissa-unconverted": ("bert", {"r": 2, "target_modules": ["query"], "init_lora_weights": "pissa"}, {},
                          None, None, ["init_lora_weights='pissa'", "path_initial_model_for_weight_conversion"]),
    "olora-unconverted": ("bert", {"r": 2, "target_modules": ["query"], "init_lora_weights": "olora"}, {},
                          None, None, ["init_lora_weights='olora'", "modified base"]),
    "corda-unconverted": ("bert", {"target_modules": ["query"]}, {}, edit_config(init_lora_weights="corda"),
                          None, ["init_lora_weights='corda'"]),
    "loftq": ("bert", {"target_modules": ["query"]}, {}, edit_config(init_lora_weights="loftq"), None,
              ["init_lora_weights='loftq'", "LoftQ"]),
    "megatron": ("bert", {"target_modules": ["query"]}, {}, edit_config(megatron_config={"tp": 2}), None,
                 ["megatron_config", "Megatron"]),
    "unknown-newer-field": ("bert", {"target_modules": ["query"]}, {}, edit_config(use_new_thing=True), None,
                            ["['use_new_thing'] are not known"]),
    "ensure-weight-tying": ("gpt2", {"target_modules": ["lm_head", "wte"], "ensure_weight_tying": True}, {},
                            None, None, ["ensure_weight_tying=true", "tied"]),
    "modules-to-save-tied-lm-head": ("gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
                                     {}, None, None, ["'lm_head' shares its weights", "transformer.wte.weight"]),
    "saved-embedding-differs": ("llama", {"target_modules": ["embed_tokens"]}, {}, None,
                                lambda: perturb_embeddings(tiny_llama()),
                                ["save_embedding_layers", "values differ from the model's model.embed_tokens.weight"]),
    "resized-vocabulary": ("llama-resized", {}, {"save_embedding_layers": True}, None, None,
                           ["resized vocabulary", "shape (72, 16)", "resize_token_embeddings"]),
}  # fmt: skip


@pytest.mark.parametrize("row", REFUSED)
def test_refused_peft_feature_is_named_and_leaves_the_model_unchanged(row, tmp_path):
    model_name, kwargs, save_kwargs, edit, target, words = REFUSED[row]
    reference = (
        resized_llama() if model_name == "llama-resized" else peft_model(model_name, **kwargs)
    )
    reference.save_pretrained(str(tmp_path), **save_kwargs)
    if edit is not None:
        edit(tmp_path)
    model = target() if target else MODELS[model_name.removesuffix("-resized")][0]()
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as raised:
        load_adapter(model, tmp_path)
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {raised.value}"
    assert_unchanged(model, before)


# --- the installed PEFT's LoraConfig against the fields the mapping knows -------------------


def test_every_field_of_the_installed_peft_lora_config_is_supported_or_refused_by_name():
    fields = [field.name for field in dataclasses.fields(peft.LoraConfig)]
    assert unmapped_fields(fields) == [], (
        f"PEFT {peft.__version__}'s LoraConfig has fields the PEFT-format mapping does not know: "
        "support each in core/peft_format.py (SUPPORTED_FIELDS) if it is exact, else refuse it "
        "by name (UNSUPPORTED_FIELDS), and add its row to docs/peft-format.md"
    )


def test_a_field_neither_supported_nor_refused_is_reported_as_unmapped():
    assert unmapped_fields(["r", "lora_bias", "use_new_thing"]) == ["use_new_thing"]
    assert not SUPPORTED_FIELDS & REFUSED_FIELDS


def test_a_runtime_config_in_the_file_is_ignored_as_peft_ignores_it(tmp_path):
    reference = peft_model("bert", target_modules=["query"])
    reference.save_pretrained(str(tmp_path))
    edit_config(runtime_config={"ephemeral_gpu_offload": True})(tmp_path)
    model = tiny_bert()
    load_adapter(model, tmp_path)
    assert_close_relative(logits(model, token_ids()), logits(reference, token_ids()), rtol=1e-5)


def test_saving_a_tied_module_to_save_is_refused_and_writes_nothing(tmp_path):
    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    with pytest.raises(AdapterFileError, match="'lm_head' shares its weights"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output, like transformers' ``*ScaledWordEmbedding``."""

    def __init__(self, num: int, dim: int, embed_scale: float) -> None:
        super().__init__(num, dim)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_adapter_on_a_scaled_embedding_is_refused_both_ways(tmp_path):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(ScaledEmbedding(10, 4, embed_scale=2.0), nn.Linear(4, 2))

    reference = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=["0"]))
    reference.save_pretrained(str(tmp_path / "peft"))
    model = build()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="embed_scale=2"):
        load_adapter(model, tmp_path / "peft")
    assert_unchanged(model, before)
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterFileError, match="PEFT multiplies its LoRA term by embed_scale"):
        save_adapter(model, tmp_path / "ours")


def test_adapter_on_a_dilated_convolution_is_refused_on_saving(tmp_path):
    # PEFT builds lora_A with the layer's kernel, stride and padding, not its dilation.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterFileError, match=r"dilation=\(2, 2\)"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
