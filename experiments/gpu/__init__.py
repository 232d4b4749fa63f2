"""The prepared GPU check (issue 15): ``python -m experiments.gpu.check`` (``--smoke`` on CPU).

See ``experiments/gpu/README.md``.
"""
