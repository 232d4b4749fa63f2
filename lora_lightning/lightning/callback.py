"""`LoRACallback`: LoRA for any LightningModule, as a Lightning Callback with hooks only.

Owns: when things happen. What happens is the core's (plan, inject, counts, export root,
merged state dict, save), ``lightning.checkpoint``'s (trim, validate) and
``lightning.fingerprint``'s; the callback holds its options, the module it set up and the
resolved export root. Must not import: ``app/``, Hydra, W&B.

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
  which would deadlock under FSDP), and removes it with the checkpoint. It also refuses a file
  that holds no Lightning checkpoint dict before Lightning indexes into it.
- On resume the optimizers exist only from ``on_fit_start`` on (``restore_checkpoint_after_
  setup`` strategies load the checkpoint even later): the checkpoint's optimizer states are
  compared with them at whichever of the two comes second, before Lightning restores them.
- FSDP2 (``ModelParallelStrategy``): ``setup`` runs before ``configure_model`` shards the
  model, so adapters are sharded with the frozen base; the strategy writes and reads its
  checkpoints itself, so ``lightning.sharded.attach_to_strategy`` makes them adapter-only and
  validated before loading, and exports gather every rank's shards.
- ``torch.compile``: a compiled LightningModule reaches the hooks unwrapped (Lightning's
  ``from_compiled``); a compiled submodule (``self.net = torch.compile(net)``) is looked
  through while planning and injecting, so module names, adapter init seeds, checkpoint and
  adapter keys carry no ``_orig_mod.`` and equal the uncompiled model's.
- FSDP1 (``strategy=fsdp``) and activation checkpointing wrap blocks after ``setup``
  (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` in every name below them): every
  name the callback reads from the model is cleaned the same way (``checkpoint.clean_name``,
  ``without_wrappers``), so trimmed checkpoints, resume checks and exported adapters carry the
  unwrapped model's names, those of the full state dict the strategy gathers.
- The global RNG states of every rank go into the callback's own checkpoint state and are
  restored at ``on_train_start`` (inherited from ``lightning.rng.RNGStateCallback``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from safetensors.torch import save_file
from torch import nn

from lora_lightning.core import (
    LoRAConfig,
    adapted_layers,
    apply_loraplus,
    apply_plan,
    config_diff,
    count_parameters,
    export_root,
    lora_state_dict,
    merged_state_dict,
    plan_lora,
    prepare_lora,
    save_adapter,
    unload_lora,
)
from lora_lightning.core.errors import AdapterFileError, CheckpointMismatchError, LoRAConfigError
from lora_lightning.core.files import atomic_write_file
from lora_lightning.core.inits import find_init
from lora_lightning.core.inject import Forward
from lora_lightning.core.model_checks import check_model_features
from lora_lightning.core.plan import LoRAPlan, TargetFn
from lora_lightning.lightning.checkpoint import (
    CHECKPOINT_KEY,
    FSDP_WRAPPED,
    adapter_dir_for,
    check_checkpoint_form,
    check_optimizer_states,
    clean_name,
    lora_metadata,
    trim_checkpoint,
    validate_checkpoint,
    without_wrappers,
)
from lora_lightning.lightning.checkpoint_io import AdapterExportingIO
from lora_lightning.lightning.fingerprint import base_fingerprint
from lora_lightning.lightning.rng import RNGStateCallback
from lora_lightning.lightning.sharded import (
    LoRACheckpointing,
    attach_once,
    attach_to_strategy,
    check_shardable,
    full_tensors,
    is_sharded,
)

_WRAPPED = "_lora_callback_wrapped"
#: Key of a data-dependent init's result in the checkpoint's LoRA entry.
_INIT_KEY = "init"
#: Marks an FSDPStrategy (FSDP1) whose ``load_checkpoint`` validates first; holds the callback.
_FSDP1_ATTACHED = "_lora_fsdp1_attached"
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(LoRAConfig))


class LoRACallback(RNGStateCallback):
    """Adds LoRA to a LightningModule: inject, freeze, restrict optimizers, log, checkpoint.

    A resume is exact with the callback alone: as a :class:`RNGStateCallback` it saves every
    rank's global RNG states (dropout masks) with each checkpoint and restores them.

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
            otherwise the LightningModule itself (``""``). Resolved at ``setup``, before
            anything is injected: it must name a submodule holding every trained tensor.
        init_batches: how many training batches a data-dependent init (``eva``, ``lora_ga``) sees
            before the adapters are built: the first ``init_batches`` of the train dataloader,
            on every rank (rank zero's result is broadcast, so every rank builds the same
            adapters). What the init produced (its ranks and values) is kept in every
            checkpoint, and a resume rebuilds the adapters from it.
        init_forward: ``init_forward(module, batch)`` runs the LightningModule on one batch
            for that init; default ``module(**batch)`` for a mapping, ``module(batch)`` else.
        export_converted: write the adapter of a PiSSA/OLoRA run (``init``) converted to plain
            LoRA (rank 2r, ``save_adapter(..., convert_to_plain_lora=True)``), which loads on
            the stock base; False writes the unconverted form, which PEFT and this project
            load only onto the PiSSA/OLoRA-modified base. No effect for other inits.
        **fields: any :class:`LoRAConfig` field, overriding ``config`` (``LoRACallback(r=4)``;
            flat ``init_args`` in ``LightningCLI`` YAML). The signature lists each one (built
            from the dataclass, so ``inspect.signature``, ``help()`` and LightningCLI see them
            all) and ``__init__``'s docstring is the config's. ``loraplus_lr_ratio`` splits
            every param group of the optimizers ``configure_optimizers`` returns (see
            :func:`lora_lightning.apply_loraplus`), and the schedulers it returns with them.

    Raises:
        LoRAConfigError: an invalid config or option (at construction); at setup, before
            anything is injected: targets matching nothing, an ``export_root`` naming no
            submodule or not holding every trained tensor, or (while exporting) a model whose
            adapter files ``save_adapter`` would refuse.
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        target_fn: TargetFn | None = None,
        adapter_dir: str | os.PathLike[str] | None = None,
        export_on_checkpoint: bool = True,
        export_on_train_end: bool = True,
        merge_on_end: bool = False,
        export_root: str = "auto",
        export_converted: bool = True,
        init_batches: int = 16,
        init_forward: Forward | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(fields) - set(_CONFIG_FIELDS))
        if unknown:
            valid = list(inspect.signature(LoRACallback).parameters)
            close = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
            hint = "; ".join(f"{u!r}: did you mean {c[0]!r}?" for u, c in close.items() if c)
            raise LoRAConfigError(
                f"LoRACallback got unknown keyword argument(s) {unknown}"
                + (f" ({hint})" if hint else "")
                + f"; valid: the callback's options and LoRAConfig's fields, {valid}"
            )
        # None means "as config says" (every field's default is the config's).
        self.config = _build_config(config, {k: v for k, v in fields.items() if v is not None})
        for option, value in (
            ("export_on_checkpoint", export_on_checkpoint),
            ("export_on_train_end", export_on_train_end),
            ("merge_on_end", merge_on_end),
            ("export_converted", export_converted),
        ):
            if not isinstance(value, bool):
                raise LoRAConfigError(
                    f"LoRACallback({option}={value!r}) is invalid: expected true or false"
                )
        if adapter_dir is not None and (
            not isinstance(adapter_dir, (str, os.PathLike)) or not os.fspath(adapter_dir)
        ):
            raise LoRAConfigError(
                f"LoRACallback(adapter_dir={adapter_dir!r}) is invalid: expected a non-empty "
                "path (str or os.PathLike) or None"
            )
        if not isinstance(export_root, str):
            raise LoRAConfigError(
                f"LoRACallback(export_root={export_root!r}) is invalid: expected 'auto', '' "
                "(the LightningModule) or the attribute path of a submodule"
            )
        if target_fn is not None and not callable(target_fn):
            raise LoRAConfigError(f"LoRACallback(target_fn={target_fn!r}) is not callable")
        if isinstance(init_batches, bool) or not isinstance(init_batches, int) or init_batches < 1:
            raise LoRAConfigError(
                f"LoRACallback(init_batches={init_batches!r}) is invalid: expected an integer >= 1"
            )
        if init_forward is not None and not callable(init_forward):
            raise LoRAConfigError(f"LoRACallback(init_forward={init_forward!r}) is not callable")
        self.init_batches = init_batches
        self.init_forward = init_forward
        # A data-dependent init's result, kept in checkpoints: the config asked for, the
        # config it resolved (its ranks), and its per-layer values. None for other inits.
        self._init_state: dict[str, Any] | None = None
        self.target_fn = target_fn
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.export_on_checkpoint = export_on_checkpoint
        self.export_on_train_end = export_on_train_end
        self.merge_on_end = merge_on_end
        self.export_converted = export_converted
        self.export_root = export_root
        self.adapted: list[str] = []
        self.fingerprint: str | None = None
        self.last_adapter_dir: Path | None = None
        self._root: tuple[str, nn.Module] | None = None
        self._printed = False
        # Loggers already given the counts (by identity): each logger of each Trainer once.
        self._logged_to: list[Any] = []
        self._module: pl.LightningModule | None = None
        # Resume: the checkpoint's (optimizer states, scheduler states) until checked against
        # the optimizers, and whether those exist yet in this fit.
        self._resumed_states: tuple[list, list] | None = None
        self._fit_started = False

    # ----------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Plan and inject once (idempotent across stages and repeated fits), freeze, resolve
        the export root, wrap hooks; every check runs before the model is changed."""
        if self.merge_on_end and isinstance(trainer.strategy, FSDPStrategy):
            raise LoRAConfigError(
                "LoRACallback(merge_on_end=True) is not supported under FSDP (the merged state "
                "dict would be gathered on one rank only); export the adapter and merge it "
                "offline with load_adapter + merge_lora"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            check_shardable(self.config)
        if isinstance(trainer.strategy, FSDPStrategy):
            _check_fsdp1(trainer.strategy)
        self._fit_started = False
        self._resumed_states = None
        self._gradients_checked = False
        with without_wrappers(pl_module):  # names (and init seeds) as unwrapped
            try:
                plan = plan_lora(pl_module, self.config, target_fn=self.target_fn)
            except LoRAConfigError as err:
                if not _builds_layers_later(pl_module):
                    raise
                raise LoRAConfigError(
                    f"{err}. Note: LoRACallback.setup runs before LightningModule.setup and "
                    "configure_model, so layers built there do not exist yet; build them in "
                    "__init__, or call inject_lora yourself at the end of configure_model"
                ) from None
            self._check_export_root(pl_module, list(plan.trainable_tensors(pl_module)))
            self._check_exportable(pl_module, plan)
            plan, values = self._prepare_init(trainer, pl_module, plan, stage)
            self.adapted = apply_plan(pl_module, plan, values, values_follow=values is None)
            self.config = plan.config  # with a data-dependent init's ranks: later setups agree
            self._root = self._resolve_export_root(pl_module)
        self._module = pl_module
        # Needed to write (fit) or load checkpoints only. Every rank is here: under DDP each
        # checksums its share of the base, then they swap.
        needed = stage == TrainerFn.FITTING or trainer.ckpt_path is not None
        self.fingerprint = base_fingerprint(pl_module, shared=True) if needed else None
        # Frozen base weights are not in our checkpoints: the model load must be non-strict,
        # and validate_checkpoint checks the keys that must be there.
        pl_module.strict_loading = False
        _enable_input_grads_for_checkpointing(pl_module)
        _wrap_once(pl_module, "configure_optimizers", self._restrict_optimizers)
        _wrap_once(pl_module, "on_save_checkpoint", self._trim_checkpoint)
        _wrap_once(pl_module, "on_load_checkpoint", self._validate_checkpoint)
        if not isinstance(trainer.strategy.checkpoint_io, AdapterExportingIO):
            trainer.strategy.checkpoint_io = AdapterExportingIO(
                trainer.strategy.checkpoint_io,
                self._export_beside_checkpoint,
                check=lambda checkpoint, path: check_checkpoint_form(
                    checkpoint, f"checkpoint {path}"
                ),
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2: adapter-only files
            attach_to_strategy(
                trainer.strategy,
                LoRACheckpointing(
                    self.config,
                    lambda: self.fingerprint,
                    self.export if self.export_on_checkpoint else None,
                    adapter_dir_for,
                ),
            )
        if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1: validate before it loads
            self._attach_to_fsdp1(trainer.strategy)
        self._log_counts(trainer, pl_module)
        launcher = getattr(trainer.strategy, "launcher", None)
        if getattr(launcher, "_start_method", None) in ("spawn", "fork", "forkserver"):
            rank_zero_warn(
                "LoRACallback with a spawn/fork DDP launcher: adapters are created in the worker "
                "processes and will not exist on the model in the main process afterwards; "
                "use strategy='ddp' to keep them (or load the exported adapter)."
            )

    # ----------------------------------------------------------------- data-dependent init
    def _prepare_init(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: LoRAPlan, stage: str
    ) -> tuple[LoRAPlan, dict[str, Any] | None]:
        """For a data-dependent init (``core.inits``: EVA, LoRA-GA) while fitting, the plan
        with the ranks it chose and its per-layer values, learnt from the first
        ``init_batches`` training batches on every rank, rank zero's result broadcast. Any
        other init (or adapters already there): ``plan`` unchanged, no values. Another stage
        (validate, test, predict) has no training batches: placeholder adapters (values None:
        the plan's ranks, untouched base) that :meth:`_restore_init` replaces by the loaded
        checkpoint's. (On a resume too Lightning names the checkpoint only after ``setup``.)"""
        if find_init(self.config.init).prepare is None or plan.already_applied:
            return plan, {}
        if stage != TrainerFn.FITTING:
            self._init_state = {"requested": self.config.to_dict(), "placeholder": True}
            return plan, None
        batches = self._first_batches(trainer)
        prepared = prepare_lora(
            pl_module, self.config, batches, forward=self.init_forward, target_fn=self.target_fn
        )
        state = {
            "requested": self.config.to_dict(),
            "config": prepared.plan.config.to_dict(),
            "values": {n: v.detach().cpu() for n, v in prepared.values.items()},
        }
        self._init_state = trainer.strategy.broadcast(state, src=0)
        resolved = LoRAConfig.from_dict(self._init_state["config"])
        return plan_lora(pl_module, resolved, target_fn=self.target_fn), dict(
            self._init_state["values"]
        )

    def _first_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``init_batches`` batches of the train dataloader (fewer if it is shorter),
        however it was given (a DataModule, the module's hook, ``fit(train_dataloaders=)``)."""
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        loader = source.dataloader() if source is not None and source.is_defined() else None
        if loader is None:
            raise LoRAConfigError(
                f"lora.init={self.config.init!r} initialises the adapters from training batches, "
                "and this run has no train dataloader (a validate/test/predict run): load the "
                "adapter of the training run instead"
            )
        return list(itertools.islice(iter(loader), self.init_batches))

    def _restore_init(self, trainer: Any, module: pl.LightningModule, checkpoint: dict) -> None:
        """Before a resumed model state loads: rebuild a data-dependent init's adapters from
        the result the checkpoint kept (its ranks and values), if this run's own ``prepare``
        found another; the config it was asked for must be the checkpoint's."""
        if self._init_state is None:
            return
        meta = checkpoint.get(CHECKPOINT_KEY)
        state = meta.get(_INIT_KEY) if isinstance(meta, Mapping) else None
        if not isinstance(state, Mapping) or not {"requested", "config", "values"} <= set(state):
            raise CheckpointMismatchError(
                f"the checkpoint holds no result of lora.init={self.config.init!r} (its "
                f"'{CHECKPOINT_KEY}' entry has no '{_INIT_KEY}'), so the adapters it trained "
                "cannot be rebuilt: resume from a checkpoint of the same run, or start a new run"
            )
        requested = self._init_state["requested"]
        placeholder = self._init_state.get("placeholder", False)
        differ = config_diff(dict(state["requested"]), requested, labels=("checkpoint", "now"))
        if differ:
            raise CheckpointMismatchError(
                "the checkpoint was trained with another LoRA config; differing fields: "
                + "; ".join(differ)
                + ". Resume with the checkpoint's config, or start a new run without ckpt_path"
            )
        resolved = LoRAConfig.from_dict(dict(state["config"]))
        values = dict(state["values"])
        ours = self._init_state.get("values", {})
        same = (
            not placeholder
            and not config_diff(resolved, self.config)
            and values.keys() == (ours.keys())
        )
        if same and all(torch.equal(values[n], ours[n]) for n in values):
            return
        # Placeholders left the base as it was: rebuilding from them is exact for every init.
        if find_init(self.config.init).changes_base and not placeholder:
            raise CheckpointMismatchError(
                f"this run's lora.init={self.config.init!r} found other values than the "
                "checkpoint's on its first batches, and this init rewrites the base weights, "
                "which cannot be rebuilt bit for bit from the rewritten ones: resume with the "
                "same first batches (an unshuffled or seeded train loader, the same "
                "init_batches)"
            )
        if trainer is not None and trainer.strategy.restore_checkpoint_after_setup:
            raise CheckpointMismatchError(
                f"this run's lora.init={self.config.init!r} found other ranks or values than "
                "the checkpoint's, and this strategy restores checkpoints after the optimizers "
                "exist, so the adapters cannot be rebuilt from it; feed the init the same "
                "batches (init_batches, an unshuffled loader) or resume with another strategy"
            )
        with without_wrappers(module):
            unload_lora(module, merge=False)
            plan = plan_lora(module, resolved, target_fn=self.target_fn)
            self.adapted = apply_plan(module, plan, values)
        self.config, self._init_state = resolved, dict(state)

    # ------------------------------------------------------------------------ optimizers
    def _restrict_optimizers(self, original: Callable[[], Any]) -> Any:
        """Call the user's ``configure_optimizers`` and drop frozen parameters in place.

        Every return form works (an optimizer, lists, ``(optimizers, schedulers)``, dicts
        with ``lr_scheduler``) because optimizers are found wherever they are and edited in
        place: schedulers keep pointing at the same optimizer and the same param groups
        (a group left empty stays, so per-group scheduler lambdas keep their order). With
        ``loraplus_lr_ratio`` each group is then split into LoRA+ groups, and the schedulers
        returned with the optimizer follow the split (``core.loraplus.apply_loraplus``).
        """
        result = original()
        ratio = self.config.loraplus_lr_ratio
        for index, optimizer in enumerate(_find_optimizers(result)):
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
            if ratio is not None:
                apply_loraplus(
                    optimizer, self._require_module(), ratio,
                    lr_embedding=self.config.loraplus_lr_embedding,
                    schedulers=_find_schedulers(result),
                )  # fmt: skip
        return result

    # ---------------------------------------------------------------------- checkpoints
    def _trim_checkpoint(self, original: Callable[[dict], Any], checkpoint: dict) -> Any:
        output = original(checkpoint)
        module = self._require_module()
        metadata = lora_metadata(self.config, self._fingerprint(), self.adapted, self._root[0])
        if self._init_state is not None:
            metadata[_INIT_KEY] = self._init_state
        trim_checkpoint(checkpoint, lora_state_dict(module), metadata)
        return output

    def _validate_checkpoint(self, original: Callable[[dict], Any], checkpoint: dict) -> Any:
        output = original(checkpoint)
        module = self._require_module()
        trainer = getattr(module, "_trainer", None)
        training = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._restore_init(trainer, module, checkpoint)
        fingerprint = self._fingerprint()
        validate_checkpoint(checkpoint, module, self.config, fingerprint, training=training)
        if training:
            self._resumed_states = (checkpoint["optimizer_states"], checkpoint["lr_schedulers"])
            if self._fit_started:  # the strategy restores after setup: optimizers exist
                self._check_resumed_states(trainer)
        return output

    def _attach_to_fsdp1(self, strategy: FSDPStrategy) -> None:
        """Lightning's ``FSDPStrategy`` loads a single-file checkpoint's model and optimizer
        states inside its ``load_checkpoint``, before any hook sees the checkpoint, and pops
        its ``state_dict``: wrap that method (once per strategy; a later setup updates the
        callback it reports to) so the checkpoint is validated before anything is loaded, and
        hand the hook the ``state_dict`` back (it validates again, on the same dict)."""
        attached = attach_once(strategy, _FSDP1_ATTACHED, "callback", self)
        if attached is None:
            return
        load = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict:
            from lightning.fabric.utilities.cloud_io import _load

            callback = attached["callback"]
            checkpoint = _load(checkpoint_path, map_location="cpu", weights_only=weights_only)
            check_checkpoint_form(checkpoint, f"checkpoint {checkpoint_path}")
            callback._validate_checkpoint(lambda _: None, checkpoint)
            callback._check_resumed_states(strategy.lightning_module.trainer)  # optimizers exist
            # Everything checked: from here on the strategy changes the model and optimizers.
            loaded = load(checkpoint_path, weights_only)
            loaded["state_dict"] = checkpoint["state_dict"]
            return loaded

        object.__setattr__(strategy, "load_checkpoint", load_checkpoint)

    def _fingerprint(self) -> str:
        # A stage that setup did not expect to touch checkpoints (e.g. a save in validate):
        # computed now, on every rank, as the checkpoint hooks run on every rank.
        if self.fingerprint is None:
            self.fingerprint = base_fingerprint(self._require_module(), shared=True)
        return self.fingerprint

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compare a resumed checkpoint's optimizer states with the optimizers just built
        (Lightning restores them after this hook, pairing them up with ``zip``)."""
        if isinstance(trainer.strategy, FSDPStrategy):
            _check_fsdp1_root(trainer.strategy.model)
        self._fit_started = True
        self._check_resumed_states(trainer)

    def _check_resumed_states(self, trainer: pl.Trainer) -> None:
        if self._resumed_states is None:
            return
        optimizer_states, scheduler_states = self._resumed_states
        self._resumed_states = None
        restores = trainer.strategy.lightning_restore_optimizer  # DeepSpeed restores its own
        check_optimizer_states(
            optimizer_states if restores else [],
            trainer.optimizers if restores else [],
            scheduler_states,
            len(trainer.lr_scheduler_configs),
        )

    # ------------------------------------------------------------------------ gradients
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first backward of a fit, warn about adapters that got no gradient.

        An adapter whose layer is never called in the forward pass trains nothing and changes
        no output, silently: a parent module that reads the layer's weight itself instead of
        calling it (``F.linear(x, self.proj.weight)``), a target the model does not use. The
        plan refuses the cases it can see (``nn.MultiheadAttention``'s ``out_proj``); this
        catches the rest at run time. A warning, not an error: a mixture-of-experts layer
        whose expert got no token in the first batch looks the same. Checked where each
        parameter holds its own gradient (single device, DDP), not under FSDP/DeepSpeed.
        """
        if getattr(self, "_gradients_checked", True):
            return
        self._gradients_checked = True
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        idle = [name for name, module, _ in adapted_layers(pl_module)
                if module.lora_B.weight.grad is None]  # fmt: skip
        if idle:
            rank_zero_warn(
                f"LoRACallback: {len(idle)} of {len(self.adapted)} adapted module(s) got no "
                f"gradient in the first backward pass: {idle[:6]}. Their forward was not "
                "called, so their adapters train nothing and change no output. Usual causes: "
                "the parent reads the layer's weight directly instead of calling the layer, or "
                "the model does not use that module (or, in a mixture of experts, the expert "
                "got no token in this batch). Check lora.target_modules"
            )

    # -------------------------------------------------------------------------- export
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final adapter (global rank zero) and synchronise every rank."""
        if not self.export_on_train_end:
            return
        # Collectives under FSDP: every rank gathers (a sharded state's every shard), rank
        # zero writes.
        state = full_tensors(trainer.strategy.lightning_module_state_dict())
        directory = self.adapter_dir or Path(trainer.default_root_dir) / "adapter"
        if trainer.is_global_zero:
            self.export(state, directory)
        if self.merge_on_end:
            self._write_merged(trainer, pl_module, Path(directory))
        trainer.strategy.barrier("LoRACallback.on_train_end")
        self.last_adapter_dir = Path(directory)
        rank_zero_info(f"LoRA adapter written to {directory}")

    def _write_merged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: Path
    ) -> None:
        """Write ``merged_model.safetensors`` on rank zero; a sharded model is merged shard
        by shard and gathered on every rank (the merged model is whole by definition)."""
        if is_sharded(pl_module):
            # Every rank merges its shards (DTensor arithmetic), then all gather the whole.
            merged = full_tensors(merged_state_dict(self._root[1]))
        elif trainer.is_global_zero:
            merged = merged_state_dict(self._root[1])
        if trainer.is_global_zero:
            path = directory / "merged_model.safetensors"
            atomic_write_file(path, lambda tmp: save_file(merged, str(tmp)))

    def export(self, state_dict: Mapping[str, torch.Tensor], directory: str | Path) -> Path:
        """Write a PEFT-format adapter from a LightningModule ``state_dict`` (keys as in it,
        with or without ``torch.compile``'s ``_orig_mod.``)."""
        self._require_module()
        prefix, root = self._root
        prefix = f"{prefix}." if prefix else ""
        clean = ((clean_name(k), v) for k, v in state_dict.items())
        relative = {k[len(prefix) :]: v for k, v in clean if k.startswith(prefix)}
        with without_wrappers(root):  # the adapter's names: the unwrapped model's
            return save_adapter(
                getattr(root, "_orig_mod", root), directory, state_dict=relative,
                convert_to_plain_lora=self.export_converted,
            )  # fmt: skip

    def _export_beside_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
        if self.export_on_checkpoint and CHECKPOINT_KEY in checkpoint:
            self.export(checkpoint["state_dict"], adapter_dir_for(path))

    def _check_export_root(self, pl_module: nn.Module, trained: list[str]) -> None:
        """An explicit ``export_root`` must name a submodule holding every trained tensor
        (``trained``: their names once the plan is applied), or the adapter files would
        silently lack the others."""
        if self.export_root in ("auto", ""):
            return
        root = clean_name(self.export_root)
        try:
            pl_module.get_submodule(root)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise LoRAConfigError(
                f"LoRACallback(export_root={self.export_root!r}) names no submodule of "
                f"{type(pl_module).__name__}; expected 'auto', '' or one of {children[:8]} "
                "(or a dotted path below them)"
            ) from None
        outside = [name for name in trained if not name.startswith(root + ".")]
        if outside:
            raise LoRAConfigError(
                f"LoRACallback(export_root={self.export_root!r}) does not hold {len(outside)} "
                f"trained tensor(s) {outside[:4]}: the adapter files would lack them; use "
                "'auto', '' (the LightningModule) or a submodule holding every target and "
                "modules_to_save entry"
            )

    def _check_exportable(self, pl_module: nn.Module, plan: LoRAPlan) -> None:
        """The adapter files this callback will write must be writable: what ``save_adapter``
        refuses (layers PEFT computes differently) is refused here, before training."""
        if not (self.export_on_checkpoint or self.export_on_train_end):
            return
        try:
            check_model_features(
                pl_module, plan.names, list(plan.modules_to_save), "LoRACallback.setup"
            )
        except AdapterFileError as err:
            raise LoRAConfigError(
                f"{err}. LoRACallback writes adapter files (export_on_checkpoint, "
                "export_on_train_end): change the model or targets, or set both options to "
                "False to train and checkpoint without adapter files"
            ) from None

    def _resolve_export_root(self, pl_module: nn.Module) -> tuple[str, nn.Module]:
        if self.export_root == "auto":
            return export_root(pl_module)
        root = clean_name(self.export_root)
        return root, pl_module.get_submodule(root)

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
        if self._module is None or self._root is None:
            raise RuntimeError("LoRACallback was used before setup() attached it to a module")
        return self._module


def _with_config_fields(init: Callable[..., None]) -> None:
    """Give ``init`` (whose last parameter is ``**fields``) the signature with one keyword per
    :class:`LoRAConfig` field instead (typed ``Optional[<field type>]``, default None: "as
    ``config`` says"), and the config's field docs as its docstring.

    ``inspect.signature`` honours ``__signature__``: LightningCLI (jsonargparse reads the
    signature, and the ``Args:`` of ``__init__``'s docstring for ``--help``), ``help()`` and
    IPython's ``LoRACallback?`` list every field, and a new field reaches them without an edit here. Static
    analysers do not run this: to them the keywords are ``**fields``.
    """
    own = inspect.signature(init, eval_str=True)
    types = typing.get_type_hints(LoRAConfig)
    keywords = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=types[name] | None
        )
        for name in _CONFIG_FIELDS
    ]
    kept = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    init.__signature__ = own.replace(parameters=[*kept, *keywords])  # type: ignore[attr-defined]
    docs = inspect.cleandoc(LoRAConfig.__doc__ or "")
    if "Args:" in docs:
        fields = docs.split("Args:", 1)[1].split("\nRaises:", 1)[0]
        init.__doc__ = (
            "Build the callback; every :class:`LoRAConfig` field is a keyword overriding "
            f"``config`` (None: as ``config`` says).\n\nArgs:{fields.rstrip()}\n"
        )


_with_config_fields(LoRACallback.__init__)


def _build_config(config: LoRAConfig | Mapping[str, Any] | None, overrides: dict) -> LoRAConfig:
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, LoRAConfig):
        values = config.to_dict()
    elif hasattr(config, "keys"):
        values = {key: config[key] for key in config.keys()}
    else:
        raise LoRAConfigError(
            f"LoRACallback(config={config!r}) is invalid: expected a LoRAConfig, a mapping of "
            "its fields, or None"
        )
    values.update(overrides)
    return LoRAConfig.from_dict(values)


def _check_fsdp1(strategy: FSDPStrategy) -> None:
    """Under FSDP1 the callback writes and validates single-file, full-state-dict
    checkpoints; the sharded form (a folder that ``torch.distributed.checkpoint`` writes and
    reads for every parameter, frozen base included) is refused before the model changes, and
    so are flat parameters that would mix frozen and trainable tensors."""
    kind = getattr(strategy, "_state_dict_type", "full")
    if kind != "full":
        raise LoRAConfigError(
            f"LoRACallback under FSDPStrategy(state_dict_type={kind!r}) is not supported: "
            "LoRA checkpoints are adapter-only single files; use "
            "FSDPStrategy(state_dict_type='full'), or lora_lightning.lightning.FSDP2Strategy "
            "for sharded checkpoints"
        )
    if strategy.kwargs.get("use_orig_params") is False:
        raise LoRAConfigError(
            "LoRACallback under FSDPStrategy(use_orig_params=False) is not supported: FSDP1 "
            "then flattens frozen base weights and trainable adapters into one parameter, "
            "which it cannot train in part; use FSDPStrategy(use_orig_params=True) (Lightning's "
            "default)"
        )


def _check_fsdp1_root(root: nn.Module | None) -> None:
    """Refuse, before the first step, the FSDP1 setup whose checkpoints cannot be written: a
    root unit that does not shard (``NO_SHARD``: one device, or asked for) and holds only
    frozen parameters of its own (under LoRA: a causal LM's embeddings, final norm and
    ``lm_head`` when the blocks are the wrapped units). After a backward, torch's catch-all
    reshard skips such a unit (its flat parameter already "is" its shard), its parameters stay
    plain tensors, and every full state dict then fails inside torch (``FSDP assumes ... is in
    the state_dict``; seen with torch 2.11 on an H200 and 2.13 on the CPU, without LoRA too)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    if not isinstance(root, FullyShardedDataParallel):
        return
    if getattr(root, "sharding_strategy", None) != ShardingStrategy.NO_SHARD:
        return
    own = [
        (name, param)
        for name, param in root.named_parameters()
        if name.split(".").count(FSDP_WRAPPED) == 1  # the root's own, in no inner unit
    ]
    if not own or any(param.requires_grad for _, param in own):
        return
    modules = sorted({clean_name(name).rsplit(".", 1)[0] for name, _ in own})
    raise LoRAConfigError(
        f"LoRACallback under strategy=fsdp (FSDP1) without sharding (NO_SHARD: one device, or "
        f"asked for): the root FSDP unit holds only frozen parameters ({', '.join(modules[:6])}"
        f"{', ...' if len(modules) > 6 else ''}), and torch cannot write a full state dict of "
        "such a unit after a backward, so no checkpoint or adapter could be saved. Use "
        "strategy='ddp' or one device, lora_lightning.lightning.FSDP2Strategy, or an "
        "auto_wrap_policy that puts those modules in units of their own"
    )


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


def _find_schedulers(value: Any) -> list[Any]:
    """Every learning-rate scheduler inside a ``configure_optimizers`` return value (an
    object with an ``optimizer``, bare or as the ``scheduler`` of a config dict), once."""
    if isinstance(value, torch.optim.Optimizer):
        return []
    if hasattr(value, "optimizer"):
        return [value]
    found: list[Any] = []
    if isinstance(value, Mapping):
        for key in ("lr_scheduler", "scheduler"):
            found += _find_schedulers(value.get(key))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _find_schedulers(item)
    return list({id(s): s for s in found}.values())


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


__all__ = ["LoRACallback", "adapter_dir_for"]


def _builds_layers_later(module: pl.LightningModule) -> bool:
    """True if ``module`` overrides ``setup`` or ``configure_model`` (where layers may be built
    after ``LoRACallback.setup``): only then is that advice worth giving."""
    base = pl.LightningModule
    return type(module).setup is not base.setup or type(module).configure_model is not (
        base.configure_model
    )
