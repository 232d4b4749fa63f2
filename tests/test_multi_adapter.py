"""Many adapters on one base (issue 14 part 2): named adapters, switching, delete, hot-swap,
combination and mixed batches, against loading each adapter alone and against PEFT; every
refused operation leaves the model exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import (
    assert_unchanged,
    logits,
    mlp,
    mlp_inputs,
    randomize_adapters,
    snapshot,
    tiny_bert,
    token_ids,
)

from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAConfigError,
    LoRAStateError,
    active_adapter,
    combine_adapters,
    delete_adapter,
    hotswap_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_state_dict,
    merge_lora,
    mixed_batch_forward,
    save_adapter,
    set_active_adapter,
)

SAME = {"target_modules": ["query", "value"], "r": 4, "alpha": 8}


@torch.no_grad()
def _saved_bert(directory: Path, seed: int, head: bool = True, **config) -> Path:
    """A tiny-BERT adapter with random values (and a random classifier head with ``head``)."""
    model = tiny_bert(0)
    extra = {"modules_to_save": ["classifier"]} if head else {}
    inject_lora(model, LoRAConfig(**{**SAME, **extra, **config}))
    randomize_adapters(model, seed=seed)
    if head:
        generator = torch.Generator().manual_seed(seed)
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return save_adapter(model, directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _saved_bert(root / "a", 1),
        "b": _saved_bert(root / "b", 2),  # same layout as a: switched in place
        # other targets, rank, alpha and no head: switched by re-injection
        "c": _saved_bert(root / "c", 3, head=False, target_modules=["key"], r=2, alpha=3),
        "wide": _saved_bert(root / "wide", 4, r=8, alpha=16),
        "plain_a": _saved_bert(root / "plain_a", 5, head=False),
        "plain_b": _saved_bert(root / "plain_b", 6, head=False, alpha=5),
    }


def _alone(directory: Path) -> torch.Tensor:
    model = tiny_bert(0)
    load_adapter(model, directory)
    return logits(model, token_ids(batch=4))


def _bank(dirs, names=("a", "b", "c")) -> torch.nn.Module:
    model = tiny_bert(0)
    for name in names:
        load_adapter(model, dirs[name], name=name)
    return model


# ----------------------------------------------------------------------------- switching
def test_each_adapter_when_active_gives_the_outputs_of_loading_it_alone(dirs):
    model = _bank(dirs)
    assert list_adapters(model) == ["a", "b", "c"] and active_adapter(model) == "a"
    for name in ("b", "c", "a", "c", "b"):
        set_active_adapter(model, name)
        assert active_adapter(model) == name
        assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs[name])), name


def test_a_switch_between_equal_layouts_copies_in_place_keeping_every_parameter(dirs):
    model = _bank(dirs)
    before = {n: id(p) for n, p in model.named_parameters()}
    set_active_adapter(model, "b")
    assert {n: id(p) for n, p in model.named_parameters()} == before


def test_active_to_bank_to_active_round_trips_bit_for_bit(dirs):
    model = _bank(dirs)
    before = snapshot(model)
    set_active_adapter(model, "b")  # in place
    set_active_adapter(model, "c")  # re-injection
    set_active_adapter(model, "a")
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def test_an_unnamed_injection_is_the_adapter_default(dirs):
    model = tiny_bert(0)
    load_adapter(model, dirs["plain_a"])
    assert list_adapters(model) == ["default"] and active_adapter(model) == "default"
    load_adapter(model, dirs["c"], name="c")
    assert list_adapters(model) == ["default", "c"]
    set_active_adapter(model, "c")
    assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs["c"]))
    set_active_adapter(model, "default")
    assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs["plain_a"]))


def test_unnamed_load_adapter_is_unchanged_by_the_bank(dirs):
    model = tiny_bert(0)
    assert load_adapter(model, dirs["a"]) == [
        n for n, _ in model.named_modules() if n.endswith(("query", "value"))
    ]
    assert list_adapters(model) == ["default"]


# ------------------------------------------------------------------------------ refusals
def test_loading_a_name_in_use_is_refused_and_changes_nothing(dirs):
    model = _bank(dirs, ("a", "b"))
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="hotswap_adapter"):
        load_adapter(model, dirs["c"], name="b")
    with pytest.raises(LoRAConfigError, match="__base__"):
        load_adapter(model, dirs["c"], name="__base__")
    assert_unchanged(model, before)
    assert list_adapters(model) == ["a", "b"]


def test_a_named_file_that_does_not_fit_is_refused_before_anything_changes(dirs, tmp_path):
    model = _bank(dirs, ("a",))
    before = snapshot(model)
    other = tiny_bert(0, num_labels=2)  # another head shape
    inject_lora(other, LoRAConfig(**SAME, modules_to_save=["classifier"]))
    save_adapter(other, tmp_path / "two_labels")
    with pytest.raises(AdapterFileError, match="classifier.weight"):
        load_adapter(model, tmp_path / "two_labels", name="x")
    assert_unchanged(model, before)
    assert list_adapters(model) == ["a"]


def test_switching_to_an_unknown_name_names_the_adapters_and_changes_nothing(dirs):
    model = _bank(dirs, ("a", "b"))
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match=r"no adapter named 'z'.*\['a', 'b'\]"):
        set_active_adapter(model, "z")
    assert_unchanged(model, before)


def test_switching_a_merged_model_is_refused(dirs):
    model = _bank(dirs, ("a", "b"))
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="unmerge_lora"):
        set_active_adapter(model, "b")
    assert_unchanged(model, before)


def test_switching_away_from_an_unconverted_pissa_adapter_is_refused(dirs):
    model = tiny_bert(0)
    inject_lora(model, LoRAConfig(**SAME, init="pissa"))
    load_adapter(model, dirs["plain_a"], name="x")
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="convert_to_plain_lora"):
        set_active_adapter(model, "x")
    assert_unchanged(model, before)


@pytest.mark.parametrize("rows", [["__base__", "default"], ["default", "x"]])
def test_mixed_batch_under_an_unconverted_pissa_adapter_is_refused_as_a_switch_is(dirs, rows):
    model = tiny_bert(0)
    inject_lora(model, LoRAConfig(**SAME, init="pissa"))
    load_adapter(model, dirs["plain_a"], name="x")
    before = snapshot(model)
    with torch.no_grad(), pytest.raises(LoRAStateError, match="convert_to_plain_lora"):
        mixed_batch_forward(model, rows, **token_ids(batch=2))
    assert_unchanged(model, before)


def test_mixed_batch_of_only_the_unconverted_pissa_adapters_rows_runs(dirs):
    model = tiny_bert(0)
    inject_lora(model, LoRAConfig(**SAME, init="pissa"))
    with torch.no_grad():
        out = mixed_batch_forward(model, ["default", "default"], **token_ids(batch=2))
        torch.testing.assert_close(out.logits, model(**token_ids(batch=2)).logits)


def test_a_head_whose_base_values_were_never_seen_is_not_guessed(dirs):
    model = tiny_bert(0)
    load_adapter(model, dirs["a"])  # unnamed: the base's classifier values are gone
    load_adapter(model, dirs["c"], name="c")  # trains no classifier
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="never\\s+recorded"):
        set_active_adapter(model, "c")
    assert_unchanged(model, before)


@pytest.mark.parametrize("scope", ["adapted", "all_linear"])
def test_a_quantized_base_switches_in_place_and_refuses_a_reinjection(dirs, scope):
    from lora_lightning.core import config_of

    model = tiny_bert(0)
    inject_lora(model, LoRAConfig(**SAME, quantize_base="int8", quantize_scope=scope))
    load_adapter(model, dirs["plain_a"], name="x")
    load_adapter(model, dirs["c"], name="c")
    set_active_adapter(model, "x")  # same layout: in place, the base stays quantized
    assert config_of(model).quantize_base == "int8"
    assert config_of(model).quantize_scope == scope  # the base's, not the file's
    # (snapshot() compares values with torch.equal, which quantized tensors lack)
    params = {n: id(p) for n, p in model.named_parameters()}
    adapters = {n: t.clone() for n, t in lora_state_dict(model).items()}
    with pytest.raises(LoRAStateError, match=r"stored\s+quantized"):
        set_active_adapter(model, "c")
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert all(torch.equal(t, adapters[n]) for n, t in lora_state_dict(model).items())
    assert active_adapter(model) == "x" and config_of(model).quantize_base == "int8"


# -------------------------------------------------------------------------------- delete
def test_delete_removes_an_inactive_adapter_and_refuses_the_active_one(dirs):
    model = _bank(dirs)
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a", "c"]
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="set_active_adapter.*unload_lora"):
        delete_adapter(model, "a")
    with pytest.raises(LoRAStateError, match="no adapter named 'b'"):
        delete_adapter(model, "b")
    assert_unchanged(model, before)
    set_active_adapter(model, "c")
    assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs["c"]))


# ------------------------------------------------------------------------------ hot-swap
def test_hotswap_into_the_active_adapter_keeps_every_parameter_object(dirs):
    model = _bank(dirs, ("a",))
    before = {n: id(p) for n, p in model.named_parameters()}
    hotswap_adapter(model, dirs["b"], "a")
    assert {n: id(p) for n, p in model.named_parameters()} == before
    assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs["b"]))


def test_hotswap_into_an_inactive_adapter_takes_effect_when_it_is_activated(dirs):
    model = _bank(dirs, ("a", "b"))
    hotswap_adapter(model, dirs["a"], "b")
    set_active_adapter(model, "b")
    assert torch.equal(logits(model, token_ids(batch=4)), _alone(dirs["a"]))


def test_hotswap_matches_peft_hotswap_adapter(dirs, tmp_path):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    new = _saved_bert(tmp_path / "new", 7, head=False)  # the layout of plain_a, other values
    peft_model = PeftModel.from_pretrained(tiny_bert(0), dirs["plain_a"]).eval()
    peft_hotswap(peft_model, str(new), adapter_name="default")
    model = _bank(dirs, ("plain_a",))
    hotswap_adapter(model, new, "plain_a")
    tokens = token_ids(batch=4)
    with torch.no_grad():
        expected = peft_model(**tokens).logits
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, _alone(dirs["plain_a"]))  # the swap changed outputs


@torch.no_grad()
def _saved_mlp(directory: Path, seed: int, **config) -> Path:
    model = mlp(0)
    inject_lora(model, LoRAConfig(**{"target_modules": ["0", "2"], "r": 4, "alpha": 8, **config}))
    randomize_adapters(model, seed=seed)
    return save_adapter(model, directory)


def test_a_compiled_model_does_not_recompile_after_a_hotswap(tmp_path):
    import torch._dynamo

    first, second = _saved_mlp(tmp_path / "1", 1), _saved_mlp(tmp_path / "2", 2)
    smaller = _saved_mlp(tmp_path / "3", 3, r=2)  # alpha/r doubles: exact into the r=4 slot
    expected = []
    for directory in (second, smaller):
        alone = mlp(0)
        load_adapter(alone, directory)
        expected.append(alone(mlp_inputs()))
    model = mlp(0)
    load_adapter(model, first, name="x")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(mlp_inputs())
        hotswap_adapter(compiled, second, "x")
        torch.testing.assert_close(compiled(mlp_inputs()), expected[0], rtol=0, atol=0)
        hotswap_adapter(compiled, smaller, "x")
        torch.testing.assert_close(compiled(mlp_inputs()), expected[1], rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_hotswap_of_a_larger_rank_is_refused_naming_both_shapes(dirs):
    model = _bank(dirs, ("a", "b"))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"shape \(8, 16\) in the file, installed \(4, 16\)"):
        hotswap_adapter(model, dirs["wide"], "a")
    with pytest.raises(AdapterFileError, match="missing .*classifier"):
        hotswap_adapter(model, dirs["plain_a"], "b")
    assert_unchanged(model, before)


def test_hotswap_of_a_scaling_ratio_that_is_not_a_power_of_two_is_refused(dirs):
    model = _bank(dirs, ("plain_a",))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="not a power of two"):
        hotswap_adapter(model, dirs["plain_b"], "plain_a")  # alpha 5 vs 8
    with pytest.raises(LoRAStateError, match="no adapter named 'q'"):
        hotswap_adapter(model, dirs["plain_b"], "q")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------- combine
def _peft(dirs, names):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_bert(0), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(dirs[name], adapter_name=name)
    return peft_model.eval()


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_combine_matches_peft_add_weighted_adapter(dirs, combination):
    weights = {"plain_a": 0.7, "plain_b": -0.4}
    peft_model = _peft(dirs, list(weights))
    peft_model.add_weighted_adapter(
        list(weights), list(weights.values()), "mix", combination_type=combination
    )
    peft_model.set_adapter("mix")
    model = _bank(dirs, list(weights))
    before = snapshot(model)
    combine_adapters(model, weights, "mix", combination=combination)
    assert_unchanged(model, before)  # the new adapter waits in the bank
    set_active_adapter(model, "mix")
    torch.testing.assert_close(
        logits(model, token_ids(batch=4)), logits(peft_model, token_ids(batch=4))
    )


def test_cat_is_the_exact_weighted_sum_of_the_deltas(dirs):
    model = _bank(dirs, ("plain_a", "c"))  # different targets and ranks
    combine_adapters(model, {"plain_a": 0.5, "c": 2.0}, "mix")
    expected = {}
    for name, weight in (("plain_a", 0.5), ("c", 2.0)):
        set_active_adapter(model, name)
        for layer, module in model.named_modules():
            if hasattr(module, "lora_A"):
                config = {"plain_a": (8 / 4), "c": (3 / 2)}[name]
                delta = module.lora_B.weight @ module.lora_A.weight * config * weight
                expected[layer] = expected.get(layer, 0) + delta
    set_active_adapter(model, "mix")
    found = {n: m.lora_B.weight @ m.lora_A.weight for n, m in model.named_modules() if hasattr(m, "lora_A")}  # fmt: skip
    assert found.keys() == expected.keys()
    for layer, delta in expected.items():
        torch.testing.assert_close(found[layer], delta, rtol=1e-5, atol=1e-6)


def test_combine_refuses_what_it_cannot_do_exactly_and_changes_nothing(dirs):
    model = _bank(dirs, ("a", "b", "c"))
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="modules_to_save"):
        combine_adapters(model, {"a": 1.0, "b": 1.0}, "mix")
    with pytest.raises(LoRAConfigError, match="'cat', 'linear'"):
        combine_adapters(model, {"c": 1.0}, "mix", combination="svd")
    with pytest.raises(LoRAConfigError, match="not finite"):
        combine_adapters(model, {"c": float("nan")}, "mix")
    with pytest.raises(LoRAStateError, match="no adapter named 'zz'"):
        combine_adapters(model, {"zz": 1.0}, "mix")
    assert_unchanged(model, before)
    assert list_adapters(model) == ["a", "b", "c"]


# --------------------------------------------------------------------------- mixed batch
def test_mixed_batch_matches_peft_adapter_names_and_restores_the_active_adapter(dirs):
    names = ["b", "__base__", "a", "b"]
    ids = token_ids(batch=4)
    peft_model = _peft(dirs, ["a", "b"])
    with torch.no_grad():
        expected = peft_model(**ids, adapter_names=names).logits
    model = _bank(dirs, ("a", "b", "c"))
    before = snapshot(model)
    with torch.no_grad():
        out = mixed_batch_forward(model, names, **ids)
    torch.testing.assert_close(out.logits, expected)
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert active_adapter(model) == "a"
    assert_unchanged(model, before)
    torch.testing.assert_close(out.logits[1], logits(tiny_bert(0), ids)[1])


def test_mixed_batch_with_a_reinjected_adapter_matches_each_alone(dirs):
    model = _bank(dirs, ("a", "c"))
    ids = token_ids(batch=4)
    with torch.no_grad():
        out = mixed_batch_forward(model, ["c", "a", "c", "a"], **ids)
    alone = {n: _alone(dirs[n]) for n in ("a", "c")}
    for row, name in enumerate(["c", "a", "c", "a"]):
        torch.testing.assert_close(out.logits[row], alone[name][row])
    assert active_adapter(model) == "a"


def test_mixed_batch_refuses_train_mode_and_batch_level_outputs_restoring_the_adapter(dirs):
    model = _bank(dirs, ("a", "b")).eval()  # eval() reaches the new LoRA children too
    before = snapshot(model)
    model.train()
    with pytest.raises(LoRAStateError, match="train mode"):
        mixed_batch_forward(model, ["a", "b"], **token_ids(batch=2))
    model.eval()
    labels = torch.tensor([0, 1])
    with torch.no_grad(), pytest.raises(LoRAStateError, match="without labels"):
        mixed_batch_forward(model, ["b", "a"], **token_ids(batch=2), labels=labels)
    assert active_adapter(model) == "a"
    assert_unchanged(model, before)


# ------------------------------------------------------------------------- evaluate CLI
def test_evaluate_cli_scores_several_adapters_on_one_base(tmp_path, capsys):
    from models import save_tiny_classifier
    from transformers import BertForSequenceClassification

    from lora_lightning.app.evaluate import evaluate, main

    base = save_tiny_classifier(tmp_path / "base")
    adapters = []
    for seed, head in ((1, True), (2, False)):
        model = BertForSequenceClassification.from_pretrained(base)
        extra = {"modules_to_save": ["classifier"]} if head else {}
        inject_lora(model, LoRAConfig(target_modules=["query", "value"], r=2, **extra))
        randomize_adapters(model, seed=seed, scale=1.0)
        adapters.append(save_adapter(model, tmp_path / f"adapter{seed}"))
    data = tmp_path / "split.tsv"
    data.write_text("label\tsentence\n1\ta great film\n0\ta dull mess\n1\tlovely\n0\tbad\n")
    common = ["--data", str(data), "--model", str(base), "--accelerator", "cpu"]
    main([*map(str, adapters), *common, "--json", str(tmp_path / "rows.json")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert (
        [r["adapter"] for r in rows]
        == [str(a) for a in adapters]
        == [r["adapter"] for r in printed]
    )
    for row, adapter in zip(rows, adapters, strict=True):
        alone = evaluate(adapter, data, model_name_or_path=str(base), accelerator="cpu")
        assert {k: row[k] for k in alone} == alone
