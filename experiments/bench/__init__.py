"""Benchmarks comparing lora_lightning with Hugging Face PEFT on the same model, in one process.

Each script runs as ``python -m experiments.bench.<name>`` from the repository root and writes
``<name>.json`` and ``<name>.md`` into ``experiments/bench/results/`` (or ``--out``).
See ``experiments/bench/README.md``.
"""

import os

# Everything is local (meta-device models, the MiniLM package): never reach for the Hub. Set
# here, before any script imports transformers or peft, which read it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
