"""CausalLMTask on tiny Llama/Qwen decoders: the answer-only loss is the model's own loss,
padding side and packing do not change it, chunking bounds the logits, gradient checkpointing
works on a frozen base, generation is batched greedy decoding, and a fit logs base and tuned
exact match."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from llm_models import char_tokenizer, tiny_causal_lm

from lora_lightning import LoRACallback, LoRAConfig, LoRAConfigError, inject_lora
from lora_lightning.tasks import CausalLMTask, CausalLMTaskError, InstructDataModule
from lora_lightning.tasks.causal_lm import answer_positions, check_logits_path, check_packing
from lora_lightning.tasks.chat import Example, collate, encode, encode_prompt, pack
from lora_lightning.tasks.generation import (
    Scored,
    decode_answers,
    exact_match,
    greedy_generate,
    left_pad,
)

KINDS = ["llama", "qwen"]


def examples() -> list[Example]:
    pairs = [("add 2 3", "5"), ("reverse ab", "ba"), ("upper xyz", "XYZ"), ("say hi", "hi!")]
    return [
        Example(({"role": "user", "content": q}, {"role": "assistant", "content": a}), "f")
        for q, a in pairs
    ]


def task(kind: str = "llama", **kwargs) -> CausalLMTask:
    return CausalLMTask(model=lambda: tiny_causal_lm(kind), tokenizer=char_tokenizer(), **kwargs)


def encoded(tokenizer=None):
    tokenizer = tokenizer or char_tokenizer()
    return [encode(tokenizer, e, max_length=200) for e in examples()]


# --- the loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_answer_only_loss_equals_the_models_own_loss_on_the_same_labels(kind):
    module = task(kind).eval()
    batch = collate(encoded(), pad_id=0, padding_side="right")
    ours = module.answer_loss(batch)[0]
    theirs = module.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_left_and_right_padding_give_the_same_loss(kind):
    module = task(kind).eval()
    rows = encoded()
    right = module.answer_loss(collate(rows, 0, "right"))[0]
    left = module.answer_loss(collate(rows, 0, "left"))[0]
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_packed_row_has_the_loss_of_its_examples_apart(kind):
    module = task(kind).eval()
    rows = encoded()
    packed = module.answer_loss(collate(pack(rows, max_length=1000), 0))
    apart = module.answer_loss(collate(rows, 0, "right"))
    assert len(pack(rows, max_length=1000)) == 1
    torch.testing.assert_close(packed[0], apart[0], rtol=1e-5, atol=1e-6)
    assert packed[1] == apart[1]


def test_packing_without_position_resets_would_change_the_loss():
    # The check above can fail: concatenating without restarting positions (examples
    # attending to each other) gives another loss.
    module = task().eval()
    rows = encoded()
    row = pack(rows, max_length=1000)[0]
    row.position_ids = list(range(len(row)))
    joined = module.answer_loss(collate([row], 0))[0]
    apart = module.answer_loss(collate(rows, 0, "right"))[0]
    assert not torch.allclose(joined, apart, rtol=1e-4)


def test_chunked_loss_matches_and_never_holds_more_than_a_chunk_of_logits():
    full, chunked = task(loss_chunk_size=None), task(loss_chunk_size=7)
    batch = collate(encoded(), 0, "right")
    seen: list[int] = []
    chunked.model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: seen.append(out.shape[0])
    )
    loss_full, loss_chunked = full.answer_loss(batch)[0], chunked.answer_loss(batch)[0]
    loss_full.backward()
    loss_chunked.backward()
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(full.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert max(seen) <= 7 < answer_tokens  # forward and the recomputation in backward


def test_logits_are_computed_for_answer_positions_only():
    module = task()
    batch = collate(encoded(), 0, "right")
    rows: list[tuple[int, ...]] = []
    module.model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: rows.append(tuple(out.shape[:-1]))
    )
    module.answer_loss(batch)
    # The model's own forward (which yields the hidden states) projects its last position
    # only (logits_to_keep=1); then the answer positions, never all (batch x length).
    answers = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [(batch["input_ids"].shape[0], 1), (answers,)]


def test_a_peft_wrapped_model_also_projects_only_its_last_position_in_the_forward():
    # PEFT's wrapper takes logits_to_keep through **kwargs: asked of the wrapper, the task
    # would project every position (the PEFT baseline of the experiments paid for it).
    from peft import LoraConfig, get_peft_model

    module = task()
    module.model = get_peft_model(module.model, LoraConfig(r=2, target_modules=["q_proj"]))
    batch = collate(encoded(), 0, "right")
    rows: list[tuple[int, ...]] = []
    module.model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: rows.append(tuple(out.shape[:-1]))
    )
    module.answer_loss(batch)
    answers = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [(batch["input_ids"].shape[0], 1), (answers,)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_answer_positions_are_where_the_next_token_is_an_answer_token(padding_side):
    batch = collate(encoded(), 0, padding_side)
    labels = batch["labels"]
    positions = answer_positions(labels)
    width = labels.shape[1]
    assert torch.all(positions % width != width - 1)  # never a row's last position
    wanted = labels.flatten()[positions + 1]
    torch.testing.assert_close(wanted, labels[:, 1:][labels[:, 1:] != -100], rtol=0, atol=0)


def test_a_compiled_answer_loss_keeps_the_decoder_and_the_loss_in_one_graph():
    """The answer positions depend on the data: found inside the compiled region (boolean
    indexing, a tensor in an `if`) they broke the graph three times between the decoder and
    the loss, and the compiled task-loss step of SmolLM2 ran slower than PEFT's compiled step
    computing all the logits (experiments/bench/README.md). Found eagerly first, they are one
    break before anything is traced."""
    import torch._dynamo

    module = task()
    inject_lora(module.model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batch = collate(encoded(), 0, "right")
    eager = module.answer_loss(batch)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda b: module.answer_loss(b)[0])(batch)
        compiled = torch.compile(lambda b: module.answer_loss(b), backend="eager")(batch)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count <= 1, [str(b.reason)[:80] for b in explained.break_reasons]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1] == eager[1] > 0


def test_gradient_checkpointing_gives_the_same_adapter_gradients_on_a_frozen_base():
    config = LoRAConfig(r=4, alpha=8, dropout=0.2, seed=0, target_modules=[".*proj"])
    grads = []
    for checkpointing in (False, True):
        module = task(gradient_checkpointing=checkpointing)
        inject_lora(module.model, config)
        for name, parameter in module.named_parameters():
            parameter.requires_grad_("lora_" in name)
        torch.manual_seed(3)
        module.answer_loss(collate(encoded(), 0, "right"))[0].backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7)


# --- refusals -----------------------------------------------------------------------------


def test_a_model_whose_logits_are_not_lm_head_of_the_hidden_state_is_refused():
    model = tiny_causal_lm()
    original = model.forward

    def soft_capped(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = soft_capped
    check_logits_path(tiny_causal_lm())
    with pytest.raises(CausalLMTaskError, match="not lm_head"):
        check_logits_path(model)


def test_packing_is_refused_for_a_model_that_ignores_position_resets():
    model = tiny_causal_lm()
    original = model.forward

    def no_positions(*args, position_ids=None, **kwargs):
        return original(*args, **kwargs)

    check_packing(tiny_causal_lm())
    model.forward = no_positions
    with pytest.raises(CausalLMTaskError, match="does not separate packed sequences"):
        check_packing(model)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"warmup_ratio": 2.0}, "warmup_ratio"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"dtype": "float64"}, "dtype must be one of"),
    ],
)
def test_bad_task_arguments_are_refused_by_name(kwargs, expected):
    with pytest.raises(CausalLMTaskError, match=expected):
        task(**kwargs)


def test_a_model_callable_needs_a_tokenizer():
    with pytest.raises(CausalLMTaskError, match="needs tokenizer"):
        CausalLMTask(model=lambda: tiny_causal_lm())


# --- generation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batched_left_padded_greedy_generation_equals_one_prompt_at_a_time(kind):
    tokenizer, model = char_tokenizer(), tiny_causal_lm(kind).eval()
    prompts = [encode_prompt(tokenizer, e, 200) for e in examples()]
    batch = left_pad(prompts, tokenizer.pad_token_id)
    together = greedy_generate(model, **batch, max_new_tokens=6, pad_id=0, eos_ids=[2])
    for i, prompt in enumerate(prompts):
        alone = greedy_generate(
            model, **left_pad([prompt], 0), max_new_tokens=6, pad_id=0, eos_ids=[2]
        )
        stop = next((j for j, t in enumerate(alone[0].tolist()) if t == 2), 6)
        assert together[i, :stop].tolist() == alone[0, :stop].tolist()


def test_generation_restores_the_models_training_mode():
    model = tiny_causal_lm().train()
    greedy_generate(model, **left_pad([[5, 6]], 0), max_new_tokens=2, pad_id=0, eos_ids=[2])
    assert model.training


def test_decoded_answers_stop_at_the_first_end_token():
    tokenizer = char_tokenizer()
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    new = torch.tensor([ids + [2] + ids, ids + ids + [0]])
    assert decode_answers(tokenizer, new, eos_ids=[2, 0]) == ["ab", "abab"]


def test_exact_match_is_per_family_and_counts_each_example_once():
    scored = [
        Scored(0, "a", "", " 5 ", "5"),
        Scored(1, "a", "", "4", "5"),
        Scored(2, "b", "", "x", "x"),
        Scored(2, "b", "", "x", "x"),  # a repeated index (a padded shard) counts once
    ]
    assert exact_match(scored, "test/") == {
        "test/exact_match": 2 / 3,
        "test/exact_match/a": 0.5,
        "test/exact_match/b": 1.0,
    }


# --- through Lightning --------------------------------------------------------------------


def _files(tmp_path):
    rows = [
        {"family": "copy" if i % 2 else "upper", "instruction": f"w{i}", "output": f"W{i}"}
        for i in range(12)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train_file": path, "val_file": path, "test_file": path}


def _fit(tmp_path, max_steps, ckpt_path=None, packing=False):
    module = task(lr=1e-2, max_new_tokens=4, num_samples=2)
    data = InstructDataModule(
        tokenizer=char_tokenizer(),
        batch_size=4,
        eval_batch_size=4,
        packing=packing,
        **_files(tmp_path),
    )
    lora = LoRACallback(
        LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=[".*q_proj", ".*v_proj"])
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[lora],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    fitted = dict(trainer.callback_metrics)
    trainer.test(module, datamodule=data, verbose=False)
    return trainer, module, {**fitted, **trainer.callback_metrics}


def test_a_fit_logs_base_and_tuned_exact_match_per_family_and_val_perplexity(tmp_path):
    _, _, metrics = _fit(tmp_path, max_steps=2)
    for prefix in ("base/test/", "test/"):
        for key in ("exact_match", "exact_match/copy", "exact_match/upper"):
            assert prefix + key in metrics
    torch.testing.assert_close(metrics["val/perplexity"], torch.exp(metrics["val/loss"]))


def test_the_base_evaluation_travels_in_checkpoints_and_is_not_redone_on_resume(
    tmp_path, monkeypatch
):
    trainer, module, first = _fit(tmp_path, max_steps=1)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["causal_lm_base_eval"]
    assert saved == module.base_metrics and "base/test/exact_match" in saved

    def evaluated_again(self):
        raise AssertionError("the base was evaluated again on resume")

    monkeypatch.setattr(CausalLMTask, "_evaluate_base", evaluated_again)
    _, _, metrics = _fit(tmp_path, max_steps=2, ckpt_path=path)
    assert float(metrics["base/test/exact_match"]) == pytest.approx(saved["base/test/exact_match"])


def test_a_packed_fit_checks_the_model_and_trains(tmp_path):
    trainer, module, _ = _fit(tmp_path, max_steps=2, packing=True)
    assert trainer.global_step == 2
    assert module._checked


def test_a_tied_lm_head_in_modules_to_save_is_refused_at_setup_and_the_model_is_unchanged(
    tmp_path,
):
    """PEFT would train a copy of lm_head and leave embed_tokens as it was; here the shared
    tensor changes both, so the exported files could not be PEFT's. Refused before training,
    not at the first checkpoint."""
    module = task()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lora = LoRACallback(LoRAConfig(r=2, target_modules=[".*q_proj"], modules_to_save=["lm_head"]))
    data = InstructDataModule(tokenizer=char_tokenizer(), batch_size=4, **_files(tmp_path))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, callbacks=[lora], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(LoRAConfigError) as raised:
        trainer.fit(module, datamodule=data)
    message = str(raised.value)
    assert message.startswith("LoRACallback.setup: PEFT would compute something else")
    assert "'model.lm_head' shares its weights with ['model.model.embed_tokens.weight']" in message
    assert trainer.global_step == 0 and module.base_metrics is None  # not even the base eval
    model = module.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.lm_head.weight.requires_grad  # nothing frozen
    assert not any("lora" in k for k in module.state_dict())
    after = module.state_dict()
    assert after.keys() == before.keys() and all(after[k].equal(v) for k, v in before.items())
