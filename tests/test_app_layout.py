"""The application's modules import what their docstrings allow, and the library only through its
public names (``lora_lightning`` and the default task's ``lora_lightning.tasks``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_layering import module_imports

APP = Path(__file__).resolve().parent.parent / "lora_lightning" / "app"

#: module -> top-level packages it must not import (as its docstring says).
FORBIDDEN = {
    "config": ("lightning", "wandb", "lora_lightning.tasks"),
    "checks": ("wandb", "lora_lightning.tasks"),
    "errors": ("lightning", "hydra", "wandb"),
    "signals": ("wandb", "hydra", "lora_lightning.tasks"),
    "final_step": ("wandb", "hydra", "lora_lightning.tasks"),
    "console": ("wandb", "hydra", "lora_lightning.tasks"),
    "tracking": ("hydra", "lora_lightning.tasks"),
    "summary": ("lightning", "torch", "lora_lightning.tasks"),
}


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_app_module_imports_nothing_its_docstring_forbids(module):
    assert not {n for n in module_imports(APP / f"{module}.py") if _matches(n, FORBIDDEN[module])}


def test_app_uses_the_library_through_its_public_names_only():
    allowed = ("lora_lightning", "lora_lightning.app")
    for path in APP.glob("*.py"):
        private = {
            name
            for name in module_imports(path)
            if name.startswith("lora_lightning")
            and not (name == "lora_lightning" or _matches(name, ("lora_lightning.app",)))
        }
        assert not private, f"{path.name}: {sorted(private)} (allowed: {allowed})"
