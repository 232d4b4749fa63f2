"""`LoRACallback`: LoRA for any LightningModule, as a Lightning Callback.

The callback is thin: it calls the core functions (inject, count, save) at the right hooks.

Hook placement (Lightning 2.x, see PITFALLS.md):

- ``setup`` runs on every rank before the strategy wraps the model in DDP/FSDP and before
  ``configure_optimizers``: inject and freeze there, so DDP registers gradient hooks on the
  final set of trainable parameters.
- ``configure_optimizers`` is looked up on the module instance when called: a wrapper set in
  ``setup`` drops frozen parameters from whatever optimizers the user builds.
- ``Callback.on_save_checkpoint`` is skipped for ``save_weights_only`` checkpoints, while
  ``LightningModule.on_save_checkpoint`` always runs: the checkpoint is trimmed in a wrapper of
  the module hook. The module hook is also the only one that runs before the (non-strict) model
  state load, so that is where a resumed checkpoint is validated.
- Checkpoint files are written by the strategy's ``CheckpointIO`` on global rank zero, followed
  by a barrier on every rank: a wrapping ``CheckpointIO`` writes the adapter directory next to
  each checkpoint from the tensors Lightning already gathered (no ``state_dict()`` on one rank,
  which would deadlock under FSDP), and removes it with the checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from safetensors.torch import save_file
from torch import nn

from lora_lightning.adapter import _atomic_write, save_adapter
from lora_lightning.config import LoRAConfig
from lora_lightning.errors import CheckpointMismatchError, LoRAConfigError
from lora_lightning.inject import TargetFn, adapted_modules, inject_lora, trainable_names
from lora_lightning.merge import merged_weight
from lora_lightning.state import base_fingerprint, count_parameters, lora_state_dict

CHECKPOINT_KEY = "lora"
_WRAPPED = "_lora_callback_wrapped"


class LoRACallback(pl.Callback):
    """Adds LoRA to a LightningModule: inject, freeze, restrict optimizers, log, checkpoint.

    Args:
        config: a :class:`LoRAConfig`, a mapping of its fields (e.g. a Hydra ``DictConfig``),
            or None for the defaults.
        target_fn: optional ``target_fn(name, module) -> bool`` choosing targets instead of
            ``config.target_modules`` (names are relative to the LightningModule).
        adapter_dir: where the final adapter is written (default ``<default_root_dir>/adapter``).
        export_on_checkpoint: write ``<checkpoint stem>_adapter/`` next to every checkpoint.
        export_on_train_end: write ``adapter_dir`` when training ends.
        merge_on_end: also write ``<adapter_dir>/merged_model.safetensors``, the export root's
            state dict with the adapters folded in (plain base keys, for deployment).
        export_root: attribute path of the submodule whose module paths the adapter files
            use. ``"auto"`` picks the outermost Hugging Face model (an object with ``config``
            and ``save_pretrained``) holding every adapter and every other trained tensor
            (``modules_to_save``, biases), so PEFT loads the adapter onto the stock model;
            otherwise the LightningModule itself (``""``).
        **overrides: LoRAConfig fields overriding ``config`` (``LoRACallback(r=4)``).

    Raises:
        LoRAConfigError: on an invalid config (at construction) or targets matching nothing
            (at setup).
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        target_fn: TargetFn | None = None,
        adapter_dir: str | Path | None = None,
        export_on_checkpoint: bool = True,
        export_on_train_end: bool = True,
        merge_on_end: bool = False,
        export_root: str = "auto",
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.config = _build_config(config, overrides)
        self.target_fn = target_fn
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.export_on_checkpoint = export_on_checkpoint
        self.export_on_train_end = export_on_train_end
        self.merge_on_end = merge_on_end
        self.export_root = export_root
        self.adapted: list[str] = []
        self.fingerprint: str | None = None
        self.last_adapter_dir: Path | None = None
        self._printed = False
        # Loggers already given the counts (by identity): each logger of each Trainer once.
        self._logged_to: list[Any] = []
        self._module: pl.LightningModule | None = None

    # ----------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Inject once (idempotent across stages and repeated fits), freeze, wrap hooks."""
        self._module = pl_module
        if self.merge_on_end and isinstance(trainer.strategy, FSDPStrategy):
            raise LoRAConfigError(
                "LoRACallback(merge_on_end=True) is not supported under FSDP (the merged state "
                "dict would be gathered on one rank only); export the adapter and merge it "
                "offline with load_adapter + merge_lora"
            )
        try:
            self.adapted = inject_lora(pl_module, self.config, target_fn=self.target_fn)
        except LoRAConfigError as err:
            raise LoRAConfigError(
                f"{err}. Note: LoRACallback.setup runs before LightningModule.setup and "
                "configure_model, so layers built there do not exist yet; build them in "
                "__init__, or call inject_lora yourself at the end of configure_model"
            ) from None
        self.fingerprint = base_fingerprint(pl_module)
        # Frozen base weights are not in our checkpoints: the model load must be non-strict,
        # and _validate_checkpoint checks the keys that must be there.
        pl_module.strict_loading = False
        _enable_input_grads_for_checkpointing(pl_module)
        _wrap_once(pl_module, "configure_optimizers", self._restrict_optimizers)
        _wrap_once(pl_module, "on_save_checkpoint", self._trim_checkpoint)
        _wrap_once(pl_module, "on_load_checkpoint", self._validate_checkpoint)
        if not isinstance(trainer.strategy.checkpoint_io, _AdapterExportingIO):
            trainer.strategy.checkpoint_io = _AdapterExportingIO(
                trainer.strategy.checkpoint_io, self
            )
        self._log_counts(trainer, pl_module)
        launcher = getattr(trainer.strategy, "launcher", None)
        if getattr(launcher, "_start_method", None) in ("spawn", "fork", "forkserver"):
            rank_zero_warn(
                "LoRACallback with a spawn/fork DDP launcher: adapters are created in the worker "
                "processes and will not exist on the model in the main process afterwards; "
                "use strategy='ddp' to keep them (or load the exported adapter)."
            )

    # ------------------------------------------------------------------------ optimizers
    def _restrict_optimizers(self, original: Callable[[], Any]) -> Any:
        """Call the user's ``configure_optimizers`` and drop frozen parameters in place.

        Every return form works (an optimizer, lists, ``(optimizers, schedulers)``, dicts
        with ``lr_scheduler``) because optimizers are found wherever they are and edited in
        place: schedulers keep pointing at the same optimizer and the same param groups
        (a group left empty stays, so per-group scheduler lambdas keep their order).
        """
        result = original()
        optimizers = _find_optimizers(result)
        for index, optimizer in enumerate(optimizers):
            kept = 0
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
                kept += len(group["params"])
            if kept == 0:
                raise LoRAConfigError(
                    f"optimizer {index} ({type(optimizer).__name__}) has no trainable parameter "
                    "once LoRA froze the base model: build it from self.parameters() (frozen "
                    "ones are dropped) or from the adapter and modules_to_save parameters, or "
                    "add its modules to lora.modules_to_save"
                )
        return result

    # ---------------------------------------------------------------------- checkpoints
    def _trim_checkpoint(self, original: Callable[[dict], Any], checkpoint: dict) -> Any:
        """Keep only trainable tensors in ``checkpoint['state_dict']``, add LoRA metadata."""
        output = original(checkpoint)
        module = self._require_module()
        keep = set(lora_state_dict(module))
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = type(state)((k, v) for k, v in state.items() if k in keep)
        checkpoint[CHECKPOINT_KEY] = {
            "config": self.config.to_dict(),
            "base_fingerprint": self.fingerprint,
            "adapted_modules": list(self.adapted),
            "export_root": self._export_root(module)[0],
            "format": 1,
        }
        return output

    def _validate_checkpoint(self, original: Callable[[dict], Any], checkpoint: dict) -> Any:
        """Before the non-strict model load: same config, same base, every tensor present."""
        output = original(checkpoint)
        module = self._require_module()
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise CheckpointMismatchError(
                "the checkpoint was not written by a run with LoRACallback (it has no 'lora' "
                "entry), so resuming from it would silently drop LoRA state; to start LoRA from "
                "full-model weights, load them into the model before fit() instead of passing "
                "ckpt_path"
            )
        saved = dict(meta.get("config", {}))
        now = self.config.to_dict()
        differ = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in now.items()
                  if _plain(saved.get(k)) != _plain(v)]  # fmt: skip
        if differ:
            raise CheckpointMismatchError(
                "the checkpoint was trained with another LoRA config; differing fields: "
                + "; ".join(differ)
                + ". Resume with the checkpoint's config, or start a new run without ckpt_path"
            )
        if meta.get("base_fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"the checkpoint belongs to another base model (fingerprint "
                f"{meta.get('base_fingerprint')} vs this model's {self.fingerprint}): its frozen "
                "weights differ in names, shapes, dtypes or values; load the same pretrained base"
            )
        state = checkpoint.get("state_dict", {})
        expected = set(lora_state_dict(module))
        missing = sorted(expected - set(state))
        # Names only: module.state_dict() would be a collective under FSDP.
        # Every alias of a shared (tied) tensor is a state-dict key: keep duplicates.
        known = {n for n, _ in module.named_parameters(remove_duplicate=False)} | {
            n for n, _ in module.named_buffers(remove_duplicate=False)
        }
        unexpected = sorted(set(state) - known)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit the adapted model: missing {len(missing)} "
                f"trainable tensor(s) {missing[:6]}, unexpected {len(unexpected)} "
                f"{unexpected[:6]}; frozen base weights may be absent, adapters may not"
            )
        return output

    # -------------------------------------------------------------------------- export
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final adapter (global rank zero) and synchronise every rank."""
        if not self.export_on_train_end:
            return
        # A collective under FSDP: every rank gathers, rank zero writes.
        state = trainer.strategy.lightning_module_state_dict()
        directory = self.adapter_dir or Path(trainer.default_root_dir) / "adapter"
        if trainer.is_global_zero:
            self.export(state, directory)
            if self.merge_on_end:
                self._write_merged(pl_module, directory / "merged_model.safetensors")
        trainer.strategy.barrier("LoRACallback.on_train_end")
        self.last_adapter_dir = directory
        rank_zero_info(f"LoRA adapter written to {directory}")

    def export(self, state_dict: Mapping[str, torch.Tensor], directory: str | Path) -> Path:
        """Write a PEFT-format adapter from a LightningModule ``state_dict`` (keys as in it)."""
        prefix, root = self._export_root(self._require_module())
        prefix = f"{prefix}." if prefix else ""
        relative = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return save_adapter(root, directory, state_dict=relative)

    def _write_merged(self, pl_module: pl.LightningModule, path: Path) -> None:
        """Write the export root's state dict with ``s·B·A`` folded into copies of the weights.

        The live model is not merged and unmerged in place: that round trip changes the frozen
        base weights by float rounding (on rank zero only, under DDP).
        """
        _, root = self._export_root(pl_module)
        merged = {
            k: v.detach().to("cpu").contiguous().clone()
            for k, v in root.state_dict().items()
            if ".lora_" not in k
        }
        for name, module, spec in adapted_modules(root):
            if not spec.merged:  # merged by the user: the weight already holds s·B·A
                key = f"{name}.weight" if name else "weight"
                merged[key] = merged_weight(module).to("cpu").contiguous()
        _atomic_write(path, lambda tmp: save_file(merged, str(tmp)))

    def _export_root(self, pl_module: nn.Module) -> tuple[str, nn.Module]:
        if self.export_root != "auto":
            return self.export_root, pl_module.get_submodule(self.export_root)
        # Everything the adapter holds must be inside the root: adapters, modules_to_save
        # (e.g. a new head next to the Hugging Face backbone) and trained biases.
        names = [name for name, _, _ in adapted_modules(pl_module)]
        names += trainable_names(pl_module)
        for name, module in pl_module.named_modules():
            if name and hasattr(module, "save_pretrained") and hasattr(module, "config"):
                if all(n.startswith(name + ".") for n in names):
                    return name, module
        return "", pl_module

    # --------------------------------------------------------------------------- logging
    def _log_counts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = count_parameters(pl_module)
        hparams = {
            "lora/trainable_params": counts.trainable,
            "lora/total_params": counts.total,
            "lora/adapter_params": counts.adapter,
            "lora/trainable_percent": round(counts.trainable_percent, 4),
            "lora/adapted_modules": counts.adapted_modules,
            "lora/r": self.config.r,
            "lora/alpha": self.config.alpha,
            "lora/dropout": self.config.dropout,
            "lora/targets": ",".join(self.config.target_modules),
        }
        for logger in trainer.loggers:
            if not any(logger is done for done in self._logged_to):
                logger.log_hyperparams(hparams)
                self._logged_to.append(logger)
        if self._printed:
            return
        self._printed = True
        rows = [(key.removeprefix("lora/"), value) for key, value in hparams.items()]
        width = max(len(key) for key, _ in rows)
        table = "\n".join(f"  {key:<{width}}  {value}" for key, value in rows)
        rank_zero_info(f"LoRA summary\n{table}")

    def _require_module(self) -> pl.LightningModule:
        if self._module is None:
            raise RuntimeError("LoRACallback was used before setup() attached it to a module")
        return self._module


class _AdapterExportingIO(CheckpointIO):
    """Delegates to the strategy's CheckpointIO, and keeps an adapter beside each checkpoint."""

    def __init__(self, inner: CheckpointIO, callback: LoRACallback) -> None:
        self.inner = inner
        self.callback = callback

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if type(self.inner) is TorchCheckpointIO and storage_options is None and _local(path):
            # Lightning's _atomic_save writes a temp file in the *system* temp folder and
            # moves it: across filesystems the move copies into the destination, so a crash
            # or a full disk mid-copy destroys the previous file (last.ckpt). Write beside
            # the destination, fsync, rename.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
        else:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        if self.callback.export_on_checkpoint and CHECKPOINT_KEY in checkpoint:
            self.callback.export(checkpoint["state_dict"], adapter_dir_for(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        # Unset: keep the inner IO's default map_location, and never unpickle arbitrary
        # objects unless the caller asked for it (trainer.fit(..., weights_only=False)).
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return self.inner.load_checkpoint(
                path, weights_only=True if weights_only is None else weights_only, **kwargs
            )
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file gets one clear error
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
            raise CheckpointMismatchError(
                f"checkpoint {path} could not be read ({reason}); it is truncated, corrupted, "
                "not a PyTorch checkpoint, or holds objects a weights-only load refuses to "
                "unpickle. Resume from another checkpoint (e.g. an earlier one) or start "
                "without ckpt_path"
            ) from err

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        _remove_folder(adapter_dir_for(path))

    def teardown(self) -> None:
        self.inner.teardown()


def _local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and "://" not in str(path)


def _remove_folder(folder: Path) -> None:
    """Delete ``folder`` so that a crash never leaves it half-deleted under its own name."""
    if not folder.is_dir():
        return
    doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def adapter_dir_for(checkpoint_path: str | Path) -> Path:
    """The adapter directory kept beside a checkpoint: ``epoch=1.ckpt`` -> ``epoch=1_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_adapter")


def _build_config(config: LoRAConfig | Mapping[str, Any] | None, overrides: dict) -> LoRAConfig:
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, LoRAConfig):
        values = config.to_dict()
    else:
        values = {key: config[key] for key in config}
    values.update(overrides)
    return LoRAConfig.from_dict(values)


def _wrap_once(module: nn.Module, hook: str, wrapper: Callable[..., Any]) -> None:
    """Replace ``module.<hook>`` on the instance by ``wrapper(original, *args)``, once."""
    current = getattr(module, hook)
    if getattr(current, _WRAPPED, False):
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(current, *args, **kwargs)

    setattr(wrapped, _WRAPPED, True)
    # Instance attribute, not a Module child: object.__setattr__ keeps nn.Module out of it.
    object.__setattr__(module, hook, wrapped)


def _find_optimizers(value: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer inside a ``configure_optimizers`` return value, in order, once."""
    if isinstance(value, torch.optim.Optimizer):
        return [value]
    found: list[torch.optim.Optimizer] = []
    if isinstance(value, Mapping):
        found += _find_optimizers(value.get("optimizer"))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _find_optimizers(item)
    return list(dict.fromkeys(found))


def _enable_input_grads_for_checkpointing(module: nn.Module) -> None:
    """With gradient checkpointing and a frozen embedding, make the embedding output need grad.

    Reentrant checkpointing only backpropagates into a segment whose inputs require grad; with
    every base weight frozen nothing does, and backward fails with "element 0 of tensors does
    not require grad" (PEFT issue 137). Hugging Face models expose the fix as
    ``enable_input_require_grads``.
    """
    for sub in module.modules():
        if not hasattr(sub, "enable_input_require_grads"):
            continue
        # transformers 5 renamed the flag (the old name warns); older releases have only it.
        flag = getattr(sub, "is_activation_checkpointing", None)
        if flag is None:
            flag = getattr(sub, "is_gradient_checkpointing", False)
        if flag:
            if not getattr(sub, "_lora_input_grads", False):
                sub.enable_input_require_grads()
                object.__setattr__(sub, "_lora_input_grads", True)
            return


def _plain(value: Any) -> Any:
    """Normalise config values for comparison (tuples vs lists, ints vs floats)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


__all__ = ["LoRACallback", "adapter_dir_for"]
