"""LoRACallback in single-process Lightning runs (CPU, tiny models, a few steps each).

Setup/injection, optimizer restriction for every ``configure_optimizers`` return form,
logging, trimmed checkpoints, exact resume and its refusals, adapter export (PEFT-loadable),
``merge_on_end`` and gradient checkpointing. Multi-process DDP is in test_callback_ddp.py.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import (
    MLP_TARGETS,
    BertHeadModule,
    BertModule,
    MLPModule,
    RecordingLogger,
    ResumableMLPModule,
    TiedHeadModule,
    TwoOptimizerModule,
    lora_tensors,
    mlp_dataset,
    token_dataset,
    trainer,
)
from models import tiny_bert
from safetensors.torch import load_file
from torch import nn

from lora_lightning import (
    CheckpointMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
)
from lora_lightning.core import adapted_layers
from lora_lightning.lightning import base_fingerprint
from lora_lightning.lightning.rng import gather_rng_states, restore_rng_states

ADAPTERS = {f"net.layers.{i}.lora_{ab}.weight" for i in (0, 1) for ab in ("A", "B")}


def make_callback(**kwargs) -> LoRACallback:
    kwargs.setdefault("target_modules", MLP_TARGETS)
    kwargs.setdefault("r", 2)
    return LoRACallback(**kwargs)


def trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def by_id(params) -> set[int]:
    return {id(p) for p in params}


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def outputs(module: torch.nn.Module) -> torch.Tensor:
    x = mlp_dataset(8, seed=5).tensors[0]
    module.eval()
    with torch.no_grad():
        return module(x)


def fresh_injected(seed: int = 0, **config) -> MLPModule:
    """What a fresh MLPModule looks like right after the callback's setup (nothing loaded)."""
    module = MLPModule(seed=seed)
    inject_lora(module, LoRAConfig(target_modules=MLP_TARGETS, r=config.pop("r", 2), **config))
    return module


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ------------------------------------------------------------------------------ setup


def test_setup_injects_once_across_fit_validate_test_and_refit(tmp_path):
    module, callback = MLPModule(), make_callback()
    run = trainer(tmp_path, [callback], max_steps=2)
    run.fit(module)
    params = dict(module.named_parameters())
    hooks = [len(layer._forward_hooks) for layer in module.net.layers]
    run.validate(module, verbose=False)
    run.test(module, verbose=False)
    trainer(tmp_path, [callback], max_steps=4).fit(module)

    again = dict(module.named_parameters())
    assert again.keys() == params.keys()
    assert all(again[name] is params[name] for name in params)  # the same adapter objects
    assert {n for n in again if ".lora_" in n} == ADAPTERS
    assert [len(layer._forward_hooks) for layer in module.net.layers] == hooks == [1, 1, 0]
    assert [name for name, _, _ in adapted_layers(module)] == ["net.layers.0", "net.layers.1"]


def test_second_callback_with_same_config_reuses_the_adapters(tmp_path):
    module = MLPModule()
    trainer(tmp_path, [make_callback()], max_steps=1).fit(module)
    params = dict(module.named_parameters())
    trainer(tmp_path, [make_callback()], max_steps=2).fit(module)
    assert all(p is params[name] for name, p in module.named_parameters())
    assert sum(len(layer._forward_hooks) for layer in module.net.layers) == 2


@pytest.mark.parametrize(
    ("options", "extra"),
    [
        ({}, set()),
        ({"bias": "lora_only"}, {"net.layers.0.bias", "net.layers.1.bias"}),
        ({"bias": "all"}, {f"net.layers.{i}.bias" for i in range(3)}),
        ({"modules_to_save": [r"net\.layers\.2"]}, {"net.layers.2.weight", "net.layers.2.bias"}),
    ],
    ids=["bias-none", "bias-lora_only", "bias-all", "modules_to_save"],
)
def test_only_lora_parameters_require_grad_when_optimizers_are_built(tmp_path, options, extra):
    module = MLPModule()
    trainer(tmp_path, [make_callback(**options)], max_steps=1).fit(module)
    seen = module.requires_grad_at_configure
    assert seen is not None
    assert {name for name, flag in seen.items() if flag} == ADAPTERS | extra
    assert trainable(module) == ADAPTERS | extra


# ------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("form", ["single", "list", "tuple", "dict", "groups"])
def test_optimizers_get_only_trainable_parameters(tmp_path, form):
    module = MLPModule(optim=form)
    run = trainer(tmp_path, [make_callback()], max_steps=2)
    run.fit(module)
    (optimizer,) = run.optimizers
    # The user's own optimizer object, edited in place (schedulers still point at it).
    assert any(optimizer is o for o in _optimizers_in(module.configured))
    assert by_id(optimizer_params(optimizer)) == by_id(
        p for n, p in module.named_parameters() if n in ADAPTERS
    )


def _optimizers_in(value) -> list:
    if isinstance(value, torch.optim.Optimizer):
        return [value]
    if isinstance(value, dict):
        return _optimizers_in(value.get("optimizer"))
    if isinstance(value, (list, tuple)):
        return [o for item in value for o in _optimizers_in(item)]
    return []


def test_adamw_over_all_parameters_keeps_no_state_for_frozen_weights(tmp_path):
    module = MLPModule(optim="adamw")
    frozen_before = {
        n: p.detach().clone() for n, p in module.named_parameters()
    }  # before injection: base weights only
    run = trainer(tmp_path, [make_callback()], max_steps=3)
    run.fit(module)
    (optimizer,) = run.optimizers
    lora_params = by_id(p for n, p in module.named_parameters() if n in ADAPTERS)
    assert by_id(optimizer_params(optimizer)) == lora_params
    assert by_id(optimizer.state) == lora_params
    # AdamW's decoupled weight decay never touched a frozen weight.
    for name, before in frozen_before.items():
        assert torch.equal(module.get_parameter(name).detach(), before), name


@pytest.mark.parametrize(
    ("form", "epochs", "expected_lrs"),
    [
        ("tuple", 3, [0.05 * 0.5**3]),  # StepLR per epoch
        ("dict", 2, [0.05 * 0.5**8]),  # StepLR per step, 4 steps an epoch
        ("groups", 1, [0.05 * 0.5**4, 0.005]),  # LambdaLR per group; the empty group stays
    ],
)
def test_schedulers_still_drive_the_restricted_optimizer(tmp_path, form, epochs, expected_lrs):
    module = MLPModule(optim=form)
    run = trainer(tmp_path, [make_callback()], max_epochs=epochs)
    run.fit(module)
    (optimizer,) = run.optimizers
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == pytest.approx(expected_lrs, rel=1e-12)
    assert run.lr_scheduler_configs[0].scheduler.optimizer is optimizer


def test_two_optimizers_with_manual_optimization(tmp_path):
    module = TwoOptimizerModule()
    before = lora_tensors(fresh_injected())
    run = trainer(tmp_path, [make_callback()], max_epochs=1)  # 4 batches
    run.fit(module)
    opt_a, opt_b = run.optimizers
    named = dict(module.named_parameters())
    layer = "net.layers.{}.lora_{}.weight"
    assert by_id(optimizer_params(opt_a)) == by_id(named[layer.format(0, x)] for x in "AB")
    assert by_id(optimizer_params(opt_b)) == by_id(named[layer.format(1, x)] for x in "AB")
    after = lora_tensors(module)
    assert all(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)  # its StepLR, per batch
    assert opt_b.param_groups[0]["lr"] == 0.05


def test_optimizer_left_without_trainable_parameters_is_an_error(tmp_path):
    run = trainer(tmp_path, [make_callback()], max_steps=1)
    with pytest.raises(LoRAConfigError, match=r"optimizer 0 \(SGD\) has no trainable parameter"):
        run.fit(MLPModule(optim="frozen_only"))


# ---------------------------------------------------------------------------- logging


def test_counts_reach_every_logger_as_hyperparameters(tmp_path):
    module, recording = MLPModule(), RecordingLogger()
    csv = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [make_callback()], max_steps=1, logger=[recording, csv]).fit(module)

    counts = count_parameters(module)
    expected = {
        "lora/trainable_params": counts.trainable,
        "lora/total_params": counts.total,
        "lora/adapter_params": counts.adapter,
        "lora/adapted_modules": 2,
        "lora/r": 2,
    }
    assert (
        counts.trainable
        == counts.adapter
        == sum(p.numel() for n, p in module.named_parameters() if n in ADAPTERS)
    )
    logged = [call for call in recording.hparams_calls if "lora/trainable_params" in call]
    assert len(logged) == 1
    assert expected.items() <= logged[0].items()
    saved = yaml.safe_load((Path(csv.log_dir) / "hparams.yaml").read_text())
    assert expected.items() <= saved.items()


def test_counts_reach_the_loggers_of_a_later_trainer(tmp_path):
    module, callback = MLPModule(), make_callback()
    first, second = RecordingLogger(), RecordingLogger()
    trainer(tmp_path, [callback], max_steps=1, logger=first).fit(module)
    trainer(tmp_path, [callback], logger=second).validate(module, verbose=False)
    for logger in (first, second):
        assert sum("lora/trainable_params" in call for call in logger.hparams_calls) == 1


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_summary_table_is_printed_once(tmp_path):
    handler = _ListHandler()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    try:
        module, callback = MLPModule(), make_callback()
        run = trainer(tmp_path, [callback], max_steps=1)
        run.fit(module)
        run.validate(module, verbose=False)
        trainer(tmp_path, [callback], max_steps=2).fit(module)
    finally:
        lightning_logger.removeHandler(handler)
    summaries = [m for m in handler.messages if m.startswith("LoRA summary")]
    assert len(summaries) == 1
    assert "trainable_params" in summaries[0] and "adapted_modules    2" in summaries[0]


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_holds_only_trainable_tensors_and_lora_metadata(tmp_path):
    module, callback = MLPModule(), make_callback(modules_to_save=[r"net\.layers\.2"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer(tmp_path, [callback, checkpoint], max_epochs=1).fit(module)
    saved = load_ckpt(Path(checkpoint.best_model_path))

    expected = ADAPTERS | {"net.layers.2.weight", "net.layers.2.bias"}
    assert set(saved["state_dict"]) == expected
    assert saved["lora"]["config"] == callback.config.to_dict()
    assert saved["lora"]["base_fingerprint"] == callback.fingerprint
    (optimizer_state,) = saved["optimizer_states"]
    assert len(optimizer_state["state"]) == len(expected)  # Adam moments for trainable only
    assert sum(len(g["params"]) for g in optimizer_state["param_groups"]) == len(expected)


def test_weights_only_checkpoint_is_trimmed_too(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    callback = make_callback()
    trainer(tmp_path, [callback, checkpoint], max_epochs=1).fit(MLPModule())
    saved = load_ckpt(Path(checkpoint.best_model_path))
    assert set(saved["state_dict"]) == ADAPTERS
    assert saved["lora"]["base_fingerprint"] == callback.fingerprint
    assert "optimizer_states" not in saved


def test_a_test_run_without_a_checkpoint_skips_the_base_fingerprint(tmp_path):
    callback = make_callback()
    trainer(tmp_path, [callback]).test(MLPModule(), verbose=False)
    assert callback.fingerprint is None  # nothing to write or load: no checksum of the base


def test_a_checkpoint_saved_outside_fit_still_carries_the_base_fingerprint(tmp_path):
    module, callback = MLPModule(), make_callback()
    run = trainer(tmp_path, [callback])
    run.validate(module, verbose=False)
    run.save_checkpoint(tmp_path / "validated.ckpt")
    expected = MLPModule()
    inject_lora(expected, LoRAConfig(target_modules=MLP_TARGETS, r=2))
    saved = load_ckpt(tmp_path / "validated.ckpt")
    assert saved["lora"]["base_fingerprint"] == base_fingerprint(expected)


def _state(run) -> dict:
    optimizer = run.optimizers[0].state_dict()
    return {
        "step": run.global_step,
        "moments": {
            (index, key): value
            for index, state in optimizer["state"].items()
            for key, value in state.items()
        },
        "groups": [{k: v for k, v in g.items()} for g in optimizer["param_groups"]],
        "scheduler": run.lr_scheduler_configs[0].scheduler.state_dict(),
    }


def test_resume_is_bit_exact(tmp_path):
    straight = MLPModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    run = trainer(tmp_path, [make_callback(), checkpoint], max_epochs=4)
    run.fit(straight)
    halfway = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    assert halfway.is_file()

    resumed = MLPModule()  # a fresh model from the same seed
    again = trainer(tmp_path / "resumed", [make_callback()], max_epochs=4)
    again.fit(resumed, ckpt_path=halfway)

    assert_same_tensors(lora_tensors(resumed), lora_tensors(straight))
    assert again.global_step == run.global_step == 16
    expected, actual = _state(run), _state(again)
    assert actual["step"] == expected["step"]
    assert actual["groups"] == expected["groups"]
    assert actual["scheduler"] == expected["scheduler"]
    assert actual["moments"].keys() == expected["moments"].keys()
    for key, value in expected["moments"].items():
        assert torch.equal(actual["moments"][key], value), key


def test_mid_epoch_resume_with_dropout_is_bit_exact_with_the_callback_alone(tmp_path):
    """A plain Trainer with LoRACallback (dropout on, so every step draws random masks),
    resumed with ckpt_path= from a checkpoint taken in the middle of an epoch."""
    straight = ResumableMLPModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2)
    run = trainer(tmp_path, [make_callback(dropout=0.5), checkpoint], max_epochs=2)
    run.fit(straight)
    mid_epoch = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"  # 4 batches per epoch

    resumed = ResumableMLPModule()
    again = trainer(tmp_path / "resumed", [make_callback(dropout=0.5)], max_epochs=2)
    again.fit(resumed, ckpt_path=mid_epoch)

    assert again.global_step == run.global_step == 8
    assert_same_tensors(lora_tensors(resumed), lora_tensors(straight))
    expected, actual = _state(run), _state(again)
    assert actual["step"] == expected["step"]
    assert actual["moments"].keys() == expected["moments"].keys()
    for key, value in expected["moments"].items():
        assert torch.equal(actual["moments"][key], value), key


def test_rng_states_of_another_world_size_are_not_restored_with_a_warning():
    saved = gather_rng_states()
    two_ranks = {"world_size": 2, "states": saved["states"] * 2}
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="random state of 2 process"):
        assert not restore_rng_states(two_ranks, rank=0, world_size=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> Path:
    """A one-epoch LoRA checkpoint (r=2 on net.layers.0/1 of MLPModule(seed=0))."""
    root = tmp_path_factory.mktemp("lora_ckpt")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt")
    trainer(root, [make_callback(), checkpoint], max_epochs=1).fit(MLPModule())
    return Path(checkpoint.best_model_path)


def _assert_nothing_loaded(module: MLPModule, reference: MLPModule) -> None:
    assert_same_tensors(
        {k: v.detach() for k, v in module.state_dict().items()},
        {k: v.detach() for k, v in reference.state_dict().items()},
    )


def test_resume_with_another_config_is_refused(tmp_path, lora_checkpoint):
    module = MLPModule()
    run = trainer(tmp_path, [make_callback(r=4)], max_epochs=2)
    with pytest.raises(
        CheckpointMismatchError, match=r"another LoRA config.*r: checkpoint 2 vs now 4"
    ):
        run.fit(module, ckpt_path=lora_checkpoint)
    _assert_nothing_loaded(module, fresh_injected(r=4))


def test_resume_with_another_alpha_is_refused(tmp_path, lora_checkpoint):
    module = MLPModule()
    run = trainer(tmp_path, [make_callback(alpha=4)], max_epochs=2)
    with pytest.raises(CheckpointMismatchError, match=r"alpha: checkpoint 16\.0 vs now 4"):
        run.fit(module, ckpt_path=lora_checkpoint)
    _assert_nothing_loaded(module, fresh_injected(alpha=4))


def test_resume_onto_another_base_is_refused(tmp_path, lora_checkpoint):
    module = MLPModule(seed=1)
    run = trainer(tmp_path, [make_callback()], max_epochs=2)
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        run.fit(module, ckpt_path=lora_checkpoint)
    _assert_nothing_loaded(module, fresh_injected(seed=1))


def test_resume_with_a_missing_adapter_key_is_refused(tmp_path, lora_checkpoint):
    edited = load_ckpt(lora_checkpoint)
    del edited["state_dict"]["net.layers.1.lora_B.weight"]
    path = tmp_path / "edited.ckpt"
    torch.save(edited, path)
    module = MLPModule()
    run = trainer(tmp_path, [make_callback()], max_epochs=2)
    with pytest.raises(
        CheckpointMismatchError, match=r"missing 1 .*net\.layers\.1\.lora_B\.weight"
    ):
        run.fit(module, ckpt_path=path)
    _assert_nothing_loaded(module, fresh_injected())  # not even the keys that were there


def test_resume_from_a_checkpoint_without_lora_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "plain")
    trainer(tmp_path, [checkpoint], max_epochs=1).fit(MLPModule(optim="single"))
    module = MLPModule()
    run = trainer(tmp_path, [make_callback()], max_epochs=2)
    with pytest.raises(CheckpointMismatchError, match="not written by a run with LoRACallback"):
        run.fit(module, ckpt_path=checkpoint.best_model_path)
    _assert_nothing_loaded(module, fresh_injected())


def test_resume_with_a_tied_weight_in_modules_to_save(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    # PEFT would untie it, so no adapter files (see test_checkpoints: refused at setup).
    options = {
        "modules_to_save": ["alias"],
        "export_on_checkpoint": False,
        "export_on_train_end": False,
    }
    straight = TiedHeadModule()
    trainer(tmp_path, [make_callback(**options), checkpoint], max_epochs=1).fit(straight)
    assert "alias.weight" in load_ckpt(Path(checkpoint.best_model_path))["state_dict"]

    resumed = TiedHeadModule()
    run = trainer(tmp_path / "resumed", [make_callback(**options)], max_epochs=1)
    run.fit(resumed, ckpt_path=checkpoint.best_model_path)
    assert_same_tensors(lora_tensors(resumed), lora_tensors(straight))


# ---------------------------------------------------------------------- adapter export


def _no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_adapter_is_written_next_to_each_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer(tmp_path, [make_callback(), checkpoint], max_epochs=2).fit(MLPModule())
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    for path in checkpoints:
        adapter = path.with_name(f"{path.stem}_adapter")
        assert {p.name for p in adapter.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
        fresh = MLPModule()
        load_adapter(fresh, adapter)
        assert_same_tensors(lora_tensors(fresh), load_ckpt(path)["state_dict"])
    assert _no_temp_files(tmp_path)


def test_adapter_is_removed_with_its_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="epoch_score", mode="max", save_top_k=1
    )
    trainer(tmp_path, [make_callback(), checkpoint], max_epochs=3).fit(MLPModule())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=2-step=12.ckpt",
        "epoch=2-step=12_adapter",
    ]


def test_final_adapter_reproduces_the_trained_module(tmp_path):
    module = MLPModule()
    callback = make_callback(adapter_dir=tmp_path / "final")
    trainer(tmp_path, [callback], max_epochs=2).fit(module)
    assert callback.last_adapter_dir == tmp_path / "final"
    fresh = MLPModule()
    assert load_adapter(fresh, tmp_path / "final") == ["net.layers.0", "net.layers.1"]
    assert not torch.equal(outputs(fresh), outputs(MLPModule()))  # training changed something
    assert torch.equal(outputs(fresh), outputs(module))
    assert _no_temp_files(tmp_path)


def test_final_adapter_goes_to_default_root_dir_by_default(tmp_path):
    trainer(tmp_path, [make_callback()], max_steps=1).fit(MLPModule())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_hf_model_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    import peft

    module = BertModule()
    callback = LoRACallback(
        r=2, modules_to_save=[r"model\.classifier"], adapter_dir=tmp_path / "bert"
    )
    trainer(tmp_path, [callback], max_steps=2).fit(module)

    keys = set(load_file(tmp_path / "bert" / "adapter_model.safetensors"))
    assert keys and all(
        k.startswith(("base_model.model.bert.", "base_model.model.classifier.")) for k in keys
    )
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    loaded = peft.PeftModel.from_pretrained(tiny_bert(0), tmp_path / "bert").eval()
    ids = token_dataset(4, seed=9).tensors[0]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = module.eval()(ids)
        actual = loaded(input_ids=ids, attention_mask=mask).logits
        stock = tiny_bert(0)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(stock, expected)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_head_outside_the_hf_model_is_exported_with_the_adapter(tmp_path):
    module = BertHeadModule()
    callback = LoRACallback(r=2, modules_to_save=["head"], adapter_dir=tmp_path / "out")
    trainer(tmp_path, [callback], max_steps=2).fit(module)
    fresh = BertHeadModule()
    load_adapter(fresh, tmp_path / "out")
    ids = token_dataset(4, seed=9).tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), module.eval()(ids))


def test_merge_on_end_writes_weights_that_reproduce_the_trained_outputs(tmp_path):
    module = MLPModule()
    callback = make_callback(adapter_dir=tmp_path / "out", merge_on_end=True)
    trainer(tmp_path, [callback], max_epochs=2).fit(module)

    merged = load_file(tmp_path / "out" / "merged_model.safetensors")
    plain = MLPModule(seed=7)  # other weights: everything must come from the file
    plain.load_state_dict(merged, strict=True)
    expected = outputs(module)
    torch.testing.assert_close(outputs(plain), expected, rtol=1e-5, atol=1e-6)
    assert not any(spec.merged for _, _, spec in adapted_layers(module))  # still trainable
    assert trainable(module) == ADAPTERS


def test_merge_on_end_leaves_the_trained_base_weights_bit_exact(tmp_path):
    module = MLPModule()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    callback = make_callback(adapter_dir=tmp_path / "out", merge_on_end=True)
    trainer(tmp_path, [callback], max_epochs=2).fit(module)
    after = module.state_dict()
    assert_same_tensors({k: after[k] for k in base}, base)


# ------------------------------------------------------------------ gradient checkpointing


def _checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


@pytest.mark.parametrize(
    ("kwargs", "drop_hf_input_grads"),
    [(None, False), ({"use_reentrant": True}, False), ({"use_reentrant": True}, True)],
    ids=["default", "reentrant", "reentrant-without-hf-input-grads"],
)
def test_gradient_checkpointing_trains_the_adapters(tmp_path, kwargs, drop_hf_input_grads):
    module = BertModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if drop_hf_input_grads:  # as with transformers releases that did not add this hook
        module.model.disable_input_require_grads()
    callback = LoRACallback(r=2, export_on_train_end=False)
    run = trainer(tmp_path, [callback], max_steps=2)
    run.fit(module)
    assert run.global_step == 2
    assert _checkpointing(module.model)
    changed = [k for k, v in lora_state_dict(module).items() if "lora_B" in k and v.abs().sum() > 0]
    assert len(changed) == 6  # query/key/value in 2 layers


def test_merge_on_end_is_refused_under_fsdp_before_anything_is_injected():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = MLPModule()
    callback = LoRACallback(target_modules=MLP_TARGETS, merge_on_end=True)
    with pytest.raises(LoRAConfigError, match=r"merge_on_end=True\) is not supported under FSDP"):
        callback.setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")
    assert not list(adapted_layers(module))


class DirectWeightModule(MLPModule):
    """Computes ``net.layers.1`` from its weight with F.linear instead of calling the layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, last = self.net.layers
        x = torch.relu(first(x))
        x = torch.relu(torch.nn.functional.linear(x, second.weight, second.bias))
        return last(x)


def test_an_adapter_whose_layer_is_never_called_is_named_after_the_first_backward(tmp_path):
    callback = LoRACallback(r=2, target_modules=MLP_TARGETS)
    with pytest.warns(UserWarning, match=r"1 of 2 adapted module\(s\) got no gradient.*layers\.1"):
        trainer(tmp_path, [callback], max_steps=2).fit(DirectWeightModule())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*got no gradient.*")
        trainer(tmp_path / "plain", [LoRACallback(r=2, target_modules=MLP_TARGETS)],
                max_steps=2).fit(MLPModule())  # fmt: skip


class _LayersInInit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)


class _LayersInConfigureModel(_LayersInInit):
    def configure_model(self) -> None:
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("module", "advised"), [(_LayersInInit, False), (_LayersInConfigureModel, True)]
)
def test_unmatched_target_advises_about_configure_model_only_when_the_module_overrides_it(
    module, advised
):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    callback = LoRACallback(target_modules=["head"])
    with pytest.raises(LoRAConfigError) as info:
        callback.setup(trainer, module(), "fit")
    assert ("configure_model" in str(info.value)) is advised
