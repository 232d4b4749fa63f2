"""LoRA+ (``loraplus_lr_ratio``): PEFT's optimizer groups, split in place with schedulers kept
in step, and the callback applying it to the user's optimizer, resumed exactly."""

from __future__ import annotations

import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MLP_TARGETS, MLPModule, lora_tensors, trainer
from models import conv_embed_net, tiny_bert
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRAStateError,
    apply_loraplus,
    inject_lora,
    loraplus_param_groups,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
LR, RATIO, DECAY = 1e-3, 16.0, 0.05
SCHEDULERS = torch.optim.lr_scheduler

# family -> (builder, our config, PEFT LoraConfig kwargs): Linear adapters with trained
# biases, a Linear and a LayerNorm trained in full; DoRA (1-D magnitudes); a Conv2d and an
# Embedding adapter.
FAMILIES = {
    "bert": (
        tiny_bert,
        LoRAConfig(r=4, alpha=8, bias="lora_only", modules_to_save=["classifier", "LayerNorm"]),
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value"],
         "bias": "lora_only", "modules_to_save": ["classifier", "LayerNorm"]},
    ),
    "bert_dora": (
        tiny_bert,
        LoRAConfig(r=4, alpha=8, use_dora=True),
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value"], "use_dora": True},
    ),
    "conv_embedding": (
        conv_embed_net,
        LoRAConfig(r=2, alpha=4, target_modules=["conv", "embed"], modules_to_save=["head"]),
        {"r": 2, "lora_alpha": 4, "target_modules": ["conv", "embed"],
         "modules_to_save": ["head"]},
    ),
}  # fmt: skip


def _plain_name(peft_name: str) -> str:
    """PEFT's parameter name as ours: no prefix, adapter name, wrapper or copy."""
    name = peft_name.removeprefix("base_model.model.")
    for part in (".default", ".base_layer", ".modules_to_save"):
        name = name.replace(part, "")
    name = name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    for part in ("A", "B"):  # PEFT's embedding adapters are raw parameters
        name = name.replace(f"lora_embedding_{part}", f"lora_{part}.weight")
    return name


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module, rename=str) -> list[tuple]:
    """Each non-empty group as (parameter names, lr, weight_decay). Names are sorted: the
    groups hold the same tensors in model order, and DoRA's magnitude comes before lora_A
    here (a parameter of the layer) but after lora_B in PEFT (a child module)."""
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [
        (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
        if g["params"]
    ]


def _peft_groups(family: str) -> list[tuple]:
    build, _, kwargs = FAMILIES[family]
    model = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    optimizer = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=DECAY,
        loraplus_lr_embedding=3e-6,
    )  # fmt: skip
    return _groups(optimizer, model, _plain_name)


def _ours(family: str) -> nn.Module:
    build, config, _ = FAMILIES[family]
    model = build()
    inject_lora(model, config)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_param_groups_equal_peft_create_loraplus_optimizer(family):
    model = _ours(family)
    groups = loraplus_param_groups(model, LR, RATIO, weight_decay=DECAY, lr_embedding=3e-6)
    assert _groups(torch.optim.AdamW(groups), model) == _peft_groups(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_splitting_a_one_group_optimizer_gives_peft_groups(family):
    model = _ours(family)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, weight_decay=DECAY, betas=(0.8, 0.9))
    apply_loraplus(optimizer, model, RATIO, lr_embedding=3e-6)
    assert _groups(optimizer, model) == _peft_groups(family)
    assert all(g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)  # settings copied


def test_embedding_adapters_and_b_matrices_are_told_apart_by_layer_not_name():
    model = _ours("conv_embedding")
    groups = loraplus_param_groups(model, LR, RATIO)
    names = {id(p): n for n, p in model.named_parameters()}
    listed = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert listed[1] == ["embed.lora_A.weight", "embed.lora_B.weight"]
    assert "conv.lora_B.weight" in listed[2] and "conv.lora_A.weight" in listed[0]


# A scheduler built before the split must then give every group the learning rate it would
# have had if built after: compare with one built on an optimizer made from the split groups.
SCHEDULER_CASES = {
    "lambda_warmup": lambda opt, lrs: SCHEDULERS.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3)),
    "step": lambda opt, lrs: SCHEDULERS.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt, lrs: SCHEDULERS.CosineAnnealingLR(opt, T_max=5, eta_min=1e-6),
    "one_cycle": lambda opt, lrs: SCHEDULERS.OneCycleLR(opt, max_lr=[10 * lr for lr in lrs],
                                                        total_steps=8),
    "sequential": lambda opt, lrs: SCHEDULERS.SequentialLR(
        opt, [SCHEDULERS.LinearLR(opt, 0.1, total_iters=2),
              SCHEDULERS.ExponentialLR(opt, 0.9)], milestones=[2]),
    "plateau": lambda opt, lrs: SCHEDULERS.ReduceLROnPlateau(opt, patience=0, factor=0.5),
}  # fmt: skip


def _trajectory(optimizer, scheduler, steps: int = 6) -> list[float]:
    """Every group's learning rate after each of ``steps`` steps, flat."""
    lrs = []
    for _ in range(steps):
        optimizer.step()
        if isinstance(scheduler, SCHEDULERS.ReduceLROnPlateau):
            scheduler.step(1.0)  # no improvement: every group's lr halves each step
        else:
            scheduler.step()
        lrs += [g["lr"] for g in optimizer.param_groups]
    return lrs


@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_schedulers_built_before_the_split_follow_the_new_groups(case):
    model = _ours("bert")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=LR)
    scheduler = SCHEDULER_CASES[case](optimizer, [LR])
    apply_loraplus(optimizer, model, RATIO, schedulers=[scheduler])

    groups = loraplus_param_groups(model, LR, RATIO)
    reference = torch.optim.SGD([g for g in groups if g["params"]], lr=LR)
    expected = SCHEDULER_CASES[case](reference, [g["lr"] for g in reference.param_groups])
    assert len(optimizer.param_groups) == len(reference.param_groups) == 3
    assert _trajectory(optimizer, scheduler) == pytest.approx(_trajectory(reference, expected))
    assert scheduler.state_dict().keys() == expected.state_dict().keys()


def test_an_unknown_scheduler_is_refused_by_name_and_nothing_changes():
    model = _ours("bert")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    scheduler = SCHEDULERS.CyclicLR(optimizer, base_lr=LR, max_lr=10 * LR)
    before = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(LoRAConfigError, match="CyclicLR.*loraplus_param_groups"):
        apply_loraplus(optimizer, model, RATIO, schedulers=[scheduler])
    assert optimizer.param_groups == before


def test_an_optimizer_is_split_once():
    model = _ours("bert")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    apply_loraplus(optimizer, model, RATIO)
    with pytest.raises(LoRAStateError, match="already"):
        apply_loraplus(optimizer, model, RATIO)


@pytest.mark.parametrize("value", [0, -2.0, "16", True, float("nan")])
def test_loraplus_lr_ratio_must_be_a_positive_number(value):
    with pytest.raises(LoRAConfigError, match="loraplus_lr_ratio"):
        LoRAConfig(loraplus_lr_ratio=value)


_BAD_RATES = [0, -2.0, "16", True, float("nan"), float("inf")]
_ENTRY_POINTS = {
    "config": lambda model, value: LoRAConfig(loraplus_lr_ratio=value),
    "param_groups": lambda model, value: loraplus_param_groups(model, LR, value),
    "param_groups_lr": lambda model, value: loraplus_param_groups(model, value, RATIO),
    "param_groups_embedding": lambda model, value: loraplus_param_groups(
        model, LR, RATIO, lr_embedding=value
    ),
    "apply": lambda model, value: apply_loraplus(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), model, value
    ),
    "apply_embedding": lambda model, value: apply_loraplus(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
        model,
        RATIO,
        lr_embedding=value,
    ),
}


@pytest.mark.parametrize("value", _BAD_RATES)
@pytest.mark.parametrize("entry", _ENTRY_POINTS)
def test_every_loraplus_entry_point_refuses_a_rate_that_is_not_finite_and_positive(entry, value):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(LoRAConfigError, match="expected a finite number > 0"):
        _ENTRY_POINTS[entry](model, value)


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_loraplus_param_groups_refuses_a_weight_decay_that_is_not_finite_and_non_negative(value):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(LoRAConfigError, match="weight_decay"):
        loraplus_param_groups(model, LR, RATIO, weight_decay=value)


def test_loraplus_is_off_by_default_with_peft_embedding_rate():
    config = LoRAConfig()
    assert config.loraplus_lr_ratio is None and config.loraplus_lr_embedding == 1e-6
    with pytest.raises(LoRAConfigError, match="loraplus_lr_embedding"):
        LoRAConfig(loraplus_lr_embedding=0)


# --- the callback ---------------------------------------------------------------------------
def _callback(**kwargs) -> LoRACallback:
    return LoRACallback(target_modules=MLP_TARGETS, r=2, **kwargs)


def test_callback_splits_the_users_groups_and_keeps_their_lambdas(tmp_path):
    module = MLPModule(optim="groups")  # two groups, LambdaLR [0.5**step, 1.0]
    trainer(tmp_path, [_callback(loraplus_lr_ratio=4.0)], max_steps=3).fit(module)
    optimizer = module.configured["optimizer"]
    names = {id(p): n for n, p in module.named_parameters()}
    listed = [
        [names[id(p)].rsplit(".", 2)[-2] for p in g["params"]] for g in optimizer.param_groups
    ]
    assert listed == [["lora_A", "lora_A"], ["lora_B", "lora_B"], []]
    decay = 0.5**3
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([module.lr * decay, 4 * module.lr * decay, module.lr / 10])


def test_callback_records_loraplus_in_checkpoints_and_resumes_exactly(tmp_path):
    straight = MLPModule()  # Adam + a per-step StepLR
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    run = trainer(tmp_path, [_callback(loraplus_lr_ratio=8.0), checkpoint], max_epochs=3)
    run.fit(straight)
    halfway = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(halfway, weights_only=True)
    assert saved["lora"]["config"]["loraplus_lr_ratio"] == 8.0
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2

    resumed = MLPModule()
    again = trainer(tmp_path / "resumed", [_callback(loraplus_lr_ratio=8.0)], max_epochs=3)
    again.fit(resumed, ckpt_path=halfway)
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert all(torch.equal(actual[k], v) for k, v in expected.items())
    assert (
        again.optimizers[0].state_dict()["param_groups"]
        == run.optimizers[0].state_dict()["param_groups"]
    )
    scheduler = again.lr_scheduler_configs[0].scheduler.state_dict()
    assert scheduler == run.lr_scheduler_configs[0].scheduler.state_dict()
    assert len(scheduler["base_lrs"]) == 2
