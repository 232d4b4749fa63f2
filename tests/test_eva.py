"""EVA (``init="eva"``, ``core.eva``) against PEFT's own EVA on the same model and batches.

PEFT's EVA is deterministic on CPU (its low-rank SVD is seeded), so the comparison is of the
values: the same ranks and alphas per layer, the same ``A`` (to float rounding), ``B = 0``;
then the adapter file this project writes loads in PEFT with this project's outputs.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from models import VOCAB, tiny_gpt2, tiny_llama
from peft.tuners.lora.eva import initialize_lora_eva_weights
from test_app import tiny_args, train_py

from lora_lightning import LoRAConfig, LoRAConfigError, inject_lora, prepare_lora, save_adapter
from lora_lightning.core import config_of

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _batches(count: int = 4, size: int = 4, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Token batches with padding at the end of some rows and a few ignored labels."""
    batches = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        ids = torch.randint(1, VOCAB, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels = ids.clone()
        labels[:, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _peft_eva(build, eva: dict, batches, **lora):
    config = peft.LoraConfig(init_lora_weights="eva", eva_config=peft.EvaConfig(**eva), **lora)
    model = peft.get_peft_model(build(), config)
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model


def _ours(build, eva: dict, batches, **lora):
    model = build()
    inject_lora(model, LoRAConfig(init="eva", eva_config=eva, **lora), batches=batches)
    return model


@pytest.mark.parametrize(
    "eva",
    [
        {"rho": 2.0, "tau": 0.9},
        {"rho": 1.0, "tau": 0.9, "use_label_mask": False},
        {"rho": 2.0, "tau": 0.9, "adjust_scaling_factors": False},
    ],
    ids=["redistributed", "rho1-no-label-mask", "alpha-kept"],
)
def test_eva_gives_peft_s_ranks_alphas_and_a_matrices(eva):
    batches = _batches()
    theirs = _peft_eva(tiny_llama, eva, batches, r=4, lora_alpha=8, target_modules=TARGETS)
    ours = _ours(tiny_llama, eva, batches, r=4, alpha=8.0, target_modules=TARGETS)
    pconfig = theirs.peft_config["default"]
    their_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    config = config_of(ours)
    our_layers = {n: m for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    assert sorted(our_layers) == sorted(their_layers)
    for name, module in our_layers.items():
        theirs_a = their_layers[name].lora_A["default"].weight
        assert config.rank_for(name) == pconfig.rank_pattern.get(name, pconfig.r), name
        assert config.alpha_for(name) == pconfig.alpha_pattern.get(name, pconfig.lora_alpha), name
        assert module.lora_A.weight.shape == theirs_a.shape, name
        torch.testing.assert_close(module.lora_A.weight, theirs_a, rtol=1e-5, atol=1e-6)
        assert not module.lora_B.weight.any()


def test_eva_on_gpt2_conv1d_matches_peft():
    batches = _batches(count=3)
    eva = {"rho": 2.0, "tau": 0.9}
    theirs = _peft_eva(tiny_gpt2, eva, batches, r=2, lora_alpha=4, target_modules=["c_attn"],
                       fan_in_fan_out=True)  # fmt: skip
    ours = _ours(tiny_gpt2, eva, batches, r=2, alpha=4.0, target_modules=["c_attn"])
    for name, module in ours.named_modules():
        if hasattr(module, "lora_A"):
            peer = theirs.base_model.model.get_submodule(name).lora_A["default"].weight
            torch.testing.assert_close(module.lora_A.weight, peer, rtol=1e-5, atol=1e-6)


def test_the_eva_file_loads_in_peft_with_our_outputs(tmp_path):
    batches = _batches()
    ours = _ours(tiny_llama, {"rho": 2.0, "tau": 0.9}, batches, r=4, alpha=8.0,
                 target_modules=TARGETS)  # fmt: skip
    with torch.no_grad():  # trained-looking B, so the file's adapters matter
        for module in ours.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours.eval()(**inputs).logits)


def test_a_layer_with_fewer_inputs_than_components_is_refused_before_any_change():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRAConfigError, match=r"round\(r \* rho\) components"):
        prepare_lora(model, LoRAConfig(r=16, init="eva", target_modules=["q_proj"]), _batches())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_eva_config_fields_are_checked():
    with pytest.raises(LoRAConfigError, match=r"eva_config.tau=1.5"):
        LoRAConfig(init="eva", eva_config={"tau": 1.5})
    with pytest.raises(LoRAConfigError, match="unknown lora.eva_config field"):
        LoRAConfig(init="eva", eva_config={"rank": 1})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from models import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.slow
def test_train_py_runs_eva_from_the_command_line(model_dir, tmp_path):
    out = tmp_path / "run"
    train_py([*tiny_args(model_dir), "lora.init=eva", "lora.eva_config.tau=0.9",
              f"hydra.run.dir={out}"])  # fmt: skip
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "eva"
    checkpoint = torch.load(next((out / "checkpoints").glob("*.ckpt")), weights_only=True)
    init = checkpoint["lora"]["init"]
    assert init["requested"]["init"] == "eva" and init["requested"]["eva_config"]["tau"] == 0.9
    assert init["values"]  # the components EVA found, kept for a resume
