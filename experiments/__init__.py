"""Runnable experiments and benchmarks for lora_lightning (not part of the installed package)."""
