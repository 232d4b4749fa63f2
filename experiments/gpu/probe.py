"""Step 0, the machine: GPU name, memory, compute capability, driver, torch's CUDA, cuDNN and
NCCL versions, and the CPU / Python / library versions and git commit of
``experiments.bench.common.machine_info``. Always run in a fresh interpreter: the parent
process of the check never touches CUDA (its children may be forked from it).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from typing import Any

import torch

from experiments.bench.common import machine_info
from experiments.gpu.common import Context, Recorder


def run(ctx: Context, rec: Recorder) -> None:
    with rec.check("machine") as entry:
        machine = machine_info()
        for dist in ("lightning", "safetensors", "accelerate"):
            try:
                machine["versions"][dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                machine["versions"][dist] = None
        gpu = gpu_info()
        machine["gpu"] = gpu
        requested = ctx.extra.get("requested_device", "auto")
        if requested == "cuda" and not gpu["available"]:
            raise RuntimeError(f"--device cuda, but CUDA is not available: {gpu['reason']}")
        device = "cuda" if gpu["available"] and requested != "cpu" else "cpu"
        rec.record["data"].update(device=device, machine=machine)
        entry.update(
            ok=True,
            summary=f"{gpu.get('name') or 'no GPU'}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}; running on {device}",
        )


def gpu_info() -> dict[str, Any]:
    """What torch and nvidia-smi say about GPU 0 (``available: False`` with a reason if none)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        reason = "torch.cuda.is_available() is False"
        if torch.version.cuda is None:
            reason += f" (torch {torch.__version__} is a CPU build)"
        return {**info, "available": False, "reason": reason}
    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
    info.update(
        available=True,
        count=torch.cuda.device_count(),
        name=props.name,
        total_memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(),
        nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        bf16_supported=torch.cuda.is_bf16_supported(),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        driver=_nvidia_smi("driver_version"),
        nvidia_smi_name=_nvidia_smi("name"),
    )
    return info


def _nvidia_smi(field: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
