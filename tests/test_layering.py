"""Dependencies point one way: app -> lightning -> core; tasks know nothing of LoRA.

Each check imports in a fresh interpreter, so what earlier tests imported does not count.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_lightning"
HEAVY = ["lightning", "hydra", "wandb", "transformers", "omegaconf"]
CORE_MODULES = sorted(
    f"lora_lightning.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"
)


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _top_levels(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize(
    "modules", [["lora_lightning"], CORE_MODULES], ids=["package", "every-core-module"]
)
def test_the_core_imports_neither_lightning_hydra_wandb_nor_transformers(modules):
    loaded = _loaded_after(f"import {', '.join(modules)}")
    assert not _top_levels(loaded) & set(HEAVY), sorted(_top_levels(loaded) & set(HEAVY))
    assert not any(m.startswith(("lora_lightning.lightning", "lora_lightning.app")) for m in loaded)


def test_the_default_task_imports_nothing_of_lora():
    loaded = _loaded_after("import lora_lightning.tasks")
    lora = {m for m in loaded if m.startswith("lora_lightning.") and m != "lora_lightning.tasks"}
    assert all(m.startswith("lora_lightning.tasks") for m in lora), sorted(lora)
    assert "lora_lightning.core" not in loaded


def module_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (``import a.b`` and ``from a.b import c`` give
    ``a.b``), read from its syntax tree, so nothing is executed."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("core", ("lora_lightning.lightning", "lora_lightning.app", "lora_lightning.tasks",
                  "lightning", "hydra", "wandb", "transformers", "omegaconf")),
        ("lightning", ("lora_lightning.app", "lora_lightning.tasks", "hydra", "wandb")),
        ("tasks", ("lora_lightning.lightning", "lora_lightning.app")),
    ],
)  # fmt: skip
def test_no_module_imports_against_the_direction_of_the_layers(package, forbidden):
    offending = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in (PACKAGE / package).rglob("*.py")
        for name in module_imports(path)
        if name.startswith(forbidden)
        and not name.startswith("lora_lightning.lightning.")
        or name in forbidden
    }
    assert not offending, sorted(offending)


def test_no_two_core_modules_import_each_other_directly_or_through_others():
    graph = {
        path.stem: {
            name.removeprefix("lora_lightning.core.")
            for name in module_imports(path)
            if name.startswith("lora_lightning.core.")
        }
        for path in (PACKAGE / "core").glob("*.py")
        if path.stem != "__init__"
    }
    # Imports inside functions count too (module_imports walks the whole tree).

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, cycles


def test_the_public_api_is_importable_from_the_package_root():
    import lora_lightning

    for name in lora_lightning.__all__:
        assert getattr(lora_lightning, name) is not None, name
