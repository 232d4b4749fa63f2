"""`LightningCLI` builds the callback from flat ``init_args`` (every LoRAConfig field is an
explicit keyword of LoRACallback, so jsonargparse sees it)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning_models import MLPModule

from lora_lightning import LoRACallback, LoRAConfig, LoRAConfigError


def test_every_config_field_is_an_explicit_keyword_of_the_callback():
    params = inspect.signature(LoRACallback.__init__).parameters
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    assert fields <= set(params)
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_flat_keywords_override_the_config():
    callback = LoRACallback(LoRAConfig(r=8, alpha=16), r=4, dropout=0.2)
    assert (callback.config.r, callback.config.alpha, callback.config.dropout) == (4, 16.0, 0.2)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("export_on_checkpoint", "false"),
        ("merge_on_end", 1),
        ("adapter_dir", 3),
        ("export_root", None),
    ],
)
def test_callback_options_are_type_checked_at_construction(option, value):
    with pytest.raises(LoRAConfigError, match=option):
        LoRACallback(**{option: value})


def test_lightning_cli_accepts_flat_init_args(tmp_path):
    config = tmp_path / "cli.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 0
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lora_lightning.LoRACallback
      init_args:
        r: 4
        alpha: 8
        target_modules: ['net\\.layers\\.[01]']
        adapter_dir: {tmp_path}/adapter
"""
    )
    cli = LightningCLI(
        MLPModule, args=["fit", "--config", str(config)], save_config_callback=None, run=True
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert (callback.config.r, callback.config.alpha) == (4, 8.0)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert cli.model.net.layers[0].lora_A.weight.shape == (4, 6)
