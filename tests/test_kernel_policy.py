"""Which implementation the Linear-style adapters compute with (``core.kernels.plain_ops``).

The autograd functions run on the CPU; plain differentiable ops run on every other device
(a GPU step of a small model is launch-bound, where a Python autograd function's ~10 us a call
made ours 6-19% slower than PEFT on an H200: experiments/gpu/README.md). Both must compute
the same maths; the plain path's dropout must be PEFT's own (``F.dropout``), mask for mask.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import randomize_adapters, tiny_bert

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.core import kernels
from lora_lightning.core.errors import LoRAConfigError

TARGETS = [r".*\.(query|key|value|dense)"]


@pytest.fixture
def policy(monkeypatch):
    """Set the policy for one test (the environment is read once, at import)."""

    def set_policy(value: str) -> None:
        monkeypatch.setattr(kernels, "_POLICY", value)

    return set_policy


def test_auto_picks_the_functions_on_the_cpu_and_plain_ops_elsewhere():
    assert kernels._POLICY == "auto"  # CI runs without LORA_LIGHTNING_KERNELS
    assert not kernels.plain_ops(torch.zeros(2))
    assert kernels.plain_ops(torch.zeros(2, device="meta"))


def test_the_environment_variable_forces_one_and_a_bad_value_is_refused(monkeypatch):
    for value, expected in [("plain", "plain"), (" Functions ", "functions"), ("", "auto")]:
        monkeypatch.setenv(kernels.KERNELS_ENV, value)
        assert kernels._read_policy() == expected
    monkeypatch.setenv(kernels.KERNELS_ENV, "fast")
    with pytest.raises(LoRAConfigError, match=r"LORA_LIGHTNING_KERNELS='fast'.*auto, functions"):
        kernels._read_policy()


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=ids).logits
    logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("group_shared_input", [True, False])
def test_plain_ops_compute_what_the_functions_compute(policy, group_shared_input):
    base = tiny_bert()
    inject_lora(
        base, LoRAConfig(target_modules=TARGETS, r=4, group_shared_input=group_shared_input)
    )
    randomize_adapters(base)
    ids = torch.randint(0, 50, (3, 7))
    results = {}
    for name in ("functions", "plain"):
        policy(name)
        results[name] = _run(copy.deepcopy(base).train(), ids)
    (out_f, grads_f), (out_p, grads_p) = results["functions"], results["plain"]
    torch.testing.assert_close(out_p, out_f, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_f.keys() and any("lora_A" in n for n in grads_p)
    for name in grads_f:
        torch.testing.assert_close(grads_p[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_ops_draw_pefts_dropout_masks(policy):
    policy("plain")
    base = tiny_bert().eval()  # the base's own dropout off: only LoRA's draws
    ours = copy.deepcopy(base)
    config = dict(r=4, dropout=0.3, group_shared_input=False)
    inject_lora(ours, LoRAConfig(target_modules=TARGETS, **config))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=TARGETS[0], r=4, lora_alpha=16, lora_dropout=0.3),
    )
    randomize_adapters(ours)
    randomize_adapters(theirs)
    for model in (ours, theirs):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and module.p == 0.3:
                module.train()  # PEFT's lora_dropout modules
        for module in model.modules():
            if hasattr(module, "lora_A"):
                module.train()
    ids = torch.randint(0, 50, (3, 7))
    torch.manual_seed(11)
    ours_out = ours(input_ids=ids).logits
    torch.manual_seed(11)
    theirs_out = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-6)


def test_under_torch_compile_the_adapters_trace_as_plain_ops():
    """Dynamo traces an autograd function as a higher-order op with subgraphs of its own,
    which kept the compiled SmolLM2 step's peak memory 13-16% above PEFT's; plain ops do not
    (at dropout 0; with dropout the function and its masks stay, as in eager:
    test_shared_input's compiled-dropout test)."""
    import torch._dynamo

    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    model = tiny_bert().train()
    inject_lora(model, LoRAConfig(target_modules=TARGETS, r=4, dropout=0.0))
    randomize_adapters(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend)
        compiled(input_ids=torch.randint(0, 50, (2, 5))).logits.sum().backward()
    finally:
        torch._dynamo.reset()
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert sum("addmm" in target for target in targets) >= 12  # every adapted layer traced
    assert not any("autograd_function_apply" in target for target in targets)


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_without_autograd_the_functions_policy_computes_with_plain_ops(
    policy, monkeypatch, no_autograd
):
    """Without a backward and without dropout the functions have nothing to add but Python
    per layer (eval forwards and generation steps ran 2-7% behind PEFT's in the launch-bound
    regime, experiments/bench/results/overhead.md): plain ops compute there, same outputs."""
    policy("functions")
    model = tiny_bert().eval()
    inject_lora(model, LoRAConfig(target_modules=TARGETS, r=4))
    randomize_adapters(model)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits  # the functions' forwards, called directly

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd function ran without autograd")

    monkeypatch.setattr(kernels._ProjectDown, "forward", staticmethod(refuse))
    monkeypatch.setattr(kernels._AddLowRank, "forward", staticmethod(refuse))
    with no_autograd():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="autograd function ran"):  # they do with grads
        model(input_ids=ids)
