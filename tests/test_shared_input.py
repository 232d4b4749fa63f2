"""Siblings reading one input (query/key/value) share one A matmul and one dropout mask."""

from __future__ import annotations

import copy

import pytest
import torch
from models import randomize_adapters, tiny_bert, tiny_llama
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, unload_lora
from lora_lightning.core.state import layer_state


class Attention(nn.Module):
    """Self-attention projections; `kv_input` lets key/value read another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv_input is None else kv_input
        return self.query(x) + 2 * self.key(kv) + 3 * self.value(kv)


def _pair(dropout: float = 0.0):
    torch.manual_seed(0)
    base = Attention()
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(r=2, dropout=dropout, target_modules=["query", "key", "value"])
    inject_lora(fused, LoRAConfig(**config))
    inject_lora(plain, LoRAConfig(**config, group_shared_input=False))
    randomize_adapters(fused, seed=1)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_query_key_value_of_one_attention_form_one_group():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(target_modules=[r".*\.(query|key|value)"]))
    layer = model.bert.encoder.layer[0].attention.self
    group = layer_state(layer.query).group
    assert group is not None and group.members == [layer.query, layer.key, layer.value]
    assert layer_state(model.bert.encoder.layer[1].attention.self.query).group is not group


def test_no_groups_when_fusion_is_off():
    _, plain = _pair()
    assert all(layer_state(m).group is None for m in (plain.query, plain.key, plain.value))


def test_fused_outputs_and_gradients_match_per_module_computation():
    fused, plain = _pair()
    x = torch.randn(4, 5, 8)
    out_fused, out_plain = fused(x), plain(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-6, atol=1e-6)
    out_fused.square().sum().backward()
    out_plain.square().sum().backward()
    _assert_same_gradients(fused, plain)


def _assert_same_gradients(fused: nn.Module, plain: nn.Module) -> None:
    for (name, ours), (_, theirs) in zip(
        fused.named_parameters(), plain.named_parameters(), strict=True
    ):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_member_called_with_another_input_recomputes():
    fused, plain = _pair()
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(fused(x, memory), plain(x, memory), rtol=1e-6, atol=1e-6)


def test_an_input_modified_in_place_is_not_served_from_the_cache():
    fused, plain = _pair()
    x = torch.randn(3, 8)
    q_before = fused.query(x)
    x.mul_(2)  # bumps x._version: the key must see the new values
    torch.testing.assert_close(fused.key(x), plain.key(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(q_before, fused.query(x))


def test_siblings_share_one_dropout_mask_in_training():
    fused, _ = _pair(dropout=0.5)
    with torch.no_grad():  # same A and B everywhere: equal deltas iff the masks are equal
        for module in (fused.query, fused.key, fused.value):
            module.lora_A.weight.copy_(fused.query.lora_A.weight)
            module.lora_B.weight.copy_(fused.query.lora_B.weight)
            module.weight.zero_()
            module.bias.zero_()
    x = torch.randn(64, 8)
    torch.manual_seed(3)
    q, k = fused.query(x), fused.key(x)
    torch.testing.assert_close(q, k)
    fused.eval()
    assert torch.equal(fused.query(x), fused.key(x))


def test_per_module_dropout_masks_differ_when_fusion_is_off():
    _, plain = _pair(dropout=0.5)
    with torch.no_grad():
        for module in (plain.query, plain.key):
            module.lora_A.weight.copy_(plain.query.lora_A.weight)
            module.lora_B.weight.copy_(plain.query.lora_B.weight)
    x = torch.randn(64, 8)
    assert not torch.equal(plain.query(x) - plain.query.bias, plain.key(x) - plain.key.bias)


def test_group_holds_no_activation_after_every_sibling_ran():
    fused, _ = _pair()
    fused(torch.randn(2, 8))
    group = layer_state(fused.query).group
    assert group._parts == () and group._input is None


def test_unload_disbands_the_group():
    fused, _ = _pair()
    group = layer_state(fused.query).group
    unload_lora(fused)
    assert group._parts == () and layer_state(fused.query) is None


def test_fused_siblings_work_under_inference_mode():
    fused, plain = _pair()
    fused.eval(), plain.eval()
    with torch.inference_mode():
        x = torch.randn(3, 8)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)


def test_a_deep_copy_of_a_fused_model_computes_like_the_original():
    fused, plain = _pair()
    twin = copy.deepcopy(fused)
    assert layer_state(twin.query).group.members == [twin.query, twin.key, twin.value]
    x = torch.randn(4, 8)
    torch.testing.assert_close(twin(x), plain(x), rtol=1e-6, atol=1e-6)
    twin(x).sum().backward()
    assert twin.key.lora_A.weight.grad is not None and fused.key.lora_A.weight.grad is None


def test_a_group_compiles_to_one_graph_with_the_per_module_outputs_and_gradients():
    """Without dropout, the compiled group computes each member's own product: no rows cache
    for dynamo to break the graph on (it did at every layer, and recompiled in later steps)."""
    import torch._dynamo

    fused, plain = _pair()
    fused.train()
    x = torch.randn(4, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)  # a break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second call must reuse the first call's graph
            got = compiled(x)
            got.square().sum().backward()
    for _ in range(2):  # gradients accumulated over the same two calls
        want = plain(x)
        want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, p_fused), (_, p_plain) in zip(
        fused.named_parameters(), plain.named_parameters(), strict=True
    ):
        if p_fused.requires_grad:
            torch.testing.assert_close(p_fused.grad, p_plain.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_with_dropout_a_compiled_group_still_shares_one_mask():
    import torch._dynamo

    fused, _ = _pair(dropout=0.5)
    fused.train()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="eager")
    x = torch.randn(3, 4, 8)
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    want = fused(x)  # eager: the shared mask, drawn from the same generator state
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def _groups(model: nn.Module) -> list[list[str]]:
    """The shared-input groups of ``model`` as lists of member names (members alone left out)."""
    names = {id(module): name for name, module in model.named_modules()}
    found: dict[int, list[str]] = {}
    for module in model.modules():
        layer = layer_state(module)
        if layer is not None and layer.group is not None:
            found.setdefault(id(layer.group), []).append(names[id(module)])
    return sorted(found.values())


def test_the_first_call_splits_a_group_by_the_input_each_member_read():
    fused, plain = _pair()
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    assert _groups(fused) == [["query", "key", "value"]]
    torch.testing.assert_close(fused(x, memory), plain(x, memory), rtol=1e-6, atol=1e-6)
    assert _groups(fused) == [["key", "value"]]  # query read x alone
    assert layer_state(fused.query).group is None
    out = fused(x, memory)
    torch.testing.assert_close(out, plain(x, memory), rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    plain(x, memory).square().sum().backward()
    _assert_same_gradients(fused, plain)


def test_a_group_whose_members_read_one_input_stays_whole():
    fused, _ = _pair()
    fused(torch.randn(3, 8))
    assert _groups(fused) == [["query", "key", "value"]]
    assert not layer_state(fused.query).group._learning


def test_llama_o_proj_and_down_proj_leave_their_groups_after_the_first_forward():
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_lora(model, LoRAConfig(target_modules=targets, r=2))
    model(input_ids=torch.randint(0, 64, (2, 8)))
    short = [[name.rsplit(".", 1)[-1] for name in group] for group in _groups(model)]
    blocks = len(model.model.layers)
    assert sorted(short) == sorted(
        [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * blocks
    )


def test_splitting_changes_neither_the_maths_nor_the_dropout_draws():
    fresh, _ = _pair(dropout=0.5)
    learnt = copy.deepcopy(fresh)
    x, memory = torch.randn(16, 8), torch.randn(16, 8)
    learnt(x, memory)  # learns and splits; `fresh` splits during the call below
    torch.manual_seed(7)
    first = fresh(x, memory)
    torch.manual_seed(7)
    again = learnt(x, memory)
    assert _groups(fresh) == _groups(learnt) == [["key", "value"]]
    assert torch.equal(first, again)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_sees_the_same_grouping_when_it_recomputes(reentrant):
    from torch.utils.checkpoint import checkpoint

    fused, plain = _pair()
    x = torch.randn(3, 8, requires_grad=True)
    memory = torch.randn(3, 8, requires_grad=True)
    for _ in range(2):  # the first call could learn; the second runs whatever it learnt
        out = checkpoint(fused, x, memory, use_reentrant=reentrant)
        out.square().sum().backward()
    expected = plain(x, memory)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if not reentrant:  # under saved-tensor hooks nothing is learnt: the grouping stays
        assert _groups(fused) == [["query", "key", "value"]]


def test_without_autograd_each_member_computes_alone_and_the_group_holds_nothing():
    """No backward to share and no mask to share (eval): the group's one product saves a
    forward nothing and its bookkeeping costs Python per member, so each member computes its
    own (the same maths); with dropout in effect the shared mask is kept."""
    fused, plain = _pair()
    group = layer_state(fused.query).group
    x = torch.randn(3, 8)
    with torch.no_grad():
        fused.query(x)  # called directly: a grouped product would leave key's rows pending
        assert group._input is None and group._parts == ()
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)
    fused.train()
    with torch.no_grad():
        fused.query(x)  # gradients off but no dropout configured: alone too
        assert group._input is None
    dropping, _ = _pair(dropout=0.5)
    dropping_group = layer_state(dropping.query).group
    with torch.no_grad():
        dropping.query(x)  # dropout in effect: one mask for the siblings, rows kept for them
    assert dropping_group._input is x and len(dropping_group._parts) == 3
