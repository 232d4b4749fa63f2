"""Checkpoints of LoRA runs: every malformed or tampered form, resume loading (a checkpoint
of another base is refused; the fingerprint itself is ``test_fingerprint.py``'s), callback
options checked before training, and ``torch.compile``d models.

Each malformed form is tried twice: through a real ``Trainer.fit(ckpt_path=...)`` resume (a
:class:`CheckpointMismatchError` naming what is wrong, before any training step) and as a
pure-function test of ``lora_lightning.lightning.checkpoint`` without a Trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MLP_TARGETS, MLPModule, lora_tensors, trainer
from safetensors.torch import load_file
from torch import nn

from lora_lightning import CheckpointMismatchError, LoRACallback, LoRAConfig, LoRAConfigError
from lora_lightning.core import inject_lora, lora_state_dict
from lora_lightning.lightning import checkpoint as ckpt
from lora_lightning.lightning.checkpoint import (
    check_checkpoint_form,
    check_optimizer_states,
    clean_name,
    lora_metadata,
    trim_checkpoint,
    validate_checkpoint,
    without_wrappers,
)
from lora_lightning.lightning.checkpoint_io import AdapterExportingIO
from lora_lightning.lightning.fingerprint import base_fingerprint

LORA = {"r": 2, "target_modules": MLP_TARGETS}
CONFIG = LoRAConfig(**LORA)
ADAPTERS = {f"net.layers.{i}.lora_{ab}.weight" for i in (0, 1) for ab in ("A", "B")}


class CountingModule(MLPModule):
    """MLPModule counting its training steps."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


class QuietModule(MLPModule):
    """MLPModule without ``self.log`` in ``training_step`` (dynamo cannot trace the logging
    of a whole compiled LightningModule in this torch/Lightning pair, LoRA or not)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def injected(seed: int = 0) -> MLPModule:
    module = MLPModule(seed=seed)
    inject_lora(module, CONFIG)
    return module


# ============================================================== pure functions, no Trainer


def good_checkpoint(module: nn.Module) -> dict:
    """What the callback writes for ``module`` (injected with CONFIG): trimmed, with metadata
    and the training state of one Adam over the trainable tensors."""
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad])
    checkpoint = {
        "epoch": 0,
        "global_step": 4,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
        "loops": {"fit_loop": {}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
    }
    metadata = lora_metadata(
        CONFIG, base_fingerprint(module), ckpt.adapted_module_names(module), ""
    )
    trim_checkpoint(checkpoint, lora_state_dict(module), metadata)
    return checkpoint


def _set(path: str, value: Any) -> Callable[[dict], None]:
    *parents, last = path.split("/")

    def mutate(checkpoint: dict) -> None:
        target = checkpoint
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    *parents, last = path.split("/")

    def mutate(checkpoint: dict) -> None:
        target = checkpoint
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


def _replace(value: Any) -> Callable[[dict], Any]:
    return lambda checkpoint: value


def _nan(checkpoint: dict) -> None:
    checkpoint["state_dict"]["net.layers.1.lora_B.weight"][0, 0] = float("inf")


A0 = "state_dict/net.layers.0.lora_A.weight"

# (mutation of a good checkpoint, texts the error must contain); a mutation returning a value
# replaces the whole checkpoint.
MALFORMED = [
    pytest.param(_replace(torch.zeros(3)), ["holds a tensor of shape (3,)", "not a Lightning checkpoint dict"], id="bare-tensor"),
    pytest.param(_replace({}), ["holds an empty dict", "Trainer.save_checkpoint"], id="empty-dict"),
    pytest.param(_replace([1, 2]), ["holds a list", "not a Lightning checkpoint dict"], id="list"),
    pytest.param(_drop("pytorch-lightning_version"), ["no valid 'pytorch-lightning_version'", "found None"], id="no-lightning-version"),
    pytest.param(_set("pytorch-lightning_version", "garbage!"), ["no valid 'pytorch-lightning_version'", "'garbage!'"], id="bad-lightning-version"),
    pytest.param(_drop("lora"), ["not written by a run with LoRACallback"], id="no-lora-entry"),
    pytest.param(_set("lora", "x"), ["'lora' entry is a str", "adapted_modules"], id="lora-not-a-dict"),
    pytest.param(_set("lora", {}), ["'config' is missing", "'base_fingerprint' is missing", "'adapted_modules' is missing"], id="lora-empty"),
    pytest.param(_set("lora/config", [1]), ["'config' is a list, expected a mapping"], id="config-a-list"),
    pytest.param(_set("lora/config/r", -1), ["LoRA config is not a valid config", "r=-1", "expected an integer >= 1"], id="config-r-negative"),
    pytest.param(_set("lora/config/r", "2"), ["not a valid config", "r='2'"], id="config-r-a-string"),
    pytest.param(_set("lora/config/dropout", 2.0), ["not a valid config", "dropout"], id="config-dropout-out-of-range"),
    pytest.param(_set("lora/config/bogus", 1), ["not a valid config", "unknown LoRA config field(s) ['bogus']"], id="config-unknown-field"),
    pytest.param(_set("lora/config/r", 4), ["another LoRA config", "r: checkpoint 4 vs now 2"], id="config-other-rank"),
    pytest.param(_set("lora/adapted_modules", "net.layers.0"), ["'adapted_modules' is a str, expected a list"], id="adapted-not-a-list"),
    pytest.param(_set("lora/adapted_modules", [0, 1]), ["'adapted_modules' holds non-string entries"], id="adapted-not-strings"),
    pytest.param(_set("lora/adapted_modules", ["net.layers.0"]), ["adapted 1 module(s), this model 2", "only now ['net.layers.1']"], id="adapted-fewer"),
    pytest.param(_set("lora/adapted_modules", ["net.layers.1", "net.layers.0"]), ["another order"], id="adapted-reordered"),
    pytest.param(_set("lora/adapted_modules", ["net.layers.0", "net.layers.1", "net.layers.2"]), ["only in the checkpoint ['net.layers.2']"], id="adapted-more"),
    pytest.param(_drop("lora/base_fingerprint"), ["'base_fingerprint' is missing"], id="fingerprint-missing"),
    pytest.param(_set("lora/base_fingerprint", 5), ["'base_fingerprint' is an int, expected a string"], id="fingerprint-an-int"),
    pytest.param(_set("lora/base_fingerprint", "0" * 32), ["another base model", "load the same pretrained base"], id="fingerprint-other"),
    pytest.param(_set("lora/format", 1), ["format 1", "older lora_lightning", "load_adapter"], id="format-older"),
    pytest.param(_set("lora/format", 9), ["format 9", "newer lora_lightning"], id="format-newer"),
    pytest.param(_set("lora/format", "2"), ["'format' is a str, expected an integer"], id="format-a-string"),
    pytest.param(_set("lora/export_root", None), ["'export_root' is None, expected a string"], id="export-root-none"),
    pytest.param(_drop("state_dict"), ["'state_dict' is None, not a mapping of tensors"], id="state-dict-missing"),
    pytest.param(_set("state_dict", [1]), ["'state_dict' is a list"], id="state-dict-a-list"),
    pytest.param(_drop(A0), ["missing 1 trainable tensor(s)", "net.layers.0.lora_A.weight"], id="adapter-missing"),
    pytest.param(_set("state_dict/net.layers.9.weight", torch.zeros(1)), ["unexpected 1", "net.layers.9.weight"], id="unknown-key"),
    pytest.param(_set(A0, torch.zeros(3, 3)), ["net.layers.0.lora_A.weight has shape (3, 3), model (2, 6)"], id="wrong-shape"),
    pytest.param(_set(A0, torch.zeros(2, 6, 1)), ["has shape (2, 6, 1), model (2, 6)"], id="extra-dimension"),
    pytest.param(_set(A0, torch.tensor(0.5)), ["has shape (), model (2, 6)"], id="zero-dim-tensor"),
    pytest.param(_set(A0, [[0.0] * 6] * 2), ["net.layers.0.lora_A.weight is a list"], id="non-tensor-list"),
    pytest.param(_set(A0, None), ["net.layers.0.lora_A.weight is None"], id="non-tensor-none"),
    pytest.param(_set(A0, torch.zeros(2, 6, dtype=torch.bool)), ["has dtype torch.bool, model torch.float32"], id="bool-tensor"),
    pytest.param(_nan, ["net.layers.1.lora_B.weight holds NaN or Inf values"], id="non-finite"),
    pytest.param(_drop("optimizer_states"), ["no optimizer or learning-rate scheduler state", "save_weights_only=True"], id="no-optimizer-state"),
    pytest.param(_drop("lr_schedulers"), ["no optimizer or learning-rate scheduler state"], id="no-scheduler-state"),
    pytest.param(_set("optimizer_states", {"state": {}}), ["'optimizer_states' is a dict, not a list"], id="optimizer-states-a-dict"),
    pytest.param(_set("optimizer_states", [5]), ["optimizer state 0 is an int, not a dict"], id="optimizer-state-an-int"),
    pytest.param(_set("lr_schedulers", [None]), ["'lr_schedulers' is a list, not a list of dicts"], id="scheduler-state-none"),
    pytest.param(_set("loops", {}), ["'loops' is an empty dict without a 'fit_loop' dict"], id="loops-without-fit-loop"),
]  # fmt: skip


def _mutated(mutate: Callable[[dict], Any], checkpoint: dict) -> Any:
    result = mutate(checkpoint)
    return checkpoint if result is None else result


@pytest.mark.parametrize(("mutate", "texts"), MALFORMED)
def test_validate_checkpoint_refuses_malformed_forms(mutate, texts):
    module = injected()
    checkpoint = _mutated(mutate, good_checkpoint(module))
    with pytest.raises(CheckpointMismatchError) as raised:
        validate_checkpoint(checkpoint, module, CONFIG, base_fingerprint(module), training=True)
    for text in texts:
        assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"


def test_validate_checkpoint_accepts_the_good_one_and_keeps_trainable_tensors_only():
    module = injected()
    checkpoint = good_checkpoint(module)
    base = module.state_dict()
    for name in ("net.layers.0.weight", "net.layers.2.weight", "net.layers.2.bias"):
        checkpoint["state_dict"][name] = torch.full_like(base[name], 7.0)  # frozen base values

    validate_checkpoint(checkpoint, module, CONFIG, base_fingerprint(module), training=True)

    assert set(checkpoint["state_dict"]) == ADAPTERS


def test_validate_checkpoint_without_training_needs_no_optimizer_state():
    module = injected()
    checkpoint = good_checkpoint(module)
    for key in ("optimizer_states", "lr_schedulers", "loops"):
        del checkpoint[key]
    validate_checkpoint(checkpoint, module, CONFIG, base_fingerprint(module))
    with pytest.raises(CheckpointMismatchError, match="no optimizer"):
        validate_checkpoint(checkpoint, module, CONFIG, base_fingerprint(module), training=True)


def test_validate_checkpoint_renames_compiled_keys_to_the_models_names():
    """A checkpoint of an uncompiled model resumes a model whose network is compiled, and
    the reverse: keys are compared without ``_orig_mod.``, loaded under the model's own."""
    plain = injected()
    checkpoint = good_checkpoint(plain)
    compiled = injected()
    compiled.net = torch.compile(compiled.net, backend="eager")
    fingerprint = base_fingerprint(compiled)
    assert fingerprint == base_fingerprint(plain)

    validate_checkpoint(checkpoint, compiled, CONFIG, fingerprint)
    assert set(checkpoint["state_dict"]) == {k.replace("net.", "net._orig_mod.") for k in ADAPTERS}

    validate_checkpoint(checkpoint, plain, CONFIG, fingerprint)  # and back
    assert set(checkpoint["state_dict"]) == ADAPTERS


def test_trim_checkpoint_keeps_listed_tensors_under_clean_names():
    state = {
        "net._orig_mod.a.lora_A.weight": torch.ones(1),
        "net._orig_mod.a.weight": torch.ones(1),
    }
    checkpoint = {"state_dict": state}
    trim_checkpoint(checkpoint, ["net._orig_mod.a.lora_A.weight"], {"format": 2})
    assert list(checkpoint["state_dict"]) == ["net.a.lora_A.weight"]
    assert checkpoint["lora"] == {"format": 2}
    assert (
        clean_name("_orig_mod.x._orig_mod.y") == "x.y"
        and clean_name("x.my_orig_mod") == "x.my_orig_mod"
    )


def test_without_wrappers_shows_the_uncompiled_names_and_puts_the_wrappers_back():
    module = MLPModule()
    inner = module.net
    module.net = torch.compile(inner, backend="eager")
    wrapper = module.net
    with pytest.raises(KeyError), without_wrappers(module):
        assert module.net is inner
        assert [n for n, _ in module.named_modules()][:3] == ["", "net", "net.layers"]
        raise KeyError("inside")
    assert module.net is wrapper
    assert "net._orig_mod.layers.0" in dict(module.named_modules())


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (torch.zeros(2), "holds a tensor of shape (2,)"),
        ([], "holds a list"),
        ((), "holds a tuple"),
        (None, "holds None"),
        ({}, "holds an empty dict"),
        ({"state_dict": {}}, "no valid 'pytorch-lightning_version' (found None"),
        ({"pytorch-lightning_version": 2.6}, "found 2.6"),
    ],
)
def test_check_checkpoint_form(value, text):
    with pytest.raises(CheckpointMismatchError, match="resume from a .ckpt written by") as raised:
        check_checkpoint_form(value, "checkpoint x.ckpt")
    assert str(raised.value).startswith("checkpoint x.ckpt") and text in str(raised.value)


def test_checkpoint_io_runs_its_check_on_what_it_read(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2], path)
    plain = AdapterExportingIO(TorchCheckpointIO(), export=lambda checkpoint, path: None)
    assert plain.load_checkpoint(path) == [1, 2]
    checked = AdapterExportingIO(
        TorchCheckpointIO(),
        export=lambda checkpoint, path: None,
        check=lambda checkpoint, path: check_checkpoint_form(checkpoint, f"checkpoint {path}"),
    )
    with pytest.raises(CheckpointMismatchError, match=r"list\.ckpt holds a list"):
        checked.load_checkpoint(path)


def test_check_optimizer_states_compares_counts_and_groups():
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    adam = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    state = adam.state_dict()
    check_optimizer_states([state], [adam], [], 0)  # fits

    cases = [
        (([], [adam], [], 0), "holds the state of 0 optimizer(s), the run built 1"),
        (([state, state], [adam], [], 0), "holds the state of 2 optimizer(s)"),
        (([{"state": {}}], [adam], [], 0), "is not an optimizer state_dict"),
        (([{"state": {}, "param_groups": [{"params": 3}]}], [adam], [], 0), "not an optimizer"),
        (([{**state, "param_groups": state["param_groups"][:1]}], [adam], [], 0), "sizes [2, 1], its state in the checkpoint [2]"),
        (([state], [adam], [{}], 0), "1 learning-rate scheduler(s), the run built 0"),
    ]  # fmt: skip
    for args, text in cases:
        with pytest.raises(CheckpointMismatchError) as raised:
            check_optimizer_states(*args)
        assert text in str(raised.value), (text, str(raised.value))


# ========================================================================== Trainer resumes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of one LoRA run: a full one and a weights-only one."""
    root = tmp_path_factory.mktemp("runs")
    full = ModelCheckpoint(dirpath=root / "ckpt", filename="full")
    run = trainer(root, [LoRACallback(**LORA), full])
    run.fit(MLPModule())
    run.save_checkpoint(root / "ckpt" / "weights.ckpt", weights_only=True)
    return {"full": Path(full.best_model_path), "weights_only": root / "ckpt" / "weights.ckpt"}


def _resume(tmp_path: Path, path: Path, module: MLPModule | None = None, **callback: Any):
    module = module if module is not None else CountingModule()
    run = trainer(tmp_path / "resumed", [LoRACallback(**{**LORA, **callback})], max_epochs=2)
    run.fit(module, ckpt_path=path)
    return module


RESUME_CASES = [
    param
    for param in MALFORMED
    # near-duplicates of other cases, left to the pure-function test
    if param.id not in {"config-dropout-out-of-range", "config-r-a-string", "adapted-more", "format-a-string", "extra-dimension", "non-tensor-none", "export-root-none", "no-scheduler-state"}
] + [
    pytest.param(lambda c: "EMPTY", ["could not be read", "it is empty"], id="empty-file"),
    pytest.param(_set("optimizer_states", []), ["holds the state of 0 optimizer(s), the run built 1"], id="optimizer-state-missing-from-list"),
    pytest.param(lambda c: c["optimizer_states"][0].update(param_groups=[]), ["parameter groups of sizes [4], its state in the checkpoint []"], id="optimizer-groups-differ"),
    pytest.param(lambda c: c["optimizer_states"][0].pop("param_groups") and None, ["state of optimizer 0 (Adam) is not an optimizer state_dict"], id="optimizer-state-without-groups"),
    pytest.param(_set("lr_schedulers", []), ["0 learning-rate scheduler(s), the run built 1"], id="scheduler-state-missing-from-list"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "texts"), RESUME_CASES)
def test_resume_refuses_malformed_checkpoints_before_any_training_step(
    tmp_path, runs, mutate, texts
):
    checkpoint = load(runs["full"])
    path = tmp_path / "resume.ckpt"
    result = _mutated(mutate, checkpoint)
    if isinstance(result, str):
        path.write_bytes(b"")
    else:
        torch.save(result, path)
    module = CountingModule()
    with pytest.raises(CheckpointMismatchError) as raised:
        _resume(tmp_path, path, module)
    for text in texts:
        assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"
    assert module.steps == 0


def test_weights_only_checkpoint_cannot_resume_training_but_validates(tmp_path, runs):
    with pytest.raises(CheckpointMismatchError, match=r"save_weights_only=True"):
        _resume(tmp_path, runs["weights_only"])
    module = MLPModule()
    run = trainer(tmp_path / "validate", [LoRACallback(**LORA)])
    run.validate(module, ckpt_path=runs["weights_only"], verbose=False)
    expected = load(runs["weights_only"])["state_dict"]
    loaded = lora_tensors(module)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_resume_loads_trainable_tensors_never_base_weights(tmp_path, runs):
    """A checkpoint that also carries (other) frozen base weights resumes the adapters and
    leaves the base model's weights as they are."""
    checkpoint = load(runs["full"])
    base = MLPModule().state_dict()
    for name, value in base.items():
        checkpoint["state_dict"][name] = torch.full_like(value, 3.0)
    path = tmp_path / "with_base.ckpt"
    torch.save(checkpoint, path)

    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Look(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after the restore, before training
            seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    module = CountingModule()
    run = trainer(tmp_path / "resumed", [LoRACallback(**LORA), Look()], max_epochs=2)
    run.fit(module, ckpt_path=path)

    loaded = seen["state"]
    for name, value in base.items():
        assert torch.equal(loaded[name], value), f"{name} was overwritten by the checkpoint"
    for name in ADAPTERS:
        assert torch.equal(loaded[name], checkpoint["state_dict"][name]), name
    assert module.steps > 0


def test_resume_onto_a_base_differing_in_one_value_is_refused(tmp_path, runs):
    """One frozen value anywhere (here the last element of the frozen head) changes the
    fingerprint: the sampled one of format 1 would have missed it."""
    module = CountingModule()
    with torch.no_grad():
        module.net.layers[2].weight.view(-1)[-1] += 1e-3
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        _resume(tmp_path, runs["full"], module)
    assert module.steps == 0


# ==================================================================== callback options, setup


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"adapter_dir": 5}, "adapter_dir=5) is invalid"),
        ({"adapter_dir": ""}, "expected a non-empty path"),
        ({"adapter_dir": ["a"]}, "adapter_dir=['a']"),
        ({"export_root": None}, "export_root=None) is invalid"),
        ({"export_root": 3}, "export_root=3"),
        ({"export_root": Path("model")}, "export_root=PosixPath('model')"),
        ({"export_on_checkpoint": "false"}, "export_on_checkpoint='false') is invalid"),
        ({"merge_on_end": 1}, "merge_on_end=1"),
        ({"target_fn": "net"}, "is not callable"),
    ],
)
def test_callback_options_are_type_checked_at_construction(kwargs, text):
    with pytest.raises(LoRAConfigError) as raised:
        LoRACallback(**LORA, **kwargs)
    assert text in str(raised.value)


@pytest.mark.parametrize(
    ("export_root", "texts"),
    [
        ("model", ["export_root='model') names no submodule of CountingModule", "['net']"]),
        ("net.layers.7", ["names no submodule"]),
        ("net.", ["names no submodule"]),
        ("net.layers.0", ["does not hold 2 trained tensor(s)", "net.layers.1.lora_A.weight"]),
    ],
)
def test_export_root_is_resolved_at_setup_before_any_training_step(tmp_path, export_root, texts):
    module = CountingModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = trainer(tmp_path, [LoRACallback(**LORA, export_root=export_root)], max_epochs=1)
    with pytest.raises(LoRAConfigError) as raised:
        run.fit(module)
    for text in texts:
        assert text in str(raised.value), str(raised.value)
    assert module.steps == 0
    assert module.state_dict().keys() == before.keys(), "adapters were injected"


def test_unexportable_model_is_refused_at_setup_before_any_training_step(tmp_path):
    """A tied ``modules_to_save`` module: save_adapter refuses its files (PEFT would untie
    it), so a callback that exports refuses it at setup, not at the first checkpoint."""

    class Tied(CountingModule):
        def __init__(self) -> None:
            super().__init__()
            self.alias = nn.Linear(8, 4)
            self.alias.weight = self.net.layers[2].weight

    module = Tied()
    callback = LoRACallback(**LORA, modules_to_save=["alias"])
    with pytest.raises(LoRAConfigError) as raised:
        trainer(tmp_path, [callback]).fit(module)
    message = str(raised.value)
    assert message.startswith("LoRACallback.setup: PEFT would compute something else")
    assert "'alias' shares its weights with ['net.layers.2.weight']" in message
    assert "set both options to False" in message
    assert module.steps == 0 and not hasattr(module.net.layers[0], "lora_A")


def test_explicit_export_root_holding_every_target_exports_relative_names(tmp_path):
    run = trainer(tmp_path, [LoRACallback(**LORA, export_root="net")], max_epochs=1)
    run.fit(MLPModule())
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{k.removeprefix('net.')}" for k in ADAPTERS}


# ============================================================================ torch.compile


class InitCapture(pl.Callback):
    """The adapters right after the LoRA callback's setup (before any training step)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        self.tensors = {clean_name(k): v for k, v in lora_tensors(pl_module).items()}


def _fit_with(tmp_path: Path, module: Any, **callback: Any) -> tuple[LoRACallback, InitCapture]:
    lora, capture = LoRACallback(**{**LORA, **callback}), InitCapture()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [lora, capture, checkpoint], max_epochs=1).fit(module)
    return lora, capture


@pytest.fixture(scope="module")
def uncompiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncompiled")
    lora, capture = _fit_with(root, QuietModule(), target_modules=["layers.0", "layers.1"])
    return root, lora, capture


@pytest.mark.parametrize("what", ["network", "module"])
def test_compiled_model_exports_clean_keys_with_the_uncompiled_init(tmp_path, uncompiled, what):
    """``self.net = torch.compile(net)`` or ``torch.compile(lightning_module)``, default
    export_root: the same adapter names, init values and file keys as without compile."""
    root, plain_lora, plain_init = uncompiled
    module = QuietModule()
    if what == "network":
        module.net = torch.compile(module.net, backend="eager")
    else:
        module = torch.compile(module, backend="eager")

    lora, capture = _fit_with(tmp_path, module, target_modules=["layers.0", "layers.1"])

    assert lora.adapted == plain_lora.adapted == ["net.layers.0", "net.layers.1"]
    assert capture.tensors.keys() == plain_init.tensors.keys() == ADAPTERS
    for name, value in plain_init.tensors.items():
        assert torch.equal(capture.tensors[name], value), f"{name}: another init"
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = load_file(root / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == reference.keys()
    assert not any("_orig_mod" in key for key in exported)
    assert exported["base_model.model.net.layers.0.lora_B.weight"].abs().sum() > 0  # trained
    saved = load(tmp_path / "ckpt" / "run.ckpt")
    assert set(saved["state_dict"]) == ADAPTERS
    assert saved["lora"]["adapted_modules"] == ["net.layers.0", "net.layers.1"]
    assert saved["lora"]["base_fingerprint"] == plain_lora.fingerprint
    beside = load_file(tmp_path / "ckpt" / "run_adapter" / "adapter_model.safetensors")
    assert beside.keys() == reference.keys()


def test_checkpoint_of_a_compiled_network_resumes_uncompiled(tmp_path):
    module = QuietModule()
    module.net = torch.compile(module.net, backend="eager")
    _fit_with(tmp_path, module, target_modules=["layers.0", "layers.1"])
    saved = load(tmp_path / "ckpt" / "run.ckpt")

    resumed = MLPModule()
    run = trainer(tmp_path / "resumed", [LoRACallback(**{**LORA, "target_modules": ["layers.0", "layers.1"]})], max_epochs=1)  # fmt: skip
    run.fit(resumed, ckpt_path=tmp_path / "ckpt" / "run.ckpt")  # max_epochs reached: no step
    for name, value in saved["state_dict"].items():
        assert torch.equal(lora_tensors(resumed)[name], value)
