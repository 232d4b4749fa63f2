"""The base fingerprint (``lora_lightning.lightning.fingerprint``): every frozen value counts,
names, shapes and dtypes too; trainable tensors, layout, storage offset, device path and a save
and load do not."""

from __future__ import annotations

import io

import pytest
import torch
from lightning_models import MLP_TARGETS, MLPModule
from torch import nn

from lora_lightning import LoRAConfig
from lora_lightning.core import inject_lora
from lora_lightning.lightning import fingerprint
from lora_lightning.lightning.fingerprint import base_fingerprint


def injected(seed: int = 0) -> MLPModule:
    module = MLPModule(seed=seed)
    inject_lora(module, LoRAConfig(r=2, target_modules=MLP_TARGETS))
    return module


def _holder(**tensors: torch.Tensor) -> nn.Module:
    module = nn.Module()
    for name, value in tensors.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return module


# 200_003 float32 = 3 full rows of 65536 words + a partial row + 4 tail bytes.
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fingerprint_changes_when_any_one_element_changes(dtype):
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(200_003, generator=generator) * 50).to(dtype)
    before = base_fingerprint(_holder(w=values))
    n = values.numel()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.itemsize]
    for index in [0, 1, 7, 65_535, 65_536, 131_071, n // 2, n - 5, n - 4, n - 1]:
        changed = values.clone()
        changed.view(bits)[index] ^= 1  # the smallest change: the lowest bit
        assert base_fingerprint(_holder(w=changed)) != before, (dtype, index)
        changed = values.clone()
        changed[index] = changed[index] * 2 + 3
        assert base_fingerprint(_holder(w=changed)) != before, (dtype, index)


def test_fingerprint_changes_when_two_elements_swap_or_bits_flip():
    values = torch.randn(300, 500, generator=torch.Generator().manual_seed(1))
    before = base_fingerprint(_holder(w=values))
    swapped = values.clone()
    swapped[3, 4], swapped[200, 17] = values[200, 17], values[3, 4]
    assert base_fingerprint(_holder(w=swapped)) != before
    flipped = values.clone()
    flipped.view(torch.int32)[150, 250] ^= 1  # the lowest mantissa bit
    assert base_fingerprint(_holder(w=flipped)) != before
    assert base_fingerprint(_holder(w=-0.0 * values.abs())) != base_fingerprint(
        _holder(w=torch.zeros_like(values))
    )  # -0.0 and 0.0: equal values, different bits, different weights


def test_fingerprint_covers_names_shapes_and_dtypes():
    values = torch.arange(12.0)
    reference = base_fingerprint(_holder(w=values))
    assert base_fingerprint(_holder(w=values.clone())) == reference
    assert base_fingerprint(_holder(v=values)) != reference
    assert base_fingerprint(_holder(w=values.view(3, 4))) != reference
    assert base_fingerprint(_holder(w=values.view(torch.int32))) != reference


def test_fingerprint_skips_trainable_tensors():
    module = injected()
    before = base_fingerprint(module)
    with torch.no_grad():
        module.net.layers[0].lora_A.weight.add_(1.0)
        module.net.layers[1].lora_B.weight.add_(1.0)
    assert base_fingerprint(module) == before
    with torch.no_grad():
        module.net.layers[2].bias[0] += 1e-6
    assert base_fingerprint(module) != before


def test_fingerprint_is_the_same_after_a_cpu_save_and_load(tmp_path):
    module = injected()
    path = tmp_path / "model.pt"
    torch.save(module.state_dict(), path)
    other = injected(seed=3)
    assert base_fingerprint(other) != base_fingerprint(module)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert base_fingerprint(other) == base_fingerprint(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert base_fingerprint(torch.load(buffer, weights_only=False)) == base_fingerprint(module)


def test_fingerprint_does_not_depend_on_layout_or_storage_offset():
    values = torch.randn(70_000, 3, generator=torch.Generator().manual_seed(2))
    reference = base_fingerprint(_holder(w=values.t().contiguous()))
    assert base_fingerprint(_holder(w=values.t())) == reference  # non-contiguous
    half = torch.randn(65_539, generator=torch.Generator().manual_seed(3)).half()
    storage = torch.cat([torch.zeros(1, dtype=torch.half), half])
    shifted = storage[1:]  # starts 2 bytes into its storage: no int64 view there
    assert shifted.storage_offset() == 1
    assert base_fingerprint(_holder(w=shifted)) == base_fingerprint(_holder(w=half.clone()))


def test_fingerprint_row_sums_equal_the_elementwise_path_other_devices_take(monkeypatch):
    """CPU uses an integer matrix-vector product; other devices multiply and sum. Both are
    wrapping int64 arithmetic, so the fingerprint is the same wherever it is computed."""
    words = torch.randint(-(2**62), 2**62, (3 * 65_536 + 1234,), dtype=torch.int64)
    weights = torch.arange(1, 2 * 65_536, 2, dtype=torch.int64)
    on_cpu = fingerprint.word_checksums(words, weights)
    monkeypatch.setattr(fingerprint, "_weighted_rows", lambda block, w: (block * w).sum(1))
    assert torch.equal(fingerprint.word_checksums(words, weights), on_cpu)
    module = injected()
    assert base_fingerprint(module) == base_fingerprint(injected())


def test_fingerprint_of_a_meta_model_is_its_structure():
    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 4))

    with torch.device("meta"):
        first, second, wider = net(10), net(10), net(11)
    assert base_fingerprint(first) == base_fingerprint(second)
    assert base_fingerprint(wider) != base_fingerprint(first)
    assert base_fingerprint(net(10)) != base_fingerprint(first)  # real values count
