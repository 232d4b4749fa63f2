"""Property tests (hypothesis) of the LoRA algebra over layer types, shapes, ranks and dtypes.

Each example builds one small layer (Linear, GPT-2 Conv1D, Conv1d/2d/3d with random stride,
padding and dilation, or Embedding), adapts it with random adapter values, and checks a law:
zero change at init, merged == unmerged, unmerge(merge(W)) == W, unload restores the base,
the state-dict key contract, and the adapter-file round trip.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import assert_close_relative, randomize_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

KINDS = ("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv3d", "embedding")
BASE_DTYPES = (torch.float32, torch.float64)
ADAPTER_DTYPES = ("auto", "float32", "float64", "bfloat16")
EXAMPLES = settings(max_examples=30, deadline=None)


@dataclass
class Case:
    """One adapted-layer scenario drawn by hypothesis."""

    kind: str
    n_in: int
    n_out: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    r: int
    alpha: float
    use_rslora: bool
    base_dtype: torch.dtype
    adapter_dtype: str
    seed: int

    def layer(self) -> nn.Module:
        torch.manual_seed(self.seed)
        conv_args = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        layer = {
            "linear": lambda: nn.Linear(self.n_in, self.n_out),
            "gpt2_conv1d": lambda: Conv1D(self.n_out, self.n_in),
            "conv1d": lambda: nn.Conv1d(self.n_in, self.n_out, self.kernel, **conv_args),
            "conv2d": lambda: nn.Conv2d(self.n_in, self.n_out, self.kernel, **conv_args),
            "conv3d": lambda: nn.Conv3d(self.n_in, self.n_out, self.kernel, **conv_args),
            "embedding": lambda: nn.Embedding(self.n_in, self.n_out),
        }[self.kind]()
        return nn.Sequential(layer).to(self.base_dtype).eval()

    def inputs(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        if self.kind == "embedding":
            return torch.randint(0, self.n_in, (2, 4), generator=generator)
        spatial = {"linear": (), "gpt2_conv1d": (3,), "conv1d": (6,), "conv2d": (6, 5)}
        shape = spatial.get(self.kind, (5, 5, 6))
        if self.kind in ("linear", "gpt2_conv1d"):
            shape = (2, *shape, self.n_in)
        else:
            shape = (2, self.n_in, *shape)
        return torch.randn(shape, generator=generator).to(self.base_dtype)

    def config(self) -> LoRAConfig:
        return LoRAConfig(
            r=self.r,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            dtype=self.adapter_dtype,
            seed=self.seed,
            target_modules=["0"],
        )

    def adapted(self) -> nn.Module:
        model = self.layer()
        inject_lora(model, self.config())
        randomize_adapters(model, seed=self.seed, scale=0.3)
        return model

    @property
    def rtol(self) -> float:
        """Relative tolerance of merged-vs-unmerged outputs: set by the least precise dtype."""
        if self.adapter_dtype == "bfloat16":
            return 3e-2
        if self.base_dtype == torch.float64 and self.adapter_dtype in ("auto", "float64"):
            return 1e-10
        return 1e-5


cases = st.builds(
    Case,
    kind=st.sampled_from(KINDS),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    r=st.integers(1, 5),
    alpha=st.floats(0.25, 32.0),
    use_rslora=st.booleans(),
    base_dtype=st.sampled_from(BASE_DTYPES),
    adapter_dtype=st.sampled_from(ADAPTER_DTYPES),
    seed=st.integers(0, 2**16),
)


@EXAMPLES
@given(cases)
def test_output_is_unchanged_at_init(case):
    model = case.layer()
    expected = model(case.inputs())
    inject_lora(model, case.config())
    assert torch.equal(model(case.inputs()), expected)


@EXAMPLES
@given(cases)
def test_adapted_output_keeps_the_base_output_dtype_and_shape(case):
    base = case.layer()(case.inputs())
    out = case.adapted()(case.inputs())
    assert (out.dtype, out.shape) == (base.dtype, base.shape)


@EXAMPLES
@given(cases)
def test_merged_output_equals_unmerged_output(case):
    model = case.adapted()
    with torch.no_grad():
        unmerged = model(case.inputs())
        merge_lora(model)
        merged = model(case.inputs())
    assert_close_relative(merged, unmerged, rtol=case.rtol)


@EXAMPLES
@given(cases)
def test_unmerge_after_merge_restores_the_base_weight(case):
    model = case.adapted()
    weight = model[0].weight.detach().clone()
    merge_lora(model)
    delta = (model[0].weight.detach() - weight).abs().max()
    unmerge_lora(model)
    # One rounding of |W| + |delta| per step, in the base dtype.
    bound = 4 * torch.finfo(case.base_dtype).eps * (weight.abs().max() + delta)
    assert (model[0].weight.detach() - weight).abs().max() <= bound


@EXAMPLES
@given(cases)
def test_low_rank_term_is_linear_in_the_scaling(case):
    # In float64 so that rounding does not hide the law.
    case = Case(**{**vars(case), "base_dtype": torch.float64, "adapter_dtype": "float64"})
    base = case.layer()(case.inputs())
    term = case.adapted()(case.inputs()) - base
    doubled = Case(**{**vars(case), "alpha": 2 * case.alpha}).adapted()
    assert_close_relative(doubled(case.inputs()) - base, 2 * term, rtol=1e-9)


@EXAMPLES
@given(cases, st.booleans())
def test_unload_leaves_exactly_the_base_state_dict(case, merge):
    plain = case.layer()
    model = case.adapted()
    unload_lora(model, merge=merge)
    assert list(model.state_dict()) == list(plain.state_dict())
    if not merge:
        assert torch.equal(model(case.inputs()), plain(case.inputs()))


@EXAMPLES
@given(cases)
def test_injection_only_adds_lora_a_and_lora_b_weight_keys(case):
    plain, model = case.layer(), case.adapted()
    added = set(model.state_dict()) - set(plain.state_dict())
    assert added == {"0.lora_A.weight", "0.lora_B.weight"}
    assert set(plain.state_dict()) <= set(model.state_dict())


@settings(max_examples=20, deadline=None)
@given(cases)
def test_saved_adapter_loads_with_identical_outputs(case):
    model = case.adapted()
    fresh = case.layer()
    with tempfile.TemporaryDirectory() as directory:
        if case.kind.startswith("conv") and case.dilation > 1:
            # PEFT builds a dilated conv's lora_A without the dilation: other maths, refused.
            with pytest.raises(AdapterFileError, match="dilation"):
                save_adapter(model, directory)
            return
        save_adapter(model, directory)
        load_adapter(fresh, directory)
    assert torch.equal(fresh(case.inputs()), model(case.inputs()))


def test_property_tests_are_derandomized_without_a_database_where_ci_is_set():
    """The seed policy (``tests/conftest.py``): CI replays the same examples, nothing saved."""
    assert settings.default.derandomize is bool(os.environ.get("CI"))
    assert (settings.default.database is None) is bool(os.environ.get("CI"))
