"""The custom autograd functions behind Linear/Conv1D adapters, and their dropout masks.

``_ProjectDown`` computes ``A dropout(x)`` and ``_AddLowRank`` adds ``s · h B^T`` with
hand-written backwards (chosen for speed), so their gradients are checked here against
finite differences and against plain autograd, and their masks against ``nn.Dropout``.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from models import randomize_adapters, tiny_bert, tiny_gpt2
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.core.kernels import _AddLowRank, _ProjectDown, add_low_rank, keep_mask
from lora_lightning.core.state import layer_state


def _double(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()


def test_project_down_gradients_match_finite_differences():
    x, a = _double(2, 3, 5, seed=0), _double(4, 5, seed=1)
    assert torch.autograd.gradcheck(lambda x, a: _ProjectDown.apply(x, a, 0.0, True), (x, a))


def test_add_low_rank_gradients_match_finite_differences():
    y, h, b = _double(2, 3, 6, seed=0), _double(2, 3, 4, seed=1), _double(6, 4, seed=2)
    assert torch.autograd.gradcheck(lambda y, h, b: _AddLowRank.apply(y, h, b, 0.7), (y, h, b))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradients_equal_plain_autograd_for_any_gradient_layout(layout):
    """Attention hands key's gradient back in a transposed layout: both must be handled."""
    x, a, b = _double(3, 7, 5, seed=0), _double(4, 5, seed=1), _double(6, 4, seed=2)
    w = _double(6, 5, seed=3).detach()
    grad_out = torch.randn(3, 6, 7, dtype=torch.float64)
    grad_out = grad_out.transpose(1, 2) if layout == "transposed" else grad_out.reshape(3, 7, 6)
    assert grad_out.is_contiguous() == (layout == "contiguous")

    def ours(x, a, b):
        return add_low_rank(F.linear(x, w), _ProjectDown.apply(x, a, 0.0, True), b, 0.5)

    def plain(x, a, b):
        return F.linear(x, w) + 0.5 * F.linear(F.linear(x, a), b)

    got = torch.autograd.grad(ours(x, a, b), (x, a, b), grad_out)
    want = torch.autograd.grad(plain(x, a, b), (x, a, b), grad_out)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_only_the_gradients_asked_for_are_computed():
    x = torch.randn(4, 5)  # an input that needs no gradient, as in a first layer
    a = torch.randn(3, 5, requires_grad=True)
    h = _ProjectDown.apply(x, a, 0.0, True)
    (grad_a,) = torch.autograd.grad(h.sum(), a)
    torch.testing.assert_close(grad_a, torch.ones(4, 3).t() @ x)


@pytest.mark.parametrize("fast", [True, False])
def test_backward_uses_the_forward_dropout_mask(fast):
    """With A = I, h is the rescaled dropped input itself, which reveals the mask."""
    torch.manual_seed(0)
    p, n = 0.4, 16
    x = torch.randn(64, n, requires_grad=True)
    a = torch.eye(n, requires_grad=True)
    h = _ProjectDown.apply(x, a, p, fast)
    kept = h.detach() != 0
    assert 0.5 < kept.float().mean() < 0.7  # about 1 - p
    scale = h.detach()[kept].div(x.detach()[kept]).unique()
    assert torch.allclose(scale, torch.tensor(1 / (1 - p)), rtol=1e-4)
    w = torch.randn(64, n)
    grad_x, grad_a = torch.autograd.grad((h * w).sum(), (x, a))
    torch.testing.assert_close(grad_x, w * kept * scale[0])
    torch.testing.assert_close(grad_a, (w * scale[0]).t() @ (x.detach() * kept))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9, 0.3333, 1e-5])
def test_fast_mask_drops_at_the_requested_rate(p):
    torch.manual_seed(0)
    mask, p_used = keep_mask(torch.empty(1 << 22), p)
    assert abs(p_used - p) <= 1e-4 * p
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    dropped = 1 - mask.mean().item()
    sigma = (p_used * (1 - p_used) / mask.numel()) ** 0.5
    assert abs(dropped - p_used) < 5 * sigma + 1e-7


def test_fast_mask_entries_are_independent_of_their_neighbours():
    """Four 16-bit draws come from one 64-bit word: neighbours must still be uncorrelated."""
    torch.manual_seed(1)
    mask, _ = keep_mask(torch.empty(1 << 22), 0.5)
    pairs = mask.view(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            both = (pairs[:, i] * pairs[:, j]).mean().item()
            assert abs(both - 0.25) < 5 * (0.25 * 0.75 / pairs.shape[0]) ** 0.5


def test_exact_mask_is_torch_dropouts_mask():
    x = torch.randn(300, 40)
    torch.manual_seed(7)
    expected = F.dropout(x, 0.2, training=True) != 0
    torch.manual_seed(7)
    mask, p_used = keep_mask(x, 0.2, fast=False)
    assert p_used == 0.2 and torch.equal(mask.bool(), expected)


def test_masks_follow_the_seed():
    torch.manual_seed(3)
    first, _ = keep_mask(torch.empty(1000), 0.3)
    torch.manual_seed(3)
    again, _ = keep_mask(torch.empty(1000), 0.3)
    other, _ = keep_mask(torch.empty(1000), 0.3)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("fuse", [True, False])
def test_unfused_dropout_matches_peft_and_fused_shares_one_mask(fuse):
    """``group_shared_input=False`` with ``dropout_masks="torch"`` reproduces PEFT's per-module
    masks draw for draw."""
    ours = tiny_bert().train()
    theirs = copy.deepcopy(ours)
    inject_lora(ours, LoRAConfig(dropout=0.3, target_modules=[r".*\.(query|key|value)"],
                                 modules_to_save=[], group_shared_input=fuse,
                                 dropout_masks="fast" if fuse else "torch"))  # fmt: skip
    randomize_adapters(ours, seed=2)
    theirs = peft.get_peft_model(
        theirs,
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3, target_modules=["query", "key", "value"]),
    )  # fmt: skip
    theirs.load_state_dict(
        {f"base_model.model.{k.replace('lora_A.weight', 'lora_A.default.weight').replace('lora_B.weight', 'lora_B.default.weight')}": v for k, v in ours.state_dict().items()},
        strict=False,
    )  # fmt: skip
    theirs.train()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    out_ours = ours(input_ids=ids).logits
    torch.manual_seed(11)
    out_theirs = theirs(input_ids=ids).logits
    if fuse:
        assert not torch.allclose(out_ours, out_theirs, atol=1e-4)
    else:
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)


def _train_step_grads(model: nn.Module, use_checkpoint: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    x = torch.randn(3, 6, 16)
    layer = model.bert.encoder.layer[0]
    out = checkpoint(layer, x, use_reentrant=False)[0] if use_checkpoint else layer(x)[0]
    out.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_same_dropout_masks():
    model = tiny_bert().train()
    inject_lora(model, LoRAConfig(dropout=0.5, target_modules=[r".*\.(query|key|value|dense)"]))
    randomize_adapters(model, seed=4)
    twin = copy.deepcopy(model)
    plain, recomputed = _train_step_grads(model, False), _train_step_grads(twin, True)
    assert plain.keys() == recomputed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gpt2_conv1d_adapter_has_plain_autograd_gradients():
    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(r=4, target_modules=[r".*\.c_attn"], modules_to_save=[]))
    randomize_adapters(model, seed=3)
    attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight stored [in, out]
    x = torch.randn(2, 5, 16, requires_grad=True)
    upstream = torch.randn(2, 5, 48)
    a, b = attn.lora_A.weight, attn.lora_B.weight
    got = torch.autograd.grad((attn(x) * upstream).sum(), (x, a, b))
    scaling = layer_state(attn).scaling
    plain = torch.addmm(attn.bias, x.view(-1, 16), attn.weight).view(2, 5, 48)
    plain = plain + scaling * F.linear(F.linear(x, a), b)
    want = torch.autograd.grad((plain * upstream).sum(), (x, a, b))
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_compiled_model_trains_with_the_same_gradients():
    model = tiny_bert().train()
    inject_lora(model, LoRAConfig(target_modules=[r".*\.(query|key|value|dense)"]))
    randomize_adapters(model, seed=6)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    model(input_ids=ids, labels=labels).loss.backward()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=False)
    compiled(input_ids=ids, labels=labels).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_in_another_dtype_than_the_base_still_trains():
    model = tiny_bert().to(torch.bfloat16).train()
    inject_lora(model, LoRAConfig(dtype="float32", target_modules=[r".*\.(query|value)"]))
    randomize_adapters(model, seed=1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().sum().backward()
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.lora_A.weight.grad.dtype == torch.float32
    assert query.lora_A.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_under_bf16_autocast_matches_float32(dropout):
    """Lightning's ``bf16-mixed`` runs the forward under autocast and the backward outside
    it: the backward must replay autocast (a float32 adapter meets bf16 gradients)."""
    model = tiny_bert().train()
    inject_lora(model, LoRAConfig(dropout=dropout, target_modules=[r".*\.(query|key|value|dense)"]))
    randomize_adapters(model, seed=8)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(9)
    model(input_ids=ids, labels=labels).loss.backward()
    torch.manual_seed(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = twin(input_ids=ids, labels=labels).loss
    loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if ".lora_" in name:
            assert q.grad.dtype == torch.float32
            error = (q.grad - p.grad).norm() / p.grad.norm()
            assert error < 0.05, f"{name}: relative error {error:.3f} under bf16 autocast"


def test_lightning_bf16_mixed_run_trains_the_adapters(tmp_path):
    from lightning_models import BertModule, trainer

    from lora_lightning import LoRACallback

    module = BertModule()
    callback = LoRACallback(LoRAConfig(dropout=0.1, target_modules=[r".*\.(query|value)"]))
    trainer(tmp_path, [callback], max_steps=2, precision="bf16-mixed").fit(module)
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert query.lora_B.weight.dtype == torch.float32
    assert query.lora_B.weight.abs().sum() > 0  # B starts at zero: it moved


def test_torch_func_grad_over_an_adapted_model_matches_autograd():
    """torch.func transforms cannot run our autograd functions: the plain ops take over."""
    from torch.func import functional_call, grad, vmap

    model = tiny_bert()
    inject_lora(model, LoRAConfig(target_modules=[r".*\.(query|value)"]))
    randomize_adapters(model, seed=2)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def loss(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (ids,)).logits.square().sum()

    got = grad(loss)(params, ids)
    model(input_ids=ids).logits.square().sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, ids.unsqueeze(1))
    total = {k: v.sum(0) for k, v in per_sample.items()}
    name = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert total[name].shape == params[name].shape
