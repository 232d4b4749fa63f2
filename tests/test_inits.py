"""The init registry (``core.inits``) and the two-step form of a data-dependent init.

The built-in inits' maths is tested where it lives (``test_inject.py``, ``test_pissa.py``);
here: the config accepts exactly the registry's names, and an init with a ``prepare`` step
sees real batches before the adapters are built (Python API and ``LoRACallback``), and a
resume rebuilds its adapters from the checkpoint without running it again.
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import MLP_TARGETS, MLPModule, mlp_dataset
from torch import nn
from torch.utils.data import DataLoader

from lora_lightning import (
    CheckpointMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    apply_plan,
    inject_lora,
    plan_lora,
    prepare_lora,
)
from lora_lightning.core import config as config_module
from lora_lightning.core import config_of, inits
from lora_lightning.core.kinds import LINEAR

CALLS: list[int] = []


def _prepare_mean(request: inits.PrepareRequest) -> inits.Prepared:
    """A toy data-dependent init: each target's A rows are its mean input; the first target
    gets a rank that depends on the data."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            sums[name] = sums.get(name, 0) + x.mean(0)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m, _ in request.targets]
    try:
        for batch in request.batches:
            request.run(batch)
    finally:
        for handle in handles:
            handle.remove()
    CALLS.append(len(request.batches))
    first = request.targets[0][0]  # its rank depends on the data: 3 - the number of batches
    return inits.Prepared(values=sums, ranks={first: 3 - len(request.batches)})


def _mean_init(request: inits.InitRequest) -> inits.InitResult:
    a = request.prepared.reshape(1, -1).expand(request.r, -1).clone()
    return a, torch.zeros(request.shape_b), None


MEAN = inits.Init("mean", "mean", False, (LINEAR,), _mean_init, True, prepare=_prepare_mean)


@pytest.fixture
def mean_init(monkeypatch):
    monkeypatch.setattr(inits, "INITS", (*inits.INITS, MEAN))
    CALLS.clear()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()


BATCHES = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_the_config_accepts_exactly_the_registry_names():
    assert config_module.INITS == inits.init_names()
    for name in ("kaiming", "gaussian", "pissa", "olora", "pissa_niter_3"):
        assert LoRAConfig(init=name).init == name
    with pytest.raises(LoRAConfigError, match=r"'mean' is invalid.*kaiming, gaussian, pissa"):
        LoRAConfig(init="mean")


def test_a_registered_init_is_accepted_by_the_config(mean_init):
    assert LoRAConfig(init="mean").init == "mean"


def test_whether_an_init_changes_the_base_comes_from_its_entry():
    assert [LoRAConfig(init=n).changes_base for n in ("kaiming", "pissa_niter_2", "olora")] == [
        False,
        True,
        True,
    ]


def test_prepare_sees_the_batches_and_the_plan_takes_the_ranks_it_chose(mean_init):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_lora(model, LoRAConfig(r=2, init="mean", target_modules=["0", "2"]), BATCHES)
    assert [(t.name, t.r) for t in prepared.plan.targets] == [("0", 1), ("2", 2)]
    expected = sum(b.mean(0) for b in BATCHES)
    assert torch.allclose(prepared.values["0"], expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_inject_with_batches_builds_the_adapters_from_them(mean_init):
    model = _mlp()
    inject_lora(model, LoRAConfig(r=2, init="mean", target_modules=["0"]), batches=BATCHES)
    expected = sum(b.mean(0) for b in BATCHES)
    assert torch.allclose(model[0].lora_A.weight, expected.reshape(1, -1))
    assert config_of(model).rank_for("0") == 1


def test_a_data_dependent_init_without_batches_is_refused_before_any_change(mean_init):
    model = _mlp()
    with pytest.raises(LoRAConfigError, match="init='mean' initialises the adapters from"):
        inject_lora(model, LoRAConfig(init="mean", target_modules=["0"]))
    assert not hasattr(model[0], "lora_A")


def test_apply_plan_refuses_a_data_dependent_plan_without_its_values(mean_init):
    model = _mlp()
    plan = plan_lora(model, LoRAConfig(init="mean", target_modules=["0"]))
    with pytest.raises(LoRAConfigError, match="prepare_lora"):
        apply_plan(model, plan)
    assert not hasattr(model[0], "lora_A")


class _Module(MLPModule):
    def __init__(self, n: int = 16, seed_data: int = 0) -> None:
        super().__init__(n=n)
        self.seed_data = seed_data

    def _loader(self) -> DataLoader:
        return DataLoader(mlp_dataset(self.n, seed=self.seed_data), batch_size=4)


def test_the_callback_feeds_the_first_batches_and_checkpoints_the_result(tmp_path, mean_init):
    module = _Module()
    expected = sum(x.mean(0) for x, _ in list(module.train_dataloader())[:2])
    callback = LoRACallback(
        LoRAConfig(r=2, init="mean", target_modules=MLP_TARGETS),
        init_batches=2,
        init_forward=lambda m, batch: m(batch[0]),
    )
    trainer = pl.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback])  # fmt: skip
    trainer.fit(module)
    assert CALLS == [2]
    assert torch.allclose(module.net.layers[0].lora_A.weight, expected.reshape(1, -1))
    trainer.save_checkpoint(tmp_path / "step0.ckpt")
    entry = torch.load(tmp_path / "step0.ckpt", weights_only=True)["lora"]["init"]
    assert torch.allclose(entry["values"]["net.layers.0"], expected)
    assert entry["config"]["rank_pattern"] == {r"^net\.layers\.0$": 1}  # 3 - 2 batches
    assert callback.config.rank_for("net.layers.0") == 1


def test_a_resume_rebuilds_the_adapters_from_the_checkpoints_init_result(tmp_path, mean_init):
    config = LoRAConfig(r=2, init="mean", target_modules=MLP_TARGETS)
    forward = {"init_forward": lambda m, batch: m(batch[0])}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0,
                         callbacks=[LoRACallback(config, init_batches=2, **forward)])  # fmt: skip
    trainer.fit(_Module())
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    trained = torch.load(path, weights_only=True)["state_dict"]
    # One batch of other data: this run's own init finds rank 2 for net.layers.0, not 1.
    resumed = _Module(seed_data=7)
    callback = LoRACallback(config, init_batches=1, **forward)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=[callback])  # fmt: skip
    trainer.fit(resumed, ckpt_path=path)
    assert CALLS[-1] == 1  # this run's init did run, on its one batch
    assert callback.config.rank_for("net.layers.0") == 1
    assert torch.equal(resumed.net.layers[0].lora_A.weight, trained["net.layers.0.lora_A.weight"])


def test_a_resume_with_another_requested_config_is_refused(tmp_path, mean_init):
    config = LoRAConfig(r=2, init="mean", target_modules=MLP_TARGETS)
    options = {"init_batches": 2, "init_forward": lambda m, batch: m(batch[0])}
    trainer = pl.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[LoRACallback(config, **options)])  # fmt: skip
    trainer.fit(_Module())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = LoRACallback(dataclasses.replace(config, alpha=4.0), **options)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[other])  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="alpha"):
        trainer.fit(_Module(), ckpt_path=tmp_path / "a.ckpt")


def test_validating_from_a_checkpoint_rebuilds_the_adapters_without_training_batches(
    tmp_path, mean_init
):
    config = LoRAConfig(r=2, init="mean", target_modules=MLP_TARGETS)
    forward = {"init_forward": lambda m, batch: m(batch[0])}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0,
                         callbacks=[LoRACallback(config, init_batches=2, **forward)])  # fmt: skip
    trainer.fit(_Module())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    trained = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    CALLS.clear()
    module = _Module()
    callback = LoRACallback(config, init_batches=2, **forward)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback])  # fmt: skip
    trainer.validate(module, ckpt_path=tmp_path / "a.ckpt")
    assert CALLS == []  # no training batches were run
    assert torch.equal(module.net.layers[0].lora_A.weight, trained["net.layers.0.lora_A.weight"])
