"""The names of the layer kinds LoRA adapts (``core.layers.layer_kind`` tells them apart).

Owns: the kind names only, so the init registry (``core.inits``), which ``core.config``
imports, can state the kinds each init supports without importing ``core.layers``. Must not
import: anything.
"""

LINEAR, GPT2_CONV1D, CONV, EMBEDDING = "linear", "gpt2_conv1d", "conv", "embedding"
#: Kinds computed by ``core.kernels`` (and so able to share an input, see ``core.fusion``).
MATMUL_KINDS = (LINEAR, GPT2_CONV1D)
