"""`python train.py experiment=llm_sft` end to end: on a tiny Llama saved to disk (fast), and on
the real SmolLM2-135M-Instruct (slow): results with base and tuned exact match, a PEFT-format
adapter that PEFT loads onto the plain float model with our logits and greedy tokens, a merged
export a plain transformers model generates the same tokens from, and the tied-embedding rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from llm_models import char_tokenizer, tiny_causal_lm
from safetensors.torch import load_file
from test_app import compose_train, train_py
from test_app_resume import KILLER_ENV, _assert_same_adapter, _killer

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAStateError,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lora_lightning.core.plan import TiedWeightWarning
from lora_lightning.tasks.generation import greedy_generate, left_pad

KEYS = ("test/exact_match", "base/test/exact_match", "val/loss", "val/perplexity")


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny tied Llama and the character ChatML tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny_llm")
    tiny_causal_lm().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_nf4_llm_dir(tmp_path_factory) -> Path:
    """The tiny Llama with 4 key/value heads: every projection nf4 can store (1024 weights)."""
    folder = tmp_path_factory.mktemp("tiny_llm_nf4")
    tiny_causal_lm(kv_heads=4).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def short_job(model_dir: Path | None, out: Path) -> list[str]:
    args = [
        "experiment=llm_sft",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.train_limit=16",
        "data.val_limit=4",
        "data.test_limit=5",
        "data.eval_batch_size=5",
        "model.max_new_tokens=4",
        f"hydra.run.dir={out}",
    ]
    if model_dir is not None:  # characters are tokens: the task set needs room
        args += [f"model.model={model_dir}", f"data.tokenizer={model_dir}", "data.max_length=400"]
    return args


def test_the_llm_experiment_composes_with_llama_targets_and_no_classifier_head():
    cfg = compose_train(["experiment=llm_sft"])
    assert cfg.model._target_ == "lora_lightning.tasks.CausalLMTask"
    assert cfg.data._target_ == "lora_lightning.tasks.InstructDataModule"
    assert "gate_proj" in cfg.lora.target_modules[0] and cfg.lora.modules_to_save == []
    assert cfg.callbacks.model_checkpoint.monitor == "val/loss"


def _resumable_llm_job(model_dir: Path, out: Path) -> list[str]:
    # 16 rows in batches of 4, 2 epochs: the signal at step 5 (_killer) lands mid-epoch; the
    # LoRA dropout makes the RNG state matter.
    job = [a for a in short_job(model_dir, out) if a != "trainer.max_steps=2"]
    return [*job, "data.batch_size=4", "trainer.max_steps=-1", "trainer.max_epochs=2",
            "logger=none"]  # fmt: skip


@pytest.fixture(scope="module")
def llm_job(tiny_llm_dir, tmp_path_factory) -> tuple[Path, str]:
    """The short resumable LLM job run straight through: its folder and console output. (One
    job serves the first test below and the SIGTERM test: each job is an interpreter start.)"""
    out = tmp_path_factory.mktemp("llm") / "straight"
    result = train_py(_resumable_llm_job(tiny_llm_dir, out), timeout=600)
    return out, result.stdout + result.stderr


def test_a_short_llm_job_writes_base_and_tuned_exact_match_and_a_peft_adapter(
    tiny_llm_dir, llm_job
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, output = llm_job
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert set(KEYS) <= set(metrics)
    assert any(k.startswith("test/exact_match/") for k in metrics)
    assert "base/test/exact_match" in output  # the final block
    ids = torch.tensor([[3, 40, 41, 42, 43, 44, 45]])
    ours = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llm_dir), out / "adapter"
    )
    torch.testing.assert_close(theirs.eval()(ids).logits, ours.eval()(ids).logits)


def test_a_short_llm_job_stopped_before_its_first_validation_is_validated_at_its_last_step(
    tiny_llm_dir, tmp_path
):
    out = tmp_path / "run"
    # 16 rows in batches of 8, validation every 2 steps: the job stops after 1.
    train_py([*short_job(tiny_llm_dir, out), "trainer.max_steps=1", "test=false"], timeout=600)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert {"val/loss", "val/perplexity"} <= set(metrics)
    assert (out / "checkpoints" / "epoch=0-step=1.ckpt").is_file()  # the best by val/loss


def two_process_job(model_dir: Path, out: Path, trainer: str) -> Path:
    # 16 rows in batches of 4: 2 steps per process, so validation at step 2 is reachable.
    train_py(
        [*short_job(model_dir, out), f"trainer={trainer}", "trainer.devices=2",
         "data.batch_size=4"],
        timeout=900,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ddp_job(tiny_llm_dir, tmp_path_factory) -> Path:
    return two_process_job(tiny_llm_dir, tmp_path_factory.mktemp("llm") / "ddp", "ddp")


@pytest.fixture(scope="module")
def fsdp_job(tiny_llm_dir, tmp_path_factory) -> Path:
    return two_process_job(tiny_llm_dir, tmp_path_factory.mktemp("llm") / "fsdp", "fsdp")


@pytest.mark.slow
def test_the_llm_job_runs_under_two_process_cpu_ddp(ddp_job):
    metrics = json.loads((ddp_job / "results.json").read_text())["metrics"]
    assert set(KEYS) <= set(metrics)


@pytest.mark.slow
def test_the_llm_job_runs_under_two_process_cpu_fsdp_and_exports_the_trained_adapter_whole(
    fsdp_job, tiny_llm_dir, tmp_path
):
    from peft import PeftModel
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    metrics = json.loads((fsdp_job / "results.json").read_text())["metrics"]
    assert set(KEYS) <= set(metrics)
    # The final step's adapters as the ranks' shards in last.ckpt hold them, joined by
    # torch.distributed.checkpoint itself: the exported file holds exactly these.
    last = fsdp_job / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 2
    dcp_to_torch_save(last, tmp_path / "last.pt")
    trained = torch.load(tmp_path / "last.pt", weights_only=False)["state_dict"]
    exported = load_file(fsdp_job / "adapter" / "adapter_model.safetensors")
    assert set(exported) == {f"base_model.{key}" for key in trained}  # model.X -> PEFT's names
    for key, tensor in trained.items():
        assert torch.equal(exported[f"base_model.{key}"], tensor), key
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    PeftModel.from_pretrained(base, fsdp_job / "adapter")  # refuses a tensor of the wrong shape


@pytest.mark.slow
def test_the_llm_job_trains_the_same_adapter_sharded_as_under_ddp(fsdp_job, ddp_job):
    from safetensors.torch import load_file

    # Bit for bit on CPU with 2 processes: both average two gradients, and halving is exact.
    sharded = load_file(fsdp_job / "adapter" / "adapter_model.safetensors")
    replicated = load_file(ddp_job / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == replicated.keys()
    for key in sharded:
        assert torch.equal(sharded[key], replicated[key]), key


# --- the job's variants: QLoRA, DoRA, a rank sweep, preemption and resume ------------------


@pytest.mark.slow
def test_the_llm_job_trains_on_an_nf4_base(tiny_nf4_llm_dir, tmp_path):
    out = tmp_path / "nf4"
    train_py([*short_job(tiny_nf4_llm_dir, out), "lora.quantize_base=nf4", "logger=none"])
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert set(KEYS) <= set(metrics)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lora"]["config"]["quantize_base"] == "nf4"
    assert len(checkpoint["lora"]["adapted_modules"]) == 14  # every projection, none refused
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def dora_sweep(tiny_llm_dir, tmp_path_factory) -> tuple[Path, str]:
    """A rank sweep (``-m lora.r=2,4``) of the short job with DoRA: the sweep folder and the
    console output. (One sweep serves the DoRA test and the sweep test: each job started is an
    interpreter start.)"""
    root = tmp_path_factory.mktemp("llm")
    sweep = root / "sweep"
    job = [a for a in short_job(tiny_llm_dir, root) if not a.startswith("hydra.run.dir")]
    result = train_py(["-m", "lora.r=2,4", *job, "lora.use_dora=true", "logger=none",
                       f"hydra.sweep.dir={sweep}"], timeout=900)  # fmt: skip
    return sweep, result.stdout


@pytest.mark.slow
def test_the_llm_job_with_dora_warns_that_vllm_refuses_it_and_peft_loads_it(
    tiny_llm_dir, dora_sweep
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = dora_sweep[0] / "0"
    log = (out / "train.log").read_text()
    assert f"{out / 'adapter'} loads in PEFT, but vLLM refuses adapters with DoRA" in log
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    ids = torch.tensor([[3, 40, 41, 42, 43, 44, 45]])
    ours = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llm_dir), out / "adapter"
    )
    torch.testing.assert_close(theirs.eval()(ids).logits, ours.eval()(ids).logits)


@pytest.mark.slow
def test_a_rank_sweep_of_the_llm_job_writes_the_summary_table_and_plot(dora_sweep):
    sweep, output = dora_sweep
    for folder, rank in (("0", 2), ("1", 4)):
        config = json.loads((sweep / folder / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == rank
    header, *rows = list(csv.reader((sweep / "summary.csv").open()))
    assert header[:3] == ["job", "lora.r", "test/exact_match"]
    assert "base/test/exact_match" in header
    assert [row[1] for row in rows] == ["2", "4"]
    assert (sweep / "summary.png").stat().st_size > 0
    assert "| job | lora.r | test/exact_match |" in output


@pytest.mark.slow
def test_sigterm_then_resume_auto_gives_the_llm_jobs_uninterrupted_adapter(
    tiny_llm_dir, llm_job, tmp_path
):
    straight, _ = llm_job
    interrupted = tmp_path / "interrupted"
    stopped = train_py(
        [*_resumable_llm_job(tiny_llm_dir, interrupted), *_killer("SIGTERM")],
        expect_rc=143, env=KILLER_ENV,
    )  # fmt: skip
    assert "SIGTERM: checkpoint saved" in stopped.stdout + stopped.stderr
    assert (interrupted / "checkpoints" / "preempted.ckpt").is_file()
    assert not (interrupted / "adapter").exists()
    resumed = train_py([*_resumable_llm_job(tiny_llm_dir, interrupted), "resume=auto"])
    assert f"Resuming from {interrupted / 'checkpoints' / 'preempted.ckpt'}" in resumed.stdout
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    _assert_same_adapter(expected, interrupted)
    # The base evaluation ran once, before the interruption, and its numbers travelled on.
    before = json.loads((straight / "results.json").read_text())["metrics"]
    after = json.loads((interrupted / "results.json").read_text())["metrics"]
    assert after["base/test/exact_match"] == before["base/test/exact_match"]
    assert after["test/exact_match"] == before["test/exact_match"]


# --- the real SmolLM2 ---------------------------------------------------------------------


def smollm2():
    from transformers import AutoModelForCausalLM

    from lora_lightning.tasks import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), local_files_only=True).eval()


@pytest.mark.slow
def test_smollm2_job_exports_an_adapter_peft_and_a_merged_model_generate_alike(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lora_lightning.tasks import smollm2_path

    out = tmp_path / "smol"
    train_py([*short_job(None, out), "lora_export.merge_on_end=true", "logger=csv"], timeout=1800)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert set(KEYS) <= set(metrics)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 plus 7? Answer with the number only."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = left_pad([tokenizer(prompt, add_special_tokens=False)["input_ids"]], 2)

    def answer(model):
        return greedy_generate(model, **batch, max_new_tokens=8, pad_id=2, eos_ids=[2])

    base = smollm2()
    ours = smollm2()
    load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(smollm2(), out / "adapter").eval()
    with torch.no_grad():
        logits_ours = ours(**batch).logits
        logits_theirs = theirs(**batch).logits
        logits_base = base(**batch).logits
    assert not torch.allclose(logits_ours, logits_base, atol=1e-4)  # the adapter did train
    torch.testing.assert_close(logits_theirs, logits_ours, rtol=1e-4, atol=1e-4)
    assert answer(theirs).tolist() == answer(ours).tolist()

    merged = base  # its logits are taken; the merged file replaces every tensor (asserted below)
    state = load_file(out / "adapter" / "merged_model.safetensors")
    missing, unexpected = merged.load_state_dict(
        {k.removeprefix("model."): v for k, v in state.items()}
        if "model.model.embed_tokens.weight" in state
        else state,
        strict=False,
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert answer(merged).tolist() == answer(ours).tolist()


@pytest.mark.slow
def test_smollm2s_tied_lm_head_follows_the_tied_weight_rules(tmp_path):
    model = smollm2()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(TiedWeightWarning, match="embed_tokens"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(LoRAStateError, match="tied"):
        merge_lora(model)
    trained_head = smollm2()
    inject_lora(
        trained_head, LoRAConfig(r=2, target_modules=[".*q_proj"], modules_to_save=["lm_head"])
    )
    with pytest.raises(AdapterFileError, match="tied weights"):
        save_adapter(trained_head, tmp_path / "tied")


@pytest.mark.slow
def test_smollm2_config_is_the_architecture_of_the_packaged_model():
    """``smollm2_config()`` (the values hard-coded for building SmolLM2's shapes without its
    weights) equals the config of the model converted from the package's GGUF."""
    from lora_lightning.tasks import smollm2_config, smollm2_path

    packaged = json.loads((smollm2_path() / "config.json").read_text())
    # Names and bookkeeping, not architecture: the GGUF's model name, the saved dtype...
    for key in ("_model_name_or_path", "architectures", "dtype", "transformers_version"):
        packaged.pop(key)
    ours = smollm2_config().to_dict()
    assert {key: ours.get(key) for key in packaged} == packaged
