"""The bad-input matrix: every bad input gets one clear error and loses nothing on disk.

Four families, each case its own test id:

- configuration: Hydra overrides composed from ``conf/`` (as ``python train.py ...`` would) and
  Python ``LoRAConfig(...)`` / ``LoRAConfig.from_dict(...)`` values;
- adapter directories: missing or unreadable files, wrong JSON types and ranges, other PEFT
  methods, pickle files, wrong tensors, adapters that do not fit the model;
- checkpoints passed to ``trainer.fit(ckpt_path=...)``: another config or base, corrupted
  files, a run without LoRA, missing tensors;
- runtime misuse: changed targets, merging twice, unmerging, saving or training while merged.

Every case asserts the exception type (the project's types in ``lora_lightning.core.errors``; Hydra's
own for what Hydra refuses before any of our code runs), that the message names the problem
and what would be valid, and, for file cases, that every file is byte-identical afterwards and
the model is left exactly as it was.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MLP_TARGETS, MLPModule, trainer
from models import mlp, mlp_inputs, randomize_adapters
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lightning import (
    AdapterFileError,
    CheckpointMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRAStateError,
    UnsupportedModuleError,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.app import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), by relative path, with its bytes."""
    if root.is_file():
        return {"": root.read_bytes()}
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return state, grads


def assert_same_model(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, grads = model_state(model)
    assert sorted(state) == sorted(before[0]), "the failed call added or removed tensors"
    assert all(torch.equal(state[k], before[0][k]) for k in state), "a tensor changed"
    assert grads == before[1], "requires_grad changed"


def raised_text(error: BaseException) -> str:
    """The message, plus the cause Hydra keeps the details in."""
    parts = [str(error)]
    if error.__cause__ is not None:
        parts.append(str(error.__cause__))
    return "\n".join(parts)


# =============================================================================== config: Hydra


@pytest.fixture
def hydra_conf():
    """Compose ``conf/train.yaml`` with overrides, as ``python train.py <overrides>`` does."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=overrides)
    GlobalHydra.instance().clear()


# Refused by Hydra against the LoRAConfig schema, before any code of ours runs.
HYDRA_REFUSED = [
    pytest.param(["lora.rr=8"], ConfigCompositionException, ["lora.rr", "Key 'rr' not in 'LoRAConfig'"], id="hydra-unknown-key-rr"),
    pytest.param(["lora.r=abc"], ConfigCompositionException, ["lora.r=abc", "could not be converted to Integer"], id="hydra-r-not-an-integer"),
    pytest.param(["lora.r=2.5"], ConfigCompositionException, ["lora.r=2.5", "could not be converted to Integer"], id="hydra-r-float"),
    pytest.param(["lora.dropout=high"], ConfigCompositionException, ["lora.dropout=high", "could not be converted to Float"], id="hydra-dropout-not-a-number"),
    pytest.param(["lora.use_rslora=maybe"], ConfigCompositionException, ["lora.use_rslora", "not a valid bool"], id="hydra-rslora-not-a-bool"),
    pytest.param(["lora.target_modules=5"], ConfigCompositionException, ["lora.target_modules", "not a ListConfig, list or tuple"], id="hydra-targets-not-a-list"),
    pytest.param(["++lora.rank_pattern={q:1.5}"], ConfigCompositionException, ["lora.rank_pattern", "could not be converted to Integer"], id="hydra-rank-pattern-float"),
    pytest.param(["lora=nope"], MissingConfigException, ["lora/nope", "Available options in 'lora'", "default"], id="hydra-unknown-lora-option"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "error", "texts"), HYDRA_REFUSED)
def test_hydra_override_refused_by_schema(hydra_conf, overrides, error, texts):
    with pytest.raises(error) as raised:
        hydra_conf(overrides)
    message = raised_text(raised.value)
    for text in texts:
        assert text in message


# Accepted by the schema's types, refused by LoRAConfig's validation when the app builds the
# callback (lora_lightning.app.run: LoRACallback(config=<the composed lora group>)).
HYDRA_INVALID = [
    pytest.param(["lora.r=0"], ["lora.r=0", "integer >= 1"], id="hydra-r-zero"),
    pytest.param(["lora.r=-4"], ["lora.r=-4", "integer >= 1"], id="hydra-r-negative"),
    pytest.param(["lora.r=100000000000000000000"], ["lora.r=100000000000000000000", "integer in [1, 65536]"], id="hydra-r-absurd"),
    pytest.param(["lora.alpha=-1"], ["lora.alpha=-1.0", "number > 0"], id="hydra-alpha-negative"),
    pytest.param(["lora.dropout=1.0"], ["lora.dropout=1.0", "[0, 1)"], id="hydra-dropout-one"),
    pytest.param(["lora.dtype=fp8"], ["lora.dtype='fp8'", "float32, float16, bfloat16, float64, auto"], id="hydra-dtype-unknown"),
    pytest.param(["lora.init=xavier"], ["lora.init='xavier'", "kaiming, gaussian"], id="hydra-init-unknown"),
    pytest.param(["lora.bias=some"], ["lora.bias='some'", "none, lora_only, all"], id="hydra-bias-unknown"),
    pytest.param(["lora.target_modules=[]"], ["lora.target_modules=[]", "at least one regex"], id="hydra-targets-empty"),
    pytest.param(["lora.target_modules=['(query']"], ["lora.target_modules regex '(query'", "regular expression"], id="hydra-target-regex-broken"),
    pytest.param(["++lora.rank_pattern={q:-1}"], ["lora.rank_pattern['q']=-1", "integer >= 0"], id="hydra-rank-pattern-negative"),
    pytest.param(["+lora.rr=8"], ["unknown LoRA config field(s) ['rr']", "valid fields are", "'r'"], id="hydra-appended-unknown-key"),
    pytest.param(["+lora._target_=os.system"], ["unknown LoRA config field(s) ['_target_']", "valid fields are"], id="hydra-target-key-not-instantiated"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "texts"), HYDRA_INVALID)
def test_hydra_override_refused_by_lora_config(hydra_conf, overrides, texts):
    cfg = hydra_conf(overrides)
    with pytest.raises(LoRAConfigError) as raised:
        LoRACallback(config=OmegaConf.to_container(cfg.lora, resolve=True))
    for text in texts:
        assert text in str(raised.value)


# ============================================================================= config: Python

PYTHON_INVALID = [
    pytest.param({"r": 0}, ["lora.r=0", "integer >= 1"], id="py-r-zero"),
    pytest.param({"r": "8"}, ["lora.r='8'", "integer >= 1"], id="py-r-string"),
    pytest.param({"r": 4.0}, ["lora.r=4.0", "integer >= 1"], id="py-r-float"),
    pytest.param({"r": None}, ["lora.r=None", "integer >= 1"], id="py-r-none"),
    pytest.param({"r": 10**20}, ["lora.r=100000000000000000000", "integer in [1, 65536]"], id="py-r-absurd"),
    pytest.param({"rank_pattern": {"q": 10**20}}, ["lora.rank_pattern['q']=100000000000000000000", "integer in [0, 65536]"], id="py-rank-pattern-absurd"),
    pytest.param({"alpha": math.inf}, ["lora.alpha=inf", "number > 0"], id="py-alpha-inf"),
    pytest.param({"alpha": None}, ["lora.alpha=None", "number > 0"], id="py-alpha-none"),
    pytest.param({"alpha": True}, ["lora.alpha=True", "number > 0"], id="py-alpha-bool"),
    pytest.param({"dropout": math.nan}, ["lora.dropout=nan", "[0, 1)"], id="py-dropout-nan"),
    pytest.param({"dropout": "0.1"}, ["lora.dropout='0.1'", "[0, 1)"], id="py-dropout-string"),
    pytest.param({"dtype": torch.float16}, ["lora.dtype=torch.float16", "float32, float16, bfloat16, float64, auto"], id="py-dtype-torch-object"),
    pytest.param({"dtype": "int8"}, ["lora.dtype='int8'", "float32, float16"], id="py-dtype-int8"),
    pytest.param({"seed": 1.5}, ["lora.seed=1.5", "integer >= 0"], id="py-seed-float"),
    pytest.param({"init": "xavier"}, ["lora.init='xavier'", "kaiming, gaussian"], id="py-init-unknown"),
    pytest.param({"bias": "yes"}, ["lora.bias='yes'", "none, lora_only, all"], id="py-bias-unknown"),
    pytest.param({"use_rslora": 1}, ["lora.use_rslora=1", "true or false"], id="py-rslora-int"),
    pytest.param({"target_modules": None}, ["lora.target_modules=None", "list of regex strings"], id="py-targets-none"),
    pytest.param({"target_modules": [r"layers\.(0"]}, [r"lora.target_modules regex 'layers\\.(0'", "regular expression"], id="py-target-regex-broken"),
    pytest.param({"target_modules": [1]}, ["lora.target_modules entry 1", "regex string"], id="py-target-not-a-string"),
    pytest.param({"exclude_modules": ["[a"]}, ["lora.exclude_modules regex '[a'", "regular expression"], id="py-exclude-regex-broken"),
    pytest.param({"modules_to_save": ["*head"]}, ["lora.modules_to_save regex '*head'", "regular expression"], id="py-save-regex-broken"),
    pytest.param({"rank_pattern": {"q": 1.5}}, ["lora.rank_pattern['q']=1.5", "integer >= 0"], id="py-rank-pattern-float"),
    pytest.param({"rank_pattern": {"(q": 2}}, ["lora.rank_pattern regex '(q'", "regular expression"], id="py-rank-pattern-regex-broken"),
    pytest.param({"rank_pattern": ["q"]}, ["lora.rank_pattern=['q']", "mapping of regex -> number"], id="py-rank-pattern-list"),
    pytest.param({"alpha_pattern": {"q": -2}}, ["lora.alpha_pattern['q']=-2", "number > 0"], id="py-alpha-pattern-negative"),
    pytest.param({"alpha_pattern": {"q": "8"}}, ["lora.alpha_pattern['q']='8'", "number > 0"], id="py-alpha-pattern-string"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "texts"), PYTHON_INVALID)
def test_python_config_value_refused(kwargs, texts):
    with pytest.raises(LoRAConfigError) as raised:
        LoRAConfig(**kwargs)
    for text in texts:
        assert text in str(raised.value)


FROM_DICT_UNKNOWN = [
    pytest.param({"rr": 8}, ["['rr']", "valid fields are", "'r'"], id="dict-unknown-rr"),
    pytest.param({"lora_alpha": 16}, ["['lora_alpha']", "'alpha'"], id="dict-peft-name-lora_alpha"),
    pytest.param({"r": 4, "target_module": ["x"]}, ["['target_module']", "'target_modules'"], id="dict-typo-next-to-valid"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "texts"), FROM_DICT_UNKNOWN)
def test_unknown_config_keys_refused(values, texts):
    with pytest.raises(LoRAConfigError) as raised:
        LoRAConfig.from_dict(values)
    for text in texts:
        assert text in str(raised.value)


# ========================================================================= adapter directories

GOOD_CONFIG = LoRAConfig(r=2, target_modules=[r"layers\.[01]"])
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    """A valid adapter of the seeded MLP: r=2 on ``layers.0`` and ``layers.1``, random A/B."""
    model = mlp()
    inject_lora(model, GOOD_CONFIG)
    randomize_adapters(model)
    return save_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


def edit_config(**changes: Any) -> Callable[[Path], None]:
    """Set (or, with ``DELETE``, remove) fields of adapter_config.json."""

    def mutate(directory: Path) -> None:
        config = json.loads((directory / CONFIG_FILE).read_text())
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (directory / CONFIG_FILE).write_text(json.dumps(config))

    return mutate


DELETE = object()


def write_file(name: str, content: bytes | str) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (directory / name).write_bytes(data)

    return mutate


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    def mutate(directory: Path) -> None:
        tensors = load_file(str(directory / WEIGHTS_FILE))
        save_file(change(dict(tensors)), str(directory / WEIGHTS_FILE))

    return mutate


def cut_weights(keep: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        data = (directory / WEIGHTS_FILE).read_bytes()
        (directory / WEIGHTS_FILE).write_bytes(data[: keep(len(data))])

    return mutate


def remove(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def replace_dir_by_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not an adapter folder")


def garbage_weights(directory: Path) -> None:
    data = bytes(random.Random(0).getrandbits(8) for _ in range(512))
    (directory / WEIGHTS_FILE).write_bytes(data)


def pickle_only(directory: Path) -> None:
    (directory / WEIGHTS_FILE).unlink()
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(directory / "UNPICKLED")))


class _Marker:
    """Unpickling this calls ``open(path, "w")``: the file appears iff something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def key(module: str, part: str) -> str:
    return f"{PREFIX}{module}.lora_{part}.weight"


def _set(tensors, name, value):
    tensors[name] = value
    return tensors


def _drop(tensors, name):
    del tensors[name]
    return tensors


def _rename(tensors, old, new):
    tensors = {k.replace(old, new): v for k, v in tensors.items()}
    return tensors


# Model factories: the model the adapter is loaded into.
def plain() -> nn.Module:
    return mlp()


def adapted(**overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = mlp()
        inject_lora(model, LoRAConfig(**{**GOOD_CONFIG.to_dict(), **overrides}))
        return model

    return build


def adapted_merged() -> nn.Module:
    model = adapted()()
    randomize_adapters(model)
    merge_lora(model)
    return model


A0, B1 = key("layers.0", "A"), key("layers.1", "B")

ADAPTER_CASES = [
    # --- the directory and its files
    pytest.param(shutil.rmtree, plain, AdapterFileError, ["does not exist", "expected a folder with adapter_config.json and adapter_model.safetensors"], id="dir-missing"),
    pytest.param(replace_dir_by_file, plain, AdapterFileError, ["is a file, not a folder", "expected a folder"], id="dir-is-a-file"),
    pytest.param(remove(CONFIG_FILE), plain, AdapterFileError, ["adapter_config.json is missing", "needs adapter_config.json"], id="config-missing"),
    pytest.param(remove(WEIGHTS_FILE), plain, AdapterFileError, ["adapter_model.safetensors is missing", "needs adapter_model.safetensors"], id="weights-missing"),
    pytest.param(write_file(WEIGHTS_FILE, b""), plain, AdapterFileError, ["adapter_model.safetensors is not a readable safetensors file", "header too small"], id="weights-empty"),
    pytest.param(cut_weights(lambda n: n - 4), plain, AdapterFileError, ["not a readable safetensors file", "not fully covered"], id="weights-truncated-tail"),
    pytest.param(cut_weights(lambda n: 100), plain, AdapterFileError, ["not a readable safetensors file", "header"], id="weights-truncated-header"),
    pytest.param(garbage_weights, plain, AdapterFileError, ["not a readable safetensors file"], id="weights-corrupt-bytes"),
    pytest.param(pickle_only, plain, AdapterFileError, ["only adapter_model.bin", "pickle", "refused", "convert it to adapter_model.safetensors"], id="weights-pickle-bin-only"),
    # --- adapter_config.json: syntax, types and ranges
    pytest.param(write_file(CONFIG_FILE, '{"r": 8,'), plain, AdapterFileError, ["adapter_config.json is not valid JSON"], id="config-not-json"),
    pytest.param(write_file(CONFIG_FILE, "[1, 2]"), plain, AdapterFileError, ["must hold a JSON object, got list"], id="config-json-list"),
    pytest.param(write_file(CONFIG_FILE, "null"), plain, AdapterFileError, ["must hold a JSON object, got NoneType"], id="config-json-null"),
    pytest.param(edit_config(r="8"), plain, AdapterFileError, ["r='8' is invalid", "an integer >= 1"], id="config-r-string"),
    pytest.param(edit_config(r=-1), plain, AdapterFileError, ["r=-1 is invalid", "an integer >= 1"], id="config-r-negative"),
    pytest.param(edit_config(r=True), plain, AdapterFileError, ["r=True is invalid", "an integer >= 1"], id="config-r-bool"),
    pytest.param(edit_config(r=DELETE), plain, AdapterFileError, ["r=None is invalid", "an integer >= 1"], id="config-r-missing"),
    pytest.param(edit_config(lora_alpha=None), plain, AdapterFileError, ["lora_alpha=None is invalid", "a number > 0"], id="config-alpha-null"),
    pytest.param(edit_config(lora_alpha="16"), plain, AdapterFileError, ["lora_alpha='16' is invalid", "a number > 0"], id="config-alpha-string"),
    pytest.param(edit_config(lora_alpha=math.nan), plain, AdapterFileError, ["lora_alpha=nan is invalid", "a number > 0"], id="config-alpha-nan"),
    pytest.param(edit_config(lora_dropout=1.5), plain, AdapterFileError, ["lora_dropout=1.5 is invalid", "[0, 1)"], id="config-dropout-out-of-range"),
    pytest.param(edit_config(use_rslora="yes"), plain, AdapterFileError, ["use_rslora='yes' is invalid", "true or false"], id="config-rslora-string"),
    pytest.param(edit_config(bias="everything"), plain, AdapterFileError, ["bias='everything' is invalid", "one of none, lora_only, all"], id="config-bias-unknown"),
    pytest.param(edit_config(rank_pattern={"layers\\.0": "2"}), plain, AdapterFileError, ["rank_pattern={'layers\\\\.0': '2'} is invalid", "integers > 0"], id="config-rank-pattern-string-value"),
    pytest.param(edit_config(rank_pattern=False), plain, AdapterFileError, ["rank_pattern=False is invalid", "an object mapping"], id="config-rank-pattern-false"),
    pytest.param(edit_config(alpha_pattern={"layers\\.0": math.inf}), plain, AdapterFileError, ["alpha_pattern=", "finite numbers > 0"], id="config-alpha-pattern-inf"),
    pytest.param(edit_config(alpha_pattern={"(layers": 4}), plain, AdapterFileError, ["alpha_pattern key '(layers' is not a valid regular expression"], id="config-alpha-pattern-regex-broken"),
    pytest.param(edit_config(modules_to_save="head"), plain, AdapterFileError, ["modules_to_save='head' is invalid", "a list of module names or null"], id="config-modules-to-save-string"),
    pytest.param(edit_config(r=4), plain, AdapterFileError, ["disagree with r / rank_pattern", "layers.0 (tensors r=2, config r=4)"], id="config-r-disagrees-with-tensors"),
    # --- another kind of adapter
    pytest.param(edit_config(peft_type="IA3"), plain, AdapterFileError, ["is a 'IA3' adapter", "only peft_type 'LORA' is supported"], id="peft-type-ia3"),
    pytest.param(edit_config(peft_type="LOHA"), plain, AdapterFileError, ["is a 'LOHA' adapter", "only peft_type 'LORA'"], id="peft-type-loha"),
    pytest.param(edit_config(peft_type=DELETE), plain, AdapterFileError, ["is a None adapter", "only peft_type 'LORA'"], id="peft-type-missing"),
    pytest.param(edit_config(use_dora=True), plain, AdapterFileError, ["use_dora=true but", "holds no DoRA magnitudes"], id="peft-dora-without-magnitudes"),
    # --- tensors
    pytest.param(edit_tensors(lambda t: {k: v.to(torch.int32) for k, v in t.items()}), plain, AdapterFileError, ["must share one float dtype", "torch.int32"], id="tensors-int-dtype"),
    pytest.param(edit_tensors(lambda t: _set(t, A0, t[A0].half())), plain, AdapterFileError, ["must share one float dtype", "torch.float16", "torch.float32"], id="tensors-mixed-dtypes"),
    pytest.param(edit_tensors(lambda t: _set(t, A0, torch.zeros(2, 7))), plain, AdapterFileError, [f"{A0}: shape (2, 7) in file, model expects (2, 6)"], id="tensors-wrong-shape"),
    pytest.param(edit_tensors(lambda t: _set(t, A0, torch.tensor(1.0))), plain, AdapterFileError, ["adapter matrices must be non-empty tensors of 2 or more dimensions", f"{A0} ()"], id="tensors-0d-lora-a"),
    pytest.param(edit_tensors(lambda t: _set(t, B1, torch.zeros(4))), plain, AdapterFileError, ["2 or more dimensions", f"{B1} (4,)"], id="tensors-1d-lora-b"),
    pytest.param(edit_tensors(lambda t: _set(t, A0, torch.zeros(0, 6))), plain, AdapterFileError, ["non-empty", f"{A0} (0, 6)"], id="tensors-empty-lora-a"),
    pytest.param(edit_tensors(lambda t: _drop(t, B1)), plain, AdapterFileError, [f"missing {B1}", "does not fit the model (1 problem(s))"], id="tensors-missing-key"),
    pytest.param(edit_tensors(lambda t: _set(t, f"{PREFIX}layers.2.weight", torch.zeros(4, 8))), plain, AdapterFileError, [f"unexpected {PREFIX}layers.2.weight"], id="tensors-extra-key"),
    pytest.param(edit_tensors(lambda t: _rename(t, PREFIX, "")), plain, AdapterFileError, ["keys must start with 'base_model.model.'", "PEFT's format"], id="tensors-no-peft-prefix"),
    pytest.param(edit_tensors(lambda t: _rename(t, "layers.1", "layers.7")), plain, AdapterFileError, ["targets modules the model does not have: ['layers.7']", "another base model"], id="tensors-unknown-module"),
    pytest.param(edit_tensors(lambda t: {f"{PREFIX}layers.2.weight": torch.zeros(4, 8)}), plain, AdapterFileError, ["holds no lora_A tensors"], id="tensors-no-adapter"),
    # --- adapters that do not fit the model they are loaded into
    pytest.param(edit_tensors(lambda t: {k: v.half() for k, v in t.items()}), adapted(), AdapterFileError, [f"{A0}: dtype torch.float16 in file, model expects torch.float32"], id="fit-dtype-vs-adapted-model"),
    pytest.param(lambda d: None, adapted(target_modules=[r"layers\.0"]), AdapterFileError, ["does not match the adapters already in the model", "in the file but not adapted in the model: ['layers.1']"], id="fit-model-adapted-with-other-targets"),
    pytest.param(lambda d: None, adapted(r=4), AdapterFileError, ["rank differs for", "layers.0 (model r=4, file r=2)"], id="fit-model-adapted-with-other-rank"),
    pytest.param(lambda d: None, adapted(alpha=2.0), AdapterFileError, ["another scaling", "inject with the file's alpha"], id="fit-model-adapted-with-other-alpha"),
    pytest.param(lambda d: None, adapted_merged, LoRAStateError, ["the model is merged", "unmerge_lora(model) before loading"], id="fit-model-merged"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "build", "error", "texts"), ADAPTER_CASES)
def test_bad_adapter_directory(tmp_path, good_adapter, mutate, build, error, texts):
    directory = tmp_path / "adapter"
    shutil.copytree(good_adapter, directory)
    mutate(directory)
    on_disk = snapshot(directory)
    model = build()
    before = model_state(model)

    with pytest.raises(error) as raised:
        load_adapter(model, directory)

    message = str(raised.value)
    for text in texts:
        assert text in message, f"{text!r} not in {message!r}"
    assert snapshot(directory) == on_disk, "the failed load changed files on disk"
    assert_same_model(model, before)
    assert not (tmp_path / "adapter" / "UNPICKLED").exists(), "something unpickled the .bin"


# ================================================================================= checkpoints

LORA = {"r": 2, "target_modules": MLP_TARGETS}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint of a LoRA run (r=2 on MLP_TARGETS) and one of a run without LoRA."""
    root = tmp_path_factory.mktemp("checkpoints")
    found = {}
    for name, callbacks in (("lora", [LoRACallback(**LORA)]), ("plain", [])):
        ckpt_dir = root / name
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="run"))
        trainer(root / f"{name}_root", callbacks).fit(MLPModule())
        found[name] = ckpt_dir / "run.ckpt"
    return found


def _copy_to(source: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(source, directory / "resume.ckpt"))


def _corrupt(region: str) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        if region == "head":
            data[:64] = b"\x00" * 64
        elif region == "tail":
            data[-100:] = b"\x00" * 100
        elif region == "half":
            del data[len(data) // 2 :]
        else:
            data = bytearray(random.Random(0).getrandbits(8) for _ in range(len(data)))
        path.write_bytes(bytes(data))

    return mutate


def _without_adapter_tensor(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    victim = next(k for k in checkpoint["state_dict"] if k.endswith("lora_B.weight"))
    del checkpoint["state_dict"][victim]
    torch.save(checkpoint, path)


CHECKPOINT_CASES = [
    # (source, mutate, module kwargs, callback kwargs, error, texts)
    pytest.param("lora", None, {}, {"r": 4}, CheckpointMismatchError, ["another LoRA config", "r: checkpoint 2 vs now 4", "Resume with the checkpoint's config"], id="ckpt-other-rank"),
    pytest.param("lora", None, {}, {"target_modules": [r"net\.layers\.0"]}, CheckpointMismatchError, ["another LoRA config", "target_modules: checkpoint"], id="ckpt-targets-changed"),
    pytest.param("lora", None, {"seed": 1}, {}, CheckpointMismatchError, ["another base model", "load the same pretrained base"], id="ckpt-other-base"),
    pytest.param("plain", None, {}, {}, CheckpointMismatchError, ["not written by a run with LoRACallback", "load them into the model before fit()"], id="ckpt-run-without-lora"),
    pytest.param("lora", _without_adapter_tensor, {}, {}, CheckpointMismatchError, ["does not fit the adapted model", "missing 1 trainable tensor(s)", "lora_B.weight"], id="ckpt-adapter-tensor-missing"),
    pytest.param("lora", _corrupt("head"), {}, {}, CheckpointMismatchError, ["could not be read", "truncated, corrupted", "Resume from another checkpoint"], id="ckpt-corrupt-head"),
    pytest.param("lora", _corrupt("tail"), {}, {}, CheckpointMismatchError, ["could not be read", "truncated, corrupted"], id="ckpt-corrupt-tail"),
    pytest.param("lora", _corrupt("half"), {}, {}, CheckpointMismatchError, ["could not be read", "truncated, corrupted"], id="ckpt-truncated"),
    pytest.param("lora", _corrupt("all"), {}, {}, CheckpointMismatchError, ["could not be read", "not a PyTorch checkpoint"], id="ckpt-random-bytes"),
    pytest.param("lora", lambda path: path.unlink(), {}, {}, FileNotFoundError, ["Checkpoint file not found", "resume.ckpt"], id="ckpt-missing-file"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "mutate", "module_kwargs", "lora_kwargs", "error", "texts"), CHECKPOINT_CASES)  # fmt: skip
def test_bad_checkpoint_on_resume(
    tmp_path, checkpoints, source, mutate, module_kwargs, lora_kwargs, error, texts
):
    ckpt_dir = tmp_path / "ckpt"
    path = _copy_to(checkpoints[source], ckpt_dir)
    if mutate is not None:
        mutate(path)
    on_disk = snapshot(ckpt_dir)
    # The resumed run checkpoints into the same folder: a failed resume must not touch it.
    callbacks = [
        LoRACallback(**{**LORA, **lora_kwargs}),
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1),
    ]
    with pytest.raises(error) as raised:
        trainer(tmp_path / "root", callbacks, max_epochs=2).fit(
            MLPModule(**module_kwargs), ckpt_path=path
        )
    for text in texts:
        assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"
    assert snapshot(ckpt_dir) == on_disk, "the failed resume changed the checkpoint folder"


# ============================================================================= runtime misuse


def _inject_other_targets(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = mlp()
    inject_lora(model, LoRAConfig(r=2, target_modules=[r"layers\.0"]))
    inject_lora(model, LoRAConfig(r=2, target_modules=[r"layers\.1"]))


def _inject_other_rank(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = mlp()
    inject_lora(model, GOOD_CONFIG)
    inject_lora(model, LoRAConfig(**{**GOOD_CONFIG.to_dict(), "r": 8}))


def _callback_with_other_targets(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    module = MLPModule()
    inject_lora(module, LoRAConfig(r=2, target_modules=[r"net\.layers\.0"]))
    trainer(tmp_path, [LoRACallback(**LORA)]).fit(module)


def _merge_twice(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = adapted()()
    merge_lora(model)
    merge_lora(model)


def _unmerge_unmerged(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    unmerge_lora(adapted()())


def _merge_without_adapters(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    merge_lora(mlp())


def _save_while_merged(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = adapted()()
    keep(save_adapter(model, tmp_path / "adapter"))  # an adapter already on disk
    randomize_adapters(model)
    merge_lora(model)
    save_adapter(model, tmp_path / "adapter")


def _save_without_adapters(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    save_adapter(mlp(), tmp_path / "never_created")


def _train_while_merged(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = adapted()().train()
    randomize_adapters(model)
    merge_lora(model)
    model(mlp_inputs()).sum().backward()


def _fit_while_merged(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    module = MLPModule()
    inject_lora(module, LoRAConfig(**LORA))
    merge_lora(module)
    trainer(tmp_path, [LoRACallback(**LORA)]).fit(module)


def _targets_match_nothing(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    inject_lora(mlp(), LoRAConfig(target_modules=[r"layer\.0"]))


def _unsupported_target(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    inject_lora(model, LoRAConfig(target_modules=["0", "1"]))


def _optimizer_of_frozen_params(tmp_path: Path, keep: Callable[[Path], None]) -> None:
    trainer(tmp_path, [LoRACallback(**LORA)]).fit(MLPModule(optim="frozen_only"))


MISUSE_CASES = [
    pytest.param(_inject_other_targets, LoRAStateError, ["different config", r"target_modules: ['layers\\.0'] -> ['layers\\.1']", "call unload_lora(model) first"], id="misuse-inject-other-targets"),
    pytest.param(_inject_other_rank, LoRAStateError, ["different config", "r: 2 -> 8", "unload_lora"], id="misuse-inject-other-rank"),
    pytest.param(_callback_with_other_targets, LoRAStateError, ["different config", "target_modules:", "unload_lora"], id="misuse-callback-targets-changed"),
    pytest.param(_merge_twice, LoRAStateError, ["already merged", "merge_lora and unmerge_lora must alternate"], id="misuse-merge-twice"),
    pytest.param(_unmerge_unmerged, LoRAStateError, ["not merged", "must alternate"], id="misuse-unmerge-unmerged"),
    pytest.param(_merge_without_adapters, LoRAStateError, ["no LoRA adapters", "inject_lora(model, config)"], id="misuse-merge-without-adapters"),
    pytest.param(_save_while_merged, LoRAStateError, ["the model is merged", "call unmerge_lora(model) before saving"], id="misuse-save-while-merged"),
    pytest.param(_save_without_adapters, LoRAStateError, ["no LoRA adapters", "inject_lora(model, config) first"], id="misuse-save-without-adapters"),
    pytest.param(_train_while_merged, LoRAStateError, ["merged LoRA layer is being trained", "unmerge_lora(model) before training"], id="misuse-train-while-merged"),
    pytest.param(_fit_while_merged, LoRAStateError, ["merged LoRA layer is being trained", "unmerge_lora(model)"], id="misuse-fit-while-merged"),
    pytest.param(_targets_match_nothing, LoRAConfigError, [r"lora.target_modules=['layer\\.0'] matched no module", "layers.0"], id="misuse-targets-match-nothing"),
    pytest.param(_unsupported_target, UnsupportedModuleError, ["module '1' is a LayerNorm", "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding"], id="misuse-unsupported-target"),
    pytest.param(_optimizer_of_frozen_params, LoRAConfigError, ["has no trainable parameter", "lora.modules_to_save"], id="misuse-optimizer-of-frozen-params"),
]  # fmt: skip


@pytest.mark.parametrize(("action", "error", "texts"), MISUSE_CASES)
def test_runtime_misuse(tmp_path, action, error, texts):
    kept: dict[Path, dict[str, bytes]] = {}
    with pytest.raises(error) as raised:
        action(tmp_path, lambda path: kept.update({path: snapshot(path)}))
    for text in texts:
        assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"
    for path, on_disk in kept.items():
        assert on_disk and snapshot(path) == on_disk, f"the failed call changed {path}"
    assert not (tmp_path / "never_created").exists()


def test_matrix_has_at_least_thirty_cases():
    cases = (
        HYDRA_REFUSED
        + HYDRA_INVALID
        + PYTHON_INVALID
        + FROM_DICT_UNKNOWN
        + ADAPTER_CASES
        + CHECKPOINT_CASES
        + MISUSE_CASES
    )
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)) >= 30
