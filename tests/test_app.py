"""The Hydra application: config composition, and `train.py` run end to end in subprocesses.

The subprocess tests use a tiny BERT saved to disk (the real MiniLM tokenizer, 2 layers of
width 32) so each job takes seconds; `test_default_job_on_real_minilm...` uses the real model.
The helpers here (`tiny_model_dir`, `tiny_args`, `train_py`, `compose_train`...) serve the other
`test_app_*.py` files too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lora_lightning import LoRAConfig, load_adapter
from lora_lightning.app import checks, register_configs, run

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose_train(overrides: list[str] | None = None):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [], return_hydra_config=True)


def run_in_process(overrides: list[str], output_dir: Path) -> float | None:
    """``run(cfg)`` of ``python train.py <overrides>`` in this process, writing to output_dir."""
    cfg = compose_train([*overrides, f"paths.output_dir={output_dir}"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a job's config has no hydra node
    return run(cfg)


# ----------------------------------------------------------------------------- composition
def test_default_config_composes_with_every_group():
    cfg = compose_train()
    assert set(cfg) >= {"lora", "model", "data", "trainer", "logger", "callbacks", "paths"}
    assert cfg.model._target_ == "lora_lightning.tasks.TextClassifier"
    assert "wandb" in cfg.logger


def test_lora_group_builds_a_valid_lora_config():
    cfg = compose_train(["lora.r=4", "lora.alpha=8"])
    config = LoRAConfig(**OmegaConf.to_container(cfg.lora, resolve=True))
    assert (config.r, config.alpha) == (4, 8.0)
    assert config.modules_to_save == [r"(.*\.)?classifier"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rr=8", "Key 'rr' not in 'LoRAConfig'"),
        ("lora_export.adapter_dri=x", "Key 'adapter_dri' not in 'ExportConfig'"),  # not LoRA's
    ],
)
def test_typo_in_a_schema_group_is_rejected_naming_the_key(override, message):
    with pytest.raises(Exception) as info:
        compose_train([override])
    assert message in f"{info.value} {info.value.__cause__}"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.r=eight", r"lora\.r"),
        ("lora_export.merge_on_end=maybe", r"lora_export\.merge_on_end"),
    ],
)
def test_wrong_type_in_a_schema_group_is_rejected(override, key):
    with pytest.raises(Exception, match=key):
        compose_train([override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["logger=csv"],
        ["logger=none"],
        ["callbacks=none"],
        ["trainer=cpu"],
        ["trainer=gpu"],
        ["trainer=ddp"],
        ["experiment=sst2_full"],
        ["experiment=rank_sweep"],
        ["hparams_search=sst2_optuna"],
        ["~lora"],
    ],
    ids=lambda o: o[0],
)
def test_each_config_option_composes(overrides):
    cfg = compose_train(overrides)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_full_data_experiment_uses_all_training_data():
    cfg = compose_train(["experiment=sst2_full"])
    assert cfg.data.train_limit is None and cfg.trainer.max_epochs == 3


def test_rank_sweep_experiment_sweeps_ranks():
    cfg = compose_train(["experiment=rank_sweep"])
    assert cfg.hydra.sweeper.params["lora.r"] == "1,2,4,8,16"


@pytest.mark.parametrize(
    ("override", "task_name", "metric"),
    [
        ("experiment=rank_sweep", "sst2-rank-sweep", "val/acc"),
        ("experiment=llm_sft", "llm-sft", "test/exact_match"),
        ("hparams_search=sst2_optuna", "sst2-optuna", "val/acc"),
    ],
)
def test_an_experiments_top_level_keys_replace_the_defaults(override, task_name, metric):
    cfg = compose_train([override])
    assert (cfg.task_name, cfg.optimized_metric) == (task_name, metric)
    assert compose_train([override, "task_name=mine"]).task_name == "mine"  # the command wins


def test_deleting_the_lora_group_leaves_no_lora_config():
    assert "lora" not in compose_train(["~lora"])


def test_deleting_the_lora_group_under_an_experiment_setting_lora_fields_means_full_fine_tuning():
    # experiment=llm_sft sets lora.* in the global package: '~lora' leaves those keys behind,
    # and a callback built from them would train LoRA where full fine-tuning was asked for.
    cfg = compose_train(["experiment=llm_sft", "~lora"])
    assert "lora" in cfg  # the experiment's partial node
    HydraConfig.instance().set_config(cfg)
    try:
        assert checks.lora_callback(cfg) is None
        kept = compose_train(["experiment=llm_sft"])
        HydraConfig.instance().set_config(kept)
        assert checks.lora_callback(kept) is not None
    finally:
        HydraConfig.instance().cfg = None


def test_export_settings_are_typed_by_their_schema():
    cfg = compose_train(["lora_export.export_on_checkpoint=no", "lora_export.adapter_dir=5"])
    assert cfg.lora_export.export_on_checkpoint is False  # "no" is a boolean, not a true string
    assert cfg.lora_export.adapter_dir == "5"


# ------------------------------------------------------------------------- subprocess runs
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier with the real MiniLM tokenizer, saved like a pretrained model."""
    from models import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


def tiny_args(model_dir: Path) -> list[str]:
    return [
        f"model.model_name_or_path={model_dir}",
        f"data.tokenizer={model_dir}",
        "data.train_limit=64",
        "data.val_limit=32",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "test=false",
    ]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    return env


def train_py(
    args: list[str],
    timeout: int = 300,
    launcher: list[str] | None = None,
    expect_rc: int | None = 0,
    env: dict[str, str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>``; check its exit status unless ``expect_rc`` is None.

    ``merge_stderr``: stderr goes into ``stdout``, in the order the terminal would show them.
    """
    command = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    result = subprocess.run(
        command, cwd=ROOT, env={**subprocess_env(), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
        timeout=timeout,
    )  # fmt: skip
    if expect_rc is not None:
        assert result.returncode == expect_rc, result.stdout[-3000:] + (result.stderr or "")[-5000:]
    return result


def wandb_runs(directory: Path) -> list[Path]:
    return sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The output folder of one short job with a test pass, logging to W&B offline. (One job
    serves the three tests below: each job is an interpreter start.)"""
    out = tmp_path_factory.mktemp("short") / "run"
    train_py([*tiny_args(tiny_model_dir), "test=true", f"hydra.run.dir={out}"])
    return out


def test_train_py_writes_adapter_results_and_offline_wandb_run(short_run):
    out = short_run
    results = json.loads((out / "results.json").read_text())
    assert results["adapter_dir"] == str(out / "adapter")
    assert {"val/acc", "test/acc", "test/f1"} <= set(results["metrics"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "checkpoints").glob("*_adapter/adapter_config.json"))
    (run,) = wandb_runs(out)
    logged = run.read_bytes()
    # The resolved config, the lora/ counts and the metrics all reach the W&B run.
    for key in (b"lora/trainable_params", b"model_name_or_path", b"val/acc", b"train/loss"):
        assert key in logged, key


def test_exported_adapter_loads_onto_the_stock_hf_model_in_peft(tiny_model_dir, short_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = short_run
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))

    def stock():
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)

    ours = stock()
    load_adapter(ours, out / "adapter")
    peft_model = PeftModel.from_pretrained(stock(), out / "adapter")
    torch.testing.assert_close(peft_model.eval()(ids).logits, ours.eval()(ids).logits)


def test_evaluate_command_scores_a_saved_adapter_on_a_tsv(tiny_model_dir, short_run, tmp_path):
    out = short_run
    data = tmp_path / "split.tsv"
    data.write_text("label\tsentence\n1\ta great film\n0\ta dull mess\n1\tlovely\n")
    result = subprocess.run(
        [sys.executable, "-m", "lora_lightning.app.evaluate", str(out / "adapter"),
         "--data", str(data), "--model", str(tiny_model_dir), "--accelerator", "cpu",
         "--json", str(tmp_path / "metrics.json")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"adapter", "data", "acc", "f1", "loss"} and 0.0 <= metrics["acc"] <= 1
    assert [json.loads(line) for line in result.stdout.splitlines()] == [metrics]
    for noise in ("LOAD REPORT", "Tip:", "\x1b[", "Failed to load", "available:"):
        assert noise not in result.stdout + result.stderr, noise


def test_full_fine_tuning_runs_without_the_lora_group(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train_py([*tiny_args(tiny_model_dir), "~lora", "logger=none", f"hydra.run.dir={out}"])
    results = json.loads((out / "results.json").read_text())
    assert results["adapter_dir"] is None
    assert results["parameters"]["trainable"] == results["parameters"]["total"]


@pytest.fixture(scope="module")
def ddp_sweep(tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """A multirun of two jobs (``lora.r=1,2``) of 2 DDP processes each, logging to W&B: the
    sweep folder and the console output. (One sweep serves the multirun tests: each job is
    interpreter starts.)"""
    sweep = tmp_path_factory.mktemp("ddp-sweep") / "sweep"
    result = train_py(
        ["-m", "lora.r=1,2", *tiny_args(tiny_model_dir), "trainer.devices=2",
         "trainer.strategy=ddp", f"hydra.sweep.dir={sweep}"],
        timeout=600,
    )  # fmt: skip
    return sweep, result.stdout + result.stderr


@pytest.mark.slow
def test_multirun_gives_each_job_its_folder_adapter_and_wandb_run(ddp_sweep):
    sweep, _ = ddp_sweep
    runs = []
    for job, rank in (("0", 1), ("1", 2)):
        config = json.loads((sweep / job / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == rank
        (run,) = wandb_runs(sweep / job)
        runs.append(run.name)
        logged = run.read_bytes()
        assert f"lora.r={rank}".encode() in logged  # readable run name
        assert f"sst2-lora-{sweep.parent.name}-{sweep.name}".encode() in logged  # sweep group
    assert runs[0] != runs[1]
    assert {"summary.csv", "summary.md", "summary.png"} <= {p.name for p in sweep.iterdir()}


@pytest.mark.slow
def test_multirun_with_two_ddp_processes_per_job(ddp_sweep):
    sweep, output = ddp_sweep
    assert output.count("Launching 2 jobs") == 1  # the extra ranks did not start sweeps
    for job, rank in (("0", 1), ("1", 2)):
        config = json.loads((sweep / job / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == rank
        assert len(wandb_runs(sweep / job)) == 1  # rank zero alone created the W&B run
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_with_torchrun_on_loopback(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    args = [*tiny_args(tiny_model_dir), "trainer.num_nodes=2", "trainer.devices=1",
            "trainer.strategy=ddp", "logger=csv", f"hydra.run.dir={out}"]  # fmt: skip

    def torchrun(node: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
        ]  # fmt: skip

    node1 = subprocess.Popen(
        [*torchrun(1), str(ROOT / "train.py"), *args],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        result = train_py(args, launcher=torchrun(0))
        node1_output, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node1.returncode == 0, node1_output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in node1_output
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in result.stdout + result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_default_job_on_real_minilm_exports_an_adapter_peft_predicts_identically(tmp_path):
    """The real pretrained MiniLM on a slice of SST-2: the adapter gives PEFT's predictions."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_lightning.tasks import minilm_path, read_labelled_tsv, sst2_path

    out = tmp_path / "run"
    train_py(
        ["data.train_limit=128", "data.val_limit=64", "trainer.max_steps=4", "data.num_workers=0",
         "trainer.accelerator=cpu", "test=false", "logger=none", f"hydra.run.dir={out}"],
        timeout=600,
    )  # fmt: skip
    sentences = [s for s, _ in read_labelled_tsv(sst2_path("dev"))[:32]]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def stock():
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, local_files_only=True
        ).float()

    ours = stock()
    load_adapter(ours, out / "adapter")
    peft_model = PeftModel.from_pretrained(stock(), out / "adapter").eval()
    with torch.no_grad():
        expected = ours.eval()(**batch).logits
        got = peft_model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_returns_the_optimized_metric(tiny_model_dir, tmp_path):
    sweep = tmp_path / "optuna"
    train_py(
        ["-m", "hparams_search=sst2_optuna", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.sampler.n_startup_trials=2", *tiny_args(tiny_model_dir),
         "logger=none", f"hydra.sweep.dir={sweep}"],
        timeout=600,
    )  # fmt: skip
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and "lora.r" in best
    assert len(list(sweep.glob("*/results.json"))) == 2
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "model.lr" in rows[0]  # Optuna's sampled values are swept values


def test_console_script_composes_the_same_config():
    script = Path(sys.executable).parent / "lora-lightning-train"
    assert script.is_file(), "pip install -e . installs the lora-lightning-train console script"
    result = subprocess.run(
        [str(script), "lora.r=4", "--cfg", "job"],
        cwd="/", env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert OmegaConf.create(result.stdout).lora.r == 4
