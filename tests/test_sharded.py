"""The pure parts of FSDP2 support (``lora_lightning.lightning.sharded``), in one process:
finding blocks, rekeying optimizer states, reading a distributed checkpoint's tensor
shapes and optimizer parameters, gathering, and what ``shard_model`` refuses. The
2-process behaviour is in test_callback_fsdp.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lora_lightning.core.errors import LoRAConfigError
from lora_lightning.lightning.sharded import (
    full_tensors,
    optimizer_state_by_name,
    saved_optimizer_params,
    saved_tensor_shapes,
    shard_model,
    transformer_blocks,
)


def block_names(model: nn.Module) -> list[str]:
    return [name for name, _ in transformer_blocks(model)]


def test_llama_blocks_are_its_decoder_layers():
    assert block_names(tiny_llama()) == ["model.layers.0", "model.layers.1"]


def test_bert_blocks_come_from_no_split_modules():
    model = tiny_bert()
    names = block_names(model)
    assert "bert.encoder.layer.0" in names and "bert.encoder.layer.1" in names
    assert all(
        type(block).__name__ in model._no_split_modules for _, block in transformer_blocks(model)
    )


def test_gpt2_blocks_are_its_h_list():
    assert block_names(tiny_gpt2()) == ["transformer.h.0", "transformer.h.1"]


def test_blocks_of_a_plain_model_are_the_members_of_a_layers_list():
    assert block_names(mlp()) == ["layers.0", "layers.1", "layers.2"]


def test_a_model_without_block_lists_has_no_blocks():
    assert block_names(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


class OwnParameter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))


def test_shard_model_refuses_a_lightning_module_with_parameters_of_its_own():
    with pytest.raises(LoRAConfigError, match=r"OwnParameter holds parameters itself \['scale'\]"):
        shard_model(OwnParameter())


def adam_after_one_step() -> tuple[torch.optim.Optimizer, dict[int, str]]:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    optimizer = torch.optim.Adam(
        [{"params": [model[0].weight, model[0].bias]}, {"params": [model[1].weight], "lr": 0.1}]
    )
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    names = {id(p): name for name, p in model.named_parameters()}
    return optimizer, names


def test_positional_optimizer_state_is_rekeyed_by_name_group_by_group():
    optimizer, names = adam_after_one_step()
    state = optimizer.state_dict()
    rekeyed = optimizer_state_by_name(state, optimizer, names)
    assert [g["params"] for g in rekeyed["param_groups"]] == [["0.weight", "0.bias"], ["1.weight"]]
    assert rekeyed["param_groups"][1]["lr"] == 0.1
    for index, name in enumerate(["0.weight", "0.bias", "1.weight"]):
        assert torch.equal(rekeyed["state"][name]["exp_avg"], state["state"][index]["exp_avg"])


def test_saved_ids_need_not_be_positions_only_their_order_counts():
    # Lightning's single-file FSDP checkpoint numbers parameters among all model parameters.
    optimizer, names = adam_after_one_step()
    state = optimizer.state_dict()
    renumber = {0: 5, 1: 9, 2: 11}
    state = {
        "state": {renumber[k]: v for k, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [renumber[k] for k in g["params"]]} for g in state["param_groups"]
        ],
    }
    rekeyed = optimizer_state_by_name(state, optimizer, names)
    assert set(rekeyed["state"]) == {"0.weight", "0.bias", "1.weight"}
    assert torch.equal(rekeyed["state"]["1.weight"]["exp_avg"], state["state"][11]["exp_avg"])


def test_optimizer_state_keyed_by_name_is_returned_as_it_is():
    optimizer, names = adam_after_one_step()
    by_name = optimizer_state_by_name(optimizer.state_dict(), optimizer, names)
    assert optimizer_state_by_name(by_name, optimizer, names) == by_name


def test_distributed_checkpoint_shapes_and_optimizer_params_read_without_loading(tmp_path):
    state = {
        "state_dict": {"a.lora_A.weight": torch.ones(2, 5), "a.lora_B.weight": torch.zeros(5, 2)},
        "optimizer_0": {
            "state": {"a.lora_A.weight": {"exp_avg": torch.ones(2, 5), "step": torch.tensor(1.0)}},
            "param_groups": [{"lr": 0.1, "params": ["a.lora_A.weight"]}],
        },
    }
    dcp.save(state, checkpoint_id=str(tmp_path))
    shapes = saved_tensor_shapes(tmp_path)
    assert {k: (tuple(v.shape), v.device.type) for k, v in shapes.items()} == {
        "a.lora_A.weight": ((2, 5), "meta"),
        "a.lora_B.weight": ((5, 2), "meta"),
    }
    assert saved_optimizer_params(tmp_path) == {0: {"a.lora_A.weight"}}


def test_full_tensors_leaves_plain_tensors_as_they_are():
    tensor = torch.arange(4.0)
    assert full_tensors({"x": tensor})["x"] is tensor


def test_qlora_under_fsdp2_is_refused_by_name_before_injection():
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_models import MLP_TARGETS, MLPModule

    from lora_lightning import LoRACallback, lora_state_dict

    module = MLPModule()
    callback = LoRACallback(target_modules=MLP_TARGETS, quantize_base="nf4")
    run = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(LoRAConfigError, match=r"quantize_base='nf4' is not supported with FSDP2"):
        callback.setup(run, module, "fit")
    assert lora_state_dict(module) == {}


def test_a_float_base_is_shardable():
    from lora_lightning import LoRAConfig
    from lora_lightning.lightning.sharded import check_shardable

    check_shardable(LoRAConfig(quantize_base="none"))  # as conf/lora/default.yaml spells it
