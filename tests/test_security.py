"""Security: files are data, never code.

- Adapter loading reads safetensors only and never unpickles: a pickle ``adapter_model.bin``
  whose unpickling would create a marker file is refused (or ignored next to safetensors) and
  the marker never appears; loading a good adapter works with every unpickler disabled.
- Checkpoints are read with ``weights_only=True``: a checkpoint holding a pickle payload is
  refused with a clear error, and its payload never runs.
- Every ``torch.load`` in the package passes ``weights_only=True``, nothing imports a pickle
  library, and nothing evaluates or imports a name it did not hard-code (checked on the AST).
- ``adapter_config.json`` values are type- and range-checked (property test over arbitrary
  JSON); names in the file (``base_model_class``, ``auto_mapping``, ...) are never imported.
"""

from __future__ import annotations

import ast
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.fabric.plugins import TorchCheckpointIO
from lightning_models import MLP_TARGETS, MLPModule, trainer
from models import logits, mlp, mlp_inputs, randomize_adapters

import lora_lightning
from lora_lightning import (
    AdapterFileError,
    CheckpointMismatchError,
    LoRACallback,
    LoRAConfig,
    inject_lora,
    load_adapter,
    save_adapter,
)
from lora_lightning.core.peft_format import parse_adapter_config
from lora_lightning.lightning.checkpoint_io import AdapterExportingIO

PACKAGE = Path(lora_lightning.__file__).resolve().parent


class Payload:
    """Unpickling this runs ``open(path, "w")``: the file exists iff something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.fixture
def adapter(tmp_path) -> tuple[Path, torch.Tensor]:
    """A saved adapter of the seeded MLP and the adapted model's output on fixed inputs."""
    model = mlp()
    inject_lora(model, LoRAConfig(r=2, target_modules=[r"layers\.[01]"]))
    randomize_adapters(model)
    return save_adapter(model, tmp_path / "adapter"), logits(model, mlp_inputs())


# ------------------------------------------------------------------------- adapter files


def test_payload_is_live(tmp_path):
    """Control: the payload used below really does create its marker when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path, adapter, writer):
    directory, _ = adapter
    marker = tmp_path / "UNPICKLED"
    (directory / "adapter_model.safetensors").unlink()
    bin_path = directory / "adapter_model.bin"
    if writer == "pickle":
        bin_path.write_bytes(
            pickle.dumps({"base_model.model.layers.0.lora_A.weight": Payload(marker)})
        )
    else:
        torch.save({"base_model.model.layers.0.lora_A.weight": Payload(marker)}, bin_path)
    before = bin_path.read_bytes()

    with pytest.raises(AdapterFileError) as raised:
        load_adapter(mlp(), directory)

    message = str(raised.value)
    assert "adapter_model.bin" in message and "pickle" in message and "refused" in message
    assert "arbitrary code" in message  # says why
    assert not marker.exists()
    assert bin_path.read_bytes() == before


def test_pickle_bin_next_to_safetensors_is_ignored(tmp_path, adapter):
    directory, expected = adapter
    marker = tmp_path / "UNPICKLED"
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    model = mlp()
    load_adapter(model, directory)
    assert torch.equal(logits(model, mlp_inputs()), expected)
    assert not marker.exists()


def test_loading_an_adapter_never_calls_an_unpickler(monkeypatch, adapter):
    directory, expected = adapter

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load_adapter tried to unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")]:  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    model = mlp()
    load_adapter(model, directory)
    assert torch.equal(logits(model, mlp_inputs()), expected)


def _evil_module(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "evil_lora_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    return marker


def _edit_config(directory, **fields):
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(fields)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def test_names_in_adapter_config_metadata_are_never_imported(tmp_path, adapter, monkeypatch):
    """PEFT's metadata may name classes (``auto_mapping``, ``task_type``...): ignored."""
    directory, expected = adapter
    marker = _evil_module(tmp_path, monkeypatch)
    _edit_config(
        directory,
        auto_mapping={
            "base_model_class": "evil_lora_module.Model",
            "parent_library": "evil_lora_module",
        },
        base_model_name_or_path="evil_lora_module",
        task_type="evil_lora_module.Model",
        revision="os.system",
    )
    model = mlp()
    load_adapter(model, directory)
    assert torch.equal(logits(model, mlp_inputs()), expected)
    assert not marker.exists()


def test_unknown_or_refused_fields_naming_code_are_refused_and_never_imported(
    tmp_path, adapter, monkeypatch
):
    """Fields this project does not implement (``layer_replication``) or does not know
    (``_target_``, ``base_model_class``) are refused by name, and nothing is imported."""
    directory, _ = adapter
    marker = _evil_module(tmp_path, monkeypatch)
    for field in ("base_model_class", "parent_library", "layer_replication", "_target_"):
        original = (directory / "adapter_config.json").read_text()
        _edit_config(directory, **{field: "evil_lora_module.Model"})
        with pytest.raises(AdapterFileError, match=field):
            load_adapter(mlp(), directory)
        (directory / "adapter_config.json").write_text(original)
    assert not marker.exists()
    assert "evil_lora_module" not in sys.modules


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_with_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "lora": Payload(marker), "global_step": 1}, path)
    before = path.read_bytes()
    callback = LoRACallback(r=2, target_modules=MLP_TARGETS)
    with pytest.raises(CheckpointMismatchError) as raised:
        trainer(tmp_path / "root", [callback]).fit(MLPModule(), ckpt_path=path)
    assert "could not be read" in str(raised.value)
    assert "weights-only load refuses to unpickle" in str(raised.value)
    assert not marker.exists()
    assert path.read_bytes() == before


class _RecordingIO(TorchCheckpointIO):
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def load_checkpoint(self, path: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return super().load_checkpoint(path, **kwargs)


def test_checkpoint_io_defaults_to_weights_only(tmp_path):
    """Lightning passes ``weights_only=None`` by default: the LoRA IO makes it True."""
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    inner = _RecordingIO()
    io = AdapterExportingIO(inner, export=lambda checkpoint, path: None)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    io.load_checkpoint(path, weights_only=None)
    assert [call["weights_only"] for call in inner.calls] == [True, True]
    assert all("map_location" not in call for call in inner.calls)  # inner default kept


# ------------------------------------------------------------------------ the source code


def _package_sources() -> list[tuple[Path, ast.Module]]:
    return [
        (path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _loads_without_weights_only(tree: ast.Module) -> list[int]:
    """Line numbers of ``torch.load`` calls (any spelling) not passing ``weights_only=True``."""
    aliases = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func) in aliases:
            flags = [k.value for k in node.keywords if k.arg == "weights_only"]
            if not (flags and isinstance(flags[0], ast.Constant) and flags[0].value is True):
                lines.append(node.lineno)
    return lines


def test_the_torch_load_scan_finds_unsafe_calls():
    code = (
        "import torch\nfrom torch import load as L\n"
        "torch.load(f)\nL(f, weights_only=False)\ntorch.load(f, weights_only=flag)\n"
        "torch.load(f, weights_only=True)\n"
    )
    assert _loads_without_weights_only(ast.parse(code)) == [3, 4, 5]


def test_every_torch_load_in_the_package_is_weights_only():
    sources = _package_sources()
    assert len(sources) >= 9  # the scan does see the package
    bad = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path, tree in sources
        for line in _loads_without_weights_only(tree)
    ]
    assert not bad, f"torch.load without weights_only=True at {bad}"


UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
}


def test_package_imports_no_pickle_library_and_evaluates_no_code():
    problems = []
    for path, tree in _package_sources():
        where = path.relative_to(PACKAGE)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                names = []
            problems += [f"{where}:{node.lineno} imports {n}" for n in names if n in UNSAFE_MODULES]
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in ("eval", "exec", "compile", "__import__", "pydoc.locate"):
                    problems.append(f"{where}:{node.lineno} calls {name}")
                if name.endswith("import_module") and not (
                    node.args and isinstance(node.args[0], ast.Constant)
                ):
                    problems.append(f"{where}:{node.lineno} imports a computed name")
    assert not problems, problems


# ----------------------------------------------------------- adapter_config.json, property

FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "rank_pattern",
          "alpha_pattern", "modules_to_save", "use_dora", "lora_bias", "peft_type"]  # fmt: skip
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "8", "LORA", "none", "all", "(", ".*", "lora_only"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["", "q", "(", r"layers\.0", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid(field: str, value: Any) -> bool:
    """What parse_adapter_config may accept for ``field`` (anything else must be refused)."""
    if field == "r":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if field == "lora_alpha":
        return _number(value) and value > 0
    if field == "lora_dropout":
        return _number(value) and 0 <= value < 1
    if field == "use_rslora":
        return isinstance(value, bool)
    if field == "bias":
        return value in ("none", "lora_only", "all")
    if field in ("rank_pattern", "alpha_pattern"):
        kind = int if field == "rank_pattern" else (int, float)
        return value is None or (
            isinstance(value, dict)
            and all(isinstance(v, kind) and _number(v) and v > 0 for v in value.values())
            and "(" not in value
        )
    if field == "modules_to_save":
        return value is None or (isinstance(value, list) and all(isinstance(m, str) for m in value))
    if field == "use_dora":
        return value is None or isinstance(value, bool)
    if field == "lora_bias":
        return value is None or value is False
    return value == "LORA"  # peft_type


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_adapter_config_values_are_type_and_range_checked(field, value):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, field: value}
    try:
        read = parse_adapter_config(json.dumps(config), Path("adapter_config.json"))
    except AdapterFileError as error:
        assert field in str(error) or "peft_type" in str(error)
        assert not _valid(field, value), f"valid {field}={value!r} was refused: {error}"
    else:
        assert _valid(field, value), f"invalid {field}={value!r} was accepted"
        assert read[field] == value
