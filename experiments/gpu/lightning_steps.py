"""Step 3, Lightning on the GPU: one process (``devices=1``) under ``strategy=fsdp`` (3a: the
FSDP wrapping, flat-parameter and full-state-dict gathering paths run, one ``BertLayer`` per
FSDP unit), under FSDP2 (3c: this project's ``FSDP2Strategy``, Lightning's
``ModelParallelStrategy`` with ``shard_model``, single-file checkpoints) and under
``strategy=ddp`` (3b). The same round trip for all three:

1. ``fit_with_checkpoints``: ``LoRACallback`` (the default job's LoRA: every encoder Linear,
   the classifier in ``modules_to_save``, dropout 0) on the real MiniLM with its own dropouts
   at 0 and eager attention (a reproducible run), ``precision="bf16-mixed"`` (``32-true`` on
   the CPU, whose bf16 matmuls are emulated and slow), the loader's order kept
   (``use_distributed_sampler=False``), two epochs, a ``ModelCheckpoint`` after each: the
   checkpoints, the adapter beside each, the final adapter.
2. ``trimmed_checkpoint``: the epoch-0 checkpoint holds exactly the adapter tensors and the
   classifier (``lora_state_dict`` names), optimizer state for exactly those, the ``lora``
   entry, and is a small fraction of the full model's bytes.
3. ``adapter_export``: the exported adapters hold exactly the last checkpoint's values, in
   PEFT's full shapes (not one rank's flat shard).
4. ``exact_resume``: a fresh module resumed from the epoch-0 checkpoint ends with the same
   adapters and optimizer moments as the uninterrupted run (bitwise expected).
5. ``peft_load``: the exported adapter loads in PEFT (``PeftModel.from_pretrained``) and gives
   the outputs our ``load_adapter`` gives on the same base, different from the base's.

FSDP2 adds ``sharded_with_fsdp2``: after the fit every parameter is a DTensor, the FSDP units
are the blocks ``shard_model`` finds (every ``BertLayer`` among them) plus the root, and the
optimizer holds exactly the trainable parameters.

With ``--smoke`` on the CPU all three run on one CPU process (gloo), tiny batches; FSDP1
through :class:`CPUFSDP1Strategy` (Lightning refuses ``strategy=fsdp`` with
``accelerator=cpu``, and FSDP1 needs ``device_id=cpu`` there), so the FSDP1 wrapping and
full-state-dict paths run in the test suite too: the first GPU run (2026-12-04) found them
broken (names under ``_fsdp_wrapped_module``, a resume validated only after the strategy had
loaded it), which the smoke run had skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from experiments.gpu.common import (
    ALPHA,
    RANK,
    SEED,
    Context,
    Recorder,
    SkipCheck,
    batch_loader,
    lightning_classifier,
    minilm,
    quiet_trainer,
    rel_err,
    token_batches,
)
from lora_lightning import LoRACallback, LoRAConfig, inject_lora, load_adapter, lora_state_dict

EPOCHS = 2
PEFT_PREFIX = "base_model.model."
#: The LightningModule holds the Hugging Face model at ``.model``.
MODULE_PREFIX = "model."
#: Resumed vs uninterrupted adapters: max |diff| / max |value| (0 expected: same kernels).
RESUME_TOLERANCE = 1e-6
#: Our load_adapter vs PEFT's loader on the same base, float32 logits.
PEFT_TOLERANCE = 1e-4
#: The trimmed checkpoint must be smaller than this fraction of the model's weights.
MAX_CHECKPOINT_FRACTION = 0.1


def cpu_fsdp1_strategy(**kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` (FSDP1) on the CPU, for tests and the smoke run only: a
    subclass, which Lightning's accelerator check (``type(strategy) is FSDPStrategy``) lets
    through, that wraps the model with ``device_id=cpu`` (FSDP1 refuses a CPU module without
    it); everything else, the state-dict and checkpoint paths included, is Lightning's."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDP1Strategy(FSDPStrategy):
        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                model = FullyShardedDataParallel(
                    module=model,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    **self.kwargs,
                )
                self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn
            return super()._setup_model(model)  # already wrapped: Lightning's other steps

    return CPUFSDP1Strategy(**kwargs)


def run_fsdp(ctx: Context, rec: Recorder) -> None:
    def fsdp() -> Any:
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.bert.modeling_bert import BertLayer

        if not ctx.cuda:
            return cpu_fsdp1_strategy(auto_wrap_policy={BertLayer}, state_dict_type="full")
        return FSDPStrategy(auto_wrap_policy={BertLayer}, state_dict_type="full")

    round_trip(ctx, rec, fsdp)


def run_fsdp2(ctx: Context, rec: Recorder) -> None:
    """3c: FSDP2 through ``lora_lightning.lightning.FSDP2Strategy`` (Lightning's
    ``ModelParallelStrategy``, ``shard_model``: one unit per ``BertLayer``, then the root),
    single-file checkpoints (``save_distributed_checkpoint=False``: gathered on rank zero, the
    form the round trip's file checks read). Runs on the CPU too (one gloo process)."""

    def fsdp2() -> Any:
        from lora_lightning.lightning import FSDP2Strategy

        return FSDP2Strategy(save_distributed_checkpoint=False)

    runs = round_trip(ctx, rec, fsdp2)
    with rec.check("sharded_with_fsdp2") as entry:
        if "straight" not in runs:
            raise SkipCheck("the straight run did not finish (see fit_with_checkpoints)")
        entry.update(fsdp2_sharding(runs["straight"]))


def fsdp2_sharding(run: dict[str, Any]) -> dict[str, Any]:
    """After the fit: every parameter of the model is a DTensor (``fully_shard`` ran on the
    whole model, adapters included), the FSDP units are the transformer blocks
    ``shard_model`` finds (every ``BertLayer`` among them) plus the root, and the optimizer
    holds exactly the trainable parameters (adapters and the classifier)."""
    from torch.distributed.fsdp import FSDPModule

    from lora_lightning.lightning.sharded import is_dtensor, transformer_blocks

    module = run["module"]
    params = dict(module.named_parameters())
    plain = sorted(name for name, p in params.items() if not is_dtensor(p))
    units = {name for name, sub in module.named_modules() if isinstance(sub, FSDPModule)}
    # Read from an unsharded copy: fully_shard renames the classes (FSDPBertLayer).
    unsharded = lightning_classifier(minilm())
    expected = {name for name, _ in transformer_blocks(unsharded)} | {"model"}
    layers = {f"model.bert.encoder.layer.{i}" for i in range(len(module.model.bert.encoder.layer))}
    optimized = {id(p) for g in run["trainer"].optimizers[0].param_groups for p in g["params"]}
    trainable = {id(p) for p in params.values() if p.requires_grad}
    return {
        "ok": not plain and units == expected and layers <= units and optimized == trainable,
        "summary": f"{len(params) - len(plain)} of {len(params)} parameters are DTensors, "
        f"{len(units)} FSDP units ({len(layers)} BertLayers, expected {len(expected)}), the "
        f"optimizer holds {len(optimized)} parameters ({len(trainable)} trainable)",
        "not_sharded": plain[:10],
        "fsdp_units": sorted(units),
        "expected_units": sorted(expected),
        "optimized_equals_trainable": optimized == trainable,
    }


def run_ddp(ctx: Context, rec: Recorder) -> None:
    round_trip(ctx, rec, lambda: "ddp")


def lora_config() -> LoRAConfig:
    """``conf/lora/default.yaml`` with dropout 0 (a reproducible run)."""
    return LoRAConfig(
        r=RANK,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=[r".*\.(query|key|value|dense)"],
        exclude_modules=[".*pooler.*"],
        modules_to_save=[r"(.*\.)?classifier"],
    )


def reproducible_minilm() -> torch.nn.Module:
    model = minilm(no_dropout=True)
    # Matmuls and softmax only (no fused attention kernels): bitwise reruns.
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"
    return model


def round_trip(
    ctx: Context, rec: Recorder, strategy: Callable[[], Any]
) -> dict[str, dict[str, Any]]:
    """The round trip of the module docstring under ``strategy()`` (a new strategy per fit);
    returns the runs (``straight``, ``resumed``: trainer, module, checkpoint and adapter
    folders) for checks of a strategy's own."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    work = Path(ctx.workdir)
    if ctx.cuda:
        # Bitwise reruns on the GPU: deterministic cuBLAS workspaces (set before the first
        # matmul of this process) and deterministic kernels where torch has them.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    n_batches, batch, seq_len = (2, 2, 8) if ctx.smoke else (6, 16, 64)
    batches = token_batches(30522, n_batches, batch, seq_len)
    # CPU bf16 matmuls are emulated (seconds per MiniLM step): the smoke run uses float32.
    precision = "bf16-mixed" if ctx.cuda else "32-true"
    rec.record["data"]["setup"] = {
        "epochs": EPOCHS,
        "batches_per_epoch": n_batches,
        "batch": [batch, seq_len],
        "precision": precision,
        "lora": "r=8, alpha=16, dropout 0, every encoder Linear, classifier in modules_to_save",
    }
    runs: dict[str, dict[str, Any]] = {}

    def fit(label: str, ckpt_path: Path | None = None) -> dict[str, Any]:
        torch.manual_seed(SEED)
        module = lightning_classifier(reproducible_minilm())
        checkpoint = ModelCheckpoint(
            dirpath=work / f"ckpt_{label}", filename="{epoch}", save_top_k=-1
        )
        callback = LoRACallback(lora_config(), adapter_dir=work / f"adapter_{label}")
        trainer = quiet_trainer(
            ctx,
            strategy=strategy(),
            precision=precision,
            max_epochs=EPOCHS,
            callbacks=[callback, checkpoint],
            enable_checkpointing=True,
            # Keep the loader's fixed order: under DDP Lightning would swap in a shuffling
            # DistributedSampler (it takes a batch_size=None loader for a shuffled one), and a
            # run resumed at an epoch boundary then sees the epoch in another order.
            use_distributed_sampler=False,
        )
        trainer.fit(module, batch_loader(batches), ckpt_path=ckpt_path)
        return {"trainer": trainer, "module": module, "dir": work / f"ckpt_{label}",
                "adapter": work / f"adapter_{label}"}  # fmt: skip

    with rec.check("fit_with_checkpoints") as entry:
        run = runs["straight"] = fit("straight")
        ckpts = sorted(p.name for p in run["dir"].glob("*.ckpt"))
        expected = [f"epoch={i}.ckpt" for i in range(EPOCHS)]
        beside = [(run["dir"] / f"epoch={i}_adapter").is_dir() for i in range(EPOCHS)]
        entry.update(
            ok=ckpts == expected
            and all(beside)
            and (run["adapter"] / "adapter_model.safetensors").is_file()
            and run["trainer"].global_step == EPOCHS * n_batches,
            summary=f"{ckpts}, global_step {run['trainer'].global_step}",
            checkpoints=ckpts,
            adapters_beside_checkpoints=beside,
            global_step=run["trainer"].global_step,
        )

    first = work / "ckpt_straight" / "epoch=0.ckpt"
    last = work / "ckpt_straight" / f"epoch={EPOCHS - 1}.ckpt"

    with rec.check("trimmed_checkpoint") as entry:
        checkpoint = torch.load(first, map_location="cpu", weights_only=False)
        reference = lightning_classifier(minilm())
        inject_lora(reference, lora_config())
        expected_keys = set(lora_state_dict(reference))
        keys = set(checkpoint["state_dict"])
        model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        size = first.stat().st_size
        states = checkpoint["optimizer_states"][0]["state"]
        entry.update(
            ok=keys == expected_keys
            and "lora" in checkpoint
            and len(states) == len(expected_keys)
            and size < MAX_CHECKPOINT_FRACTION * model_bytes,
            summary=f"{len(keys)} tensors (expected {len(expected_keys)}), {size:,} bytes = "
            f"{size / model_bytes:.3f} of the model's weights, optimizer state for "
            f"{len(states)} tensors",
            missing=sorted(expected_keys - keys)[:10],
            unexpected=sorted(keys - expected_keys)[:10],
            checkpoint_bytes=size,
            model_weight_bytes=model_bytes,
            optimizer_state_tensors=len(states),
            has_lora_entry="lora" in checkpoint,
        )

    with rec.check("adapter_export") as entry:
        state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
        exported = load_file(str(runs["straight"]["adapter"] / "adapter_model.safetensors"))
        beside = load_file(
            str(last.with_name(last.stem + "_adapter") / "adapter_model.safetensors")
        )
        mapped = {_from_peft(k): v for k, v in exported.items()}
        differ = [k for k, v in mapped.items() if k not in state or not torch.equal(v, state[k])]
        flat = [k for k, v in exported.items() if "lora_" in k and v.dim() != 2]
        entry.update(
            ok=not differ
            and not flat
            and set(mapped) == set(state)
            and set(exported) == set(beside)
            and all(torch.equal(exported[k], beside[k]) for k in exported),
            summary=f"{len(exported)} tensors, equal to the last checkpoint: {not differ}",
            tensors=len(exported),
            differing=differ[:10],
            not_two_dimensional=flat[:10],
            missing_from_export=sorted(set(state) - set(mapped))[:10],
        )

    with rec.check("exact_resume") as entry:
        resumed = runs["resumed"] = fit("resumed", ckpt_path=first)
        a = load_file(str(runs["straight"]["adapter"] / "adapter_model.safetensors"))
        b = load_file(str(resumed["adapter"] / "adapter_model.safetensors"))
        diff = max(rel_err(b[k], a[k]) for k in a)
        bitwise = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        moments = _moment_diff(last, resumed["dir"] / last.name)
        entry.update(
            ok=set(a) == set(b)
            and diff <= RESUME_TOLERANCE
            and moments <= RESUME_TOLERANCE
            and resumed["trainer"].global_step == runs["straight"]["trainer"].global_step,
            summary=f"adapters bitwise equal: {bitwise}, max rel diff {diff:.1e}, optimizer "
            f"moments max rel diff {moments:.1e}",
            bitwise_equal=bitwise,
            max_rel_adapter_diff=diff,
            max_rel_moment_diff=moments,
            global_steps=[
                runs["straight"]["trainer"].global_step,
                resumed["trainer"].global_step,
            ],
        )

    with rec.check("peft_load") as entry:
        entry.update(peft_load(ctx, runs["straight"]["adapter"], batches[0]))
    return runs


def _from_peft(key: str) -> str:
    return MODULE_PREFIX + key.removeprefix(PEFT_PREFIX)


def _moment_diff(path_a: Path, path_b: Path) -> float:
    """Max relative difference of every AdamW moment between two checkpoints."""
    states = [
        torch.load(p, map_location="cpu", weights_only=False)["optimizer_states"][0]["state"]
        for p in (path_a, path_b)
    ]
    worst = 0.0
    for key, values in states[0].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                worst = max(worst, rel_err(states[1][key][name], value))
    if set(states[0]) != set(states[1]):
        return float("inf")
    return worst


def peft_load(ctx: Context, adapter_dir: Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    from peft import PeftModel

    inputs = {k: v.to(ctx.device) for k, v in batch.items() if k != "labels"}

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.to(ctx.device).eval()(**inputs).logits.float()

    theirs = logits(PeftModel.from_pretrained(minilm(), str(adapter_dir)))
    ours_model = minilm()
    loaded = load_adapter(ours_model, adapter_dir)
    ours = logits(ours_model)
    base = logits(minilm())
    err = rel_err(theirs, ours)
    changed = rel_err(base, ours)
    return {
        "ok": err <= PEFT_TOLERANCE and changed > 100 * PEFT_TOLERANCE,
        "summary": f"PEFT vs ours {err:.1e} (tolerance {PEFT_TOLERANCE:.0e}); base vs ours "
        f"{changed:.1e}",
        "peft_vs_ours_rel_err": err,
        "base_vs_ours_rel_err": changed,
        "adapted_modules_loaded": len(loaded),
    }
