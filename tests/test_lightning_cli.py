"""`LightningCLI` builds the callback from flat ``init_args``: ``LoRACallback``'s signature holds
one keyword per LoRAConfig field (built from the dataclass), which jsonargparse reads."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import pydoc

import pytest
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI
from lightning_models import MLPModule

from lora_lightning import LoRACallback, LoRAConfig, LoRAConfigError
from lora_lightning.core.eva import EvaConfig
from lora_lightning.core.lora_ga import LoraGAConfig

FIELDS = [f.name for f in dataclasses.fields(LoRAConfig)]
#: A value other than the default for every LoRAConfig field, as a command line gives it.
CLI_VALUES = {
    "r": ("4", 4),
    "alpha": ("8", 8.0),
    "dropout": ("0.1", 0.1),
    "seed": ("3", 3),
    "dtype": ("float64", "float64"),
    "target_modules": ("[a, b]", ["a", "b"]),
    "exclude_modules": ("[c]", ["c"]),
    "rank_pattern": ('{"a": 2}', {"a": 2}),
    "alpha_pattern": ('{"a": 3.0}', {"a": 3.0}),
    "use_rslora": ("true", True),
    "init": ("gaussian", "gaussian"),
    "bias": ("lora_only", "lora_only"),
    "modules_to_save": ("[head]", ["head"]),
    "group_shared_input": ("false", False),
    "dropout_masks": ("torch", "torch"),
    "use_dora": ("true", True),
    "loraplus_lr_ratio": ("4", 4.0),
    "loraplus_lr_embedding": ("1e-05", 1e-05),
    "quantize_base": ("int8", "int8"),
    "quantize_scope": ("all_linear", "all_linear"),
    "eva_config": ('{"rho": 2.0}', EvaConfig(rho=2.0)),
    "lora_ga_config": ('{"scale": "unit"}', LoraGAConfig(scale="unit")),
    "fuse_shared_input": ("true", True),
}


def test_every_config_field_is_a_keyword_of_the_callback_signature_defaulting_to_the_config():
    params = inspect.signature(LoRACallback).parameters
    assert set(FIELDS) <= set(params)
    assert all(
        params[f].kind is params[f].KEYWORD_ONLY and params[f].default is None for f in FIELDS
    )
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_jsonargparse_parses_every_config_field_as_a_callback_init_arg():
    assert set(CLI_VALUES) == set(FIELDS)  # a new field needs a row here
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LoRACallback, "callback")
    args = [f"--callback.{name}={text}" for name, (text, _) in CLI_VALUES.items()]
    parsed = parser.parse_args(args).callback  # not built: these values do not combine
    found = {n: getattr(parsed[n], "as_dict", lambda n=n: parsed[n])() for n in FIELDS}
    expected = {n: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for n, (_, v) in CLI_VALUES.items()}  # fmt: skip
    assert found == expected


def test_lightning_cli_command_line_sets_config_fields_on_the_callback(tmp_path):
    cli = LightningCLI(
        MLPModule,
        args=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks+=lora_lightning.LoRACallback",
            "--trainer.callbacks.r=4",
            "--trainer.callbacks.use_dora=true",
            "--trainer.callbacks.target_modules=[net.layers.0]",
            '--trainer.callbacks.eva_config={"rho": 1.5}',
        ],
        save_config_callback=None,
        run=False,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    config = callback.config
    assert (config.r, config.use_dora, config.target_modules) == (4, True, ["net.layers.0"])
    assert config.eva_config.rho == 1.5 and config.alpha == LoRAConfig().alpha


def test_lightning_cli_help_shows_each_config_field_with_the_config_docstring():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LoRACallback, "callback")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--callback.use_dora" in text and "DoRA (weight-decomposed LoRA" in text
    assert "--callback.quantize_scope" in text and "which base weights ``quantize_base``" in text


def test_help_lists_every_config_field_of_the_callback():
    text = pydoc.render_doc(LoRACallback, renderer=pydoc.plaintext)
    assert all(f"{name}: " in text for name in FIELDS)
    assert "weight-decomposed LoRA" in text  # the field docs are the config's


def test_an_unknown_keyword_is_refused_naming_the_valid_ones():
    with pytest.raises(LoRAConfigError) as raised:
        LoRACallback(use_dorra=True)
    message = str(raised.value)
    assert "unknown keyword argument(s) ['use_dorra']" in message
    assert "did you mean 'use_dora'?" in message
    assert all(repr(name) in message for name in [*FIELDS, "adapter_dir", "init_batches"])


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
