"""LoRA on a sharded base (FSDP2, ``torch.distributed.fsdp.fully_shard``) under Lightning.

Owns: how a model is sharded the usual way (:func:`shard_model`: one FSDP unit per
transformer block, then the root; :class:`FSDP2Strategy` applies it when the LightningModule
has no ``configure_model`` of its own), and what LoRA changes in Lightning's
``ModelParallelStrategy`` checkpoints (:func:`attach_to_strategy`): only trainable tensors
are gathered and saved, the adapter directory beside a distributed checkpoint holds every
rank's shards, and a resume validates the checkpoint (``lightning.checkpoint``) before it
loads anything. Must not import: ``lightning.callback``, ``app/``.

Why the strategy's methods are wrapped rather than left alone: ``ModelParallelStrategy``
writes distributed checkpoints itself (no ``CheckpointIO``), gathers the whole model, frozen
base included, for its single-file form, and loads a distributed checkpoint by asking it for
every parameter of the model, which an adapter-only checkpoint does not hold.

Order of events under ``ModelParallelStrategy`` (checked with Lightning 2.6.6): the callback's
``setup`` (adapters injected and the base frozen on the whole model, fingerprinted there),
then ``configure_model`` (sharding: adapters and frozen base are sharded together), then the
strategy's ``setup`` (optimizers, over the trainable shards only), then a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lora_lightning.core import LoRAConfig
from lora_lightning.core.errors import CheckpointMismatchError, LoRAConfigError
from lora_lightning.lightning.checkpoint import (
    check_checkpoint_form,
    check_optimizer_states,
    clean_name,
    validate_checkpoint,
)

#: Names of the ``nn.ModuleList`` attributes that hold the blocks of Hugging Face models
#: (Llama/Mistral/Qwen ``layers``, BERT ``layer``, GPT-2 ``h``, ViT/Mamba-style ``blocks``).
BLOCK_LISTS = ("layers", "layer", "h", "blocks")
# Lightning's metadata file inside a distributed checkpoint folder.
_METADATA = "meta.pt"
_MARK = "_lora_sharded_attached"


# -------------------------------------------------------------------------------- sharding
def transformer_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``module``, in model order: the instances of the classes
    Hugging Face names in ``_no_split_modules`` when a submodule declares them, otherwise the
    members of every ``nn.ModuleList`` named one of :data:`BLOCK_LISTS`. Blocks nested in
    another block are not listed (the outer one is the unit)."""
    split: set[str] = set()
    for sub in module.modules():
        split.update(getattr(sub, "_no_split_modules", None) or ())
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if split:
            if type(sub).__name__ in split:
                found.append((name, sub))
        elif isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found += [(f"{name}.{index}", block) for index, block in enumerate(sub)]
    return found


def data_parallel_mesh(mesh: Any) -> Any:
    """The mesh FSDP shards over: ``mesh["data_parallel"]`` of Lightning's 2-D mesh, or
    ``mesh`` itself when it is 1-D.

    Raises:
        LoRAConfigError: Lightning's mesh puts every process on the tensor-parallel axis
            (``ModelParallelStrategy``'s default), so FSDP would shard over one process.
    """
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "data_parallel" not in names:
        return mesh
    data = mesh["data_parallel"]
    if data.size() == 1 and mesh.size() > 1:
        raise LoRAConfigError(
            f"the device mesh {dict(zip(names, mesh.shape, strict=True))} gives FSDP a "
            "data-parallel axis of size 1, so nothing would be sharded: use "
            f"ModelParallelStrategy(data_parallel_size={mesh.size()}, tensor_parallel_size=1) "
            "or lora_lightning.lightning.FSDP2Strategy()"
        )
    return data


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or to one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(sub, FSDPModule) for sub in module.modules())


def shard_model(module: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``module`` with FSDP2 the usual way: one unit per transformer block
    (:func:`transformer_blocks`), then the root (embeddings, head, everything else; for a
    LightningModule each of its children holding parameters).

    A LoRA adapter lives inside the block of the layer it adapts, so it is sharded with that
    block's frozen weights; FSDP2 keeps one tensor per parameter, so gradients exist for the
    adapters only. Idempotent: a module already sharded is returned as it is (Lightning calls
    ``configure_model`` for every stage).

    Args:
        module: the model (e.g. a LightningModule, after ``LoRACallback.setup`` injected it).
        mesh: a device mesh; Lightning's 2-D one (``self.device_mesh``) is sharded over its
            ``data_parallel`` axis (:func:`data_parallel_mesh`). None: all processes.
        fsdp_kwargs: passed to every ``fully_shard`` call (``mp_policy``, ``offload_policy``,
            ``reshard_after_forward``...).

    Returns:
        ``module`` (its class now also an ``FSDPModule``).

    Raises:
        LoRAConfigError: a mesh with a data-parallel axis of size 1 on several processes; a
            LightningModule holding parameters itself (see ``_roots``).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(module):
        return module
    roots = _roots(module)
    if mesh is not None:
        fsdp_kwargs["mesh"] = data_parallel_mesh(mesh)
    for _, block in transformer_blocks(module):
        fully_shard(block, **fsdp_kwargs)
    for root in roots:
        fully_shard(root, **fsdp_kwargs)
    return module


def _roots(module: nn.Module) -> list[nn.Module]:
    """The modules whose FSDP unit holds what no block holds: ``module`` itself, or for a
    LightningModule (whose ``forward`` Lightning does not call: ``training_step`` calls its
    children) each child holding parameters, since a unit gathers its parameters in its own
    forward only.

    Raises:
        LoRAConfigError: a LightningModule with parameters of its own, which no child's
            forward would gather.
    """
    import lightning.pytorch as pl

    if not isinstance(module, pl.LightningModule):
        return [module]
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise LoRAConfigError(
            f"shard_model: {type(module).__name__} holds parameters itself {own[:4]}; FSDP "
            "gathers a unit's parameters in that unit's forward, which Lightning never calls "
            "on a LightningModule: move them into a submodule (e.g. an nn.Linear)"
        )
    return [child for child in module.children() if any(True for _ in child.parameters())]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 data parallelism: every process on the
    data-parallel axis (``tensor_parallel_size=1``), and a LightningModule without its own
    ``configure_model`` is sharded by :func:`shard_model` (one unit per transformer block,
    then the root). A module that defines ``configure_model`` shards itself.

    Args:
        save_distributed_checkpoint: True: one folder of per-rank shards per checkpoint;
            False: one file gathered on rank zero.
        process_group_backend, timeout: as for ``ModelParallelStrategy``.
        fsdp_kwargs: passed to ``fully_shard`` by the automatic sharding.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: Any = None,
        **fsdp_kwargs: Any,
    ) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.fsdp_kwargs = fsdp_kwargs

    def setup_environment(self) -> None:
        # Lightning resolves "auto" to the number of nodes; FSDP wants every process.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size
        super().setup_environment()
        module = self.lightning_module
        if module is not None and not is_overridden("configure_model", module):
            # An instance attribute: Lightning sees an overridden hook and calls it.
            def configure_model() -> None:
                shard_model(module, module.device_mesh, **self.fsdp_kwargs)

            object.__setattr__(module, "configure_model", configure_model)


def check_shardable(config: LoRAConfig) -> None:
    """Refuse, before anything is injected, what this project does not run sharded.

    Raises:
        LoRAConfigError: ``quantize_base`` (QLoRA): the base weights stored quantized
            (torchao NF4/int8 tensors) are not sharded, gathered, checkpointed or hashed by
            this project's FSDP2 path, and nothing here checked that they would be exact.
    """
    if config.quantize_base != "none":
        raise LoRAConfigError(
            f"lora.quantize_base={config.quantize_base!r} is not supported with FSDP2 "
            "(ModelParallelStrategy / trainer=fsdp): a quantized base is not sharded by this "
            "project yet; use quantize_base=none to shard a float base, or DDP "
            "(trainer=ddp) / one device to train a quantized base"
        )


# ------------------------------------------------------------------------- state gathering
def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor`` (a sharded parameter, or its state dict entry)."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every ``DTensor`` replaced by the whole tensor (on CPU), others as
    they are. A collective when ``state`` holds DTensors: every rank must call it, with
    the same keys in the same order."""
    return {
        key: value.full_tensor().cpu() if is_dtensor(value) else value
        for key, value in state.items()
    }


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of ``model`` back in its sharded state (a no-op for one that is).

    FSDP2 keeps the root unit's parameters gathered after a forward without backward (a
    validation loop), and while gathered the module holds plain tensors in place of its
    DTensor parameters: the optimizer's parameters would not be the model's (Lightning's
    ``get_optimizer_state_dict`` fails with a ``KeyError``) and a read of the parameters
    would take whole tensors for shards. ``state_dict()`` reshards the same way."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def trainable_state_dict(model: nn.Module, *, full: bool) -> dict[str, Any]:
    """``model``'s trainable parameters (every alias of a shared one), frozen base left out:
    sharded (DTensors, as each rank holds them) or, with ``full``, whole on every rank (CPU).

    Read from the parameters themselves rather than ``get_model_state_dict``, whose
    ``ignore_frozen_params`` still gathers a frozen weight tied to another name (a tied
    embedding: the largest tensor of a small LM) when ``full``. A collective with ``full``:
    every rank calls it; only adapters and ``modules_to_save`` are gathered."""
    reshard(model)
    state = {
        clean_name(name): param.detach()
        for name, param in model.named_parameters(remove_duplicate=False)
        if param.requires_grad
    }
    return full_tensors(state) if full else state


# --------------------------------------------------------------------- optimizer state keys
def optimizer_state_by_name(
    state: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> dict[str, Any]:
    """An optimizer ``state_dict`` keyed by parameter position (``torch.optim``'s form, as a
    single-process checkpoint or Lightning's single-file FSDP checkpoint holds it) rekeyed
    by parameter name (``torch.distributed.checkpoint``'s form), pairing the saved ids with
    ``optimizer``'s parameters group by group, in order (what ``Optimizer.load_state_dict``
    does). ``names`` maps ``id(parameter)`` to its clean name. A state already keyed by name
    is returned as it is. The caller checked that the group sizes agree."""
    groups = state["param_groups"]
    if not any(isinstance(key, int) for group in groups for key in group["params"]):
        return dict(state)
    rename = {}
    for saved, built in zip(groups, optimizer.param_groups, strict=True):
        rename.update(
            {key: names[id(p)] for key, p in zip(saved["params"], built["params"], strict=True)}
        )
    return {
        "state": {rename[key]: value for key, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [rename[key] for key in group["params"]]} for group in groups
        ],
    }


def saved_tensor_shapes(path: Path, prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    """The tensors a distributed checkpoint folder holds under ``prefix``, as ``meta``
    tensors of their global shape and dtype (read from its metadata, no tensor data), so a
    checkpoint can be validated before anything is loaded."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    shapes = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            shapes[key[len(prefix) :]] = torch.empty(
                tuple(item.size), dtype=item.properties.dtype, device="meta"
            )
    return shapes


def saved_optimizer_params(path: Path) -> dict[int, set[str]]:
    """Optimizer index -> names of the parameters whose state (``exp_avg``, ``step``...) a
    distributed checkpoint folder holds (``optimizer_<i>.state.<name>.<field>`` keys); an
    optimizer that keeps no per-parameter state maps to an empty set."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    found: dict[int, set[str]] = {}
    for key in metadata.state_dict_metadata:
        head, _, rest = key.partition(".")
        index = head.removeprefix("optimizer_")
        if head == index or not index.isdigit():
            continue
        names = found.setdefault(int(index), set())
        if rest.startswith("state."):
            names.add(rest.removeprefix("state.").rsplit(".", 1)[0])
    return found


# --------------------------------------------------------------- the strategy, for LoRA
class LoRACheckpointing:
    """What the callback hands :func:`attach_to_strategy`: the run's LoRA facts and how to
    write an adapter directory (``export(state_dict, directory)``, rank zero)."""

    def __init__(
        self,
        config: LoRAConfig,
        fingerprint: Callable[[], str],
        export: Callable[[Mapping[str, Any], Path], Any] | None,
        adapter_dir_for: Callable[[Any], Path],
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.export = export
        self.adapter_dir_for = adapter_dir_for


def attach_once(strategy: Any, mark: str, key: str, value: Any) -> dict[str, Any] | None:
    """The state a wrapper of ``strategy``'s methods reads at call time, kept on the strategy
    under ``mark``: the first call creates it (``{key: value}``) and returns it, to wrap the
    methods once; a later call only updates ``key`` (a new fit, another callback) and returns
    None, so methods are never wrapped twice."""
    state = getattr(strategy, mark, None)
    if state is not None:
        state[key] = value
        return None
    state = {key: value}
    object.__setattr__(strategy, mark, state)
    return state


def attach_to_strategy(strategy: ModelParallelStrategy, lora: LoRACheckpointing) -> None:
    """Make ``strategy`` save and load adapter-only checkpoints (once per strategy; a later
    call updates ``lora``):

    - ``lightning_module_state_dict`` returns trainable tensors only (sharded for the
      distributed form, gathered whole for the single file, which rank zero writes): the
      frozen base is never gathered, sent or written;
    - ``save_checkpoint`` of the distributed form also writes the adapter directory beside
      the folder from every rank's shards (the single-file form goes through the
      ``CheckpointIO``, which does it);
    - ``load_checkpoint`` validates the checkpoint (form, LoRA entry, fingerprint, tensor
      names and shapes, optimizer parameters) before it changes the model, loads trainable
      tensors and optimizer states only, and accepts a single file written by a
      single-process run (optimizer states keyed by position).
    """
    state = attach_once(strategy, _MARK, "lora", lora)
    if state is None:
        return
    save = strategy.save_checkpoint

    def lightning_module_state_dict() -> dict[str, Any]:
        return trainable_state_dict(strategy.model, full=not strategy._save_distributed_checkpoint)

    def save_checkpoint(checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        tensors = checkpoint.get("state_dict", {})  # the strategy pops it while saving
        save(checkpoint, filepath, storage_options=storage_options)
        if strategy._save_distributed_checkpoint and state["lora"].export is not None:
            path = Path(strategy.broadcast(filepath))
            whole = full_tensors(tensors)
            if strategy.is_global_zero:
                state["lora"].export(whole, state["lora"].adapter_dir_for(path))
            strategy.barrier("lora_lightning.sharded.save_checkpoint")

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return load_lora_checkpoint(
            strategy, Path(strategy.broadcast(checkpoint_path)), state["lora"], weights_only
        )

    for name, method in (
        ("lightning_module_state_dict", lightning_module_state_dict),
        ("save_checkpoint", save_checkpoint),
        ("load_checkpoint", load_checkpoint),
    ):
        object.__setattr__(strategy, name, method)


def load_lora_checkpoint(
    strategy: ModelParallelStrategy, path: Path, lora: LoRACheckpointing, weights_only: Any
) -> dict[str, Any]:
    """Validate, then load, an adapter-only checkpoint (a distributed folder or a single
    file) into the sharded model and its optimizers; returns the rest of the checkpoint
    (loops, schedulers, callbacks...) for Lightning to restore, with ``state_dict`` and
    ``optimizer_states`` standing in for what was loaded, so the callback's own check of
    the checkpoint passes again.

    Raises:
        CheckpointMismatchError: not a checkpoint, not a LoRA one, or one that does not fit
            the model or its optimizers; nothing was loaded.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = strategy.lightning_module
    optimizers = [getattr(o, "_optimizer", o) for o in strategy.optimizers]
    training = strategy.lightning_module.trainer.state.fn == TrainerFn.FITTING
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    distributed = path.is_dir()
    if distributed:
        if not (path / _METADATA).is_file():
            raise CheckpointMismatchError(
                f"checkpoint folder {path} has no {_METADATA}: it is not a distributed "
                "checkpoint written by ModelParallelStrategy; resume from another checkpoint"
            )
        checkpoint = _read(path / _METADATA, weights_only)
        check_checkpoint_form(checkpoint, f"checkpoint {path}")
        checkpoint["state_dict"] = saved_tensor_shapes(path)
        saved_params = saved_optimizer_params(path)
        checkpoint["optimizer_states"] = [
            {"state": {}, "param_groups": [{"params": sorted(saved_params[i])}]}
            for i in sorted(saved_params)
        ]
    else:
        checkpoint = _read(path, weights_only)
        check_checkpoint_form(checkpoint, f"checkpoint {path}")
    validate_checkpoint(checkpoint, model, lora.config, lora.fingerprint(), training=training)
    if training:
        _check_optimizers(checkpoint["optimizer_states"], optimizers, names, distributed)
    # Everything checked: from here on the model and the optimizers change.
    state = checkpoint["state_dict"]
    if distributed:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sharded = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
        sharded = {key: value for key, value in sharded.items() if key in state}
        dcp_load({"state_dict": sharded}, checkpoint_id=str(path))
        set_model_state_dict(model, sharded, options=StateDictOptions(strict=False))
    else:
        set_model_state_dict(
            model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False)
        )
    if training:
        for index, optimizer in enumerate(optimizers):
            if distributed:
                key = f"optimizer_{index}"
                loaded = {key: get_optimizer_state_dict(model, optimizer)}
                dcp_load(loaded, checkpoint_id=str(path))
                set_optimizer_state_dict(model, optimizer, loaded[key])
            else:
                saved = optimizer_state_by_name(
                    checkpoint["optimizer_states"][index], optimizer, names
                )
                set_optimizer_state_dict(
                    model, optimizer, saved, options=StateDictOptions(full_state_dict=True)
                )
    return checkpoint


def _check_optimizers(
    saved: Sequence[Mapping],
    optimizers: Sequence[torch.optim.Optimizer],
    names: dict,
    by_name: bool,
) -> None:
    if not by_name:
        # Positional states (a single file): Lightning's own rule, group by group.
        check_optimizer_states(saved, optimizers, [], 0)
        return
    if len(saved) != len(optimizers):
        raise CheckpointMismatchError(
            f"the checkpoint holds the state of {len(saved)} optimizer(s), the run built "
            f"{len(optimizers)}: configure_optimizers changed since it was written; resume "
            "with the same optimizers or start a new run without ckpt_path"
        )
    for index, (state, optimizer) in enumerate(zip(saved, optimizers, strict=True)):
        have = set(state["param_groups"][0]["params"])
        built = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
        if have and have != built:  # (no state at all: a stateless optimizer, e.g. SGD)
            raise CheckpointMismatchError(
                f"optimizer {index} ({type(optimizer).__name__}) optimizes {len(built)} "
                f"parameter(s), its state in the checkpoint {len(have)}: only in the "
                f"checkpoint {sorted(have - built)[:4]}, only now {sorted(built - have)[:4]}; "
                "resume with the same setup or start a new run without ckpt_path"
            )


def _read(path: Path, weights_only: Any) -> Any:
    try:
        if weights_only is False:  # the caller vouched for the file (fit(..., weights_only=False))
            from lightning.fabric.utilities.cloud_io import _load as pl_load

            return pl_load(path, map_location="cpu", weights_only=False)
        return torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one clear error
        reason = f"{type(err).__name__}: {(str(err).strip() or '?').splitlines()[0][:160]}"
        raise CheckpointMismatchError(
            f"checkpoint {path} could not be read ({reason}); resume from another checkpoint "
            "or start without ckpt_path"
        ) from err


__all__ = [
    "BLOCK_LISTS",
    "FSDP2Strategy",
    "LoRACheckpointing",
    "attach_to_strategy",
    "check_shardable",
    "data_parallel_mesh",
    "full_tensors",
    "is_dtensor",
    "is_sharded",
    "load_lora_checkpoint",
    "optimizer_state_by_name",
    "reshard",
    "saved_optimizer_params",
    "saved_tensor_shapes",
    "shard_model",
    "trainable_state_dict",
    "transformer_blocks",
]
