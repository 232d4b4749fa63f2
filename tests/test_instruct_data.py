"""Instruction rows to tokens: parsing, rendering, answer-only labels, truncation, packing,
and the project's task set (deterministic, held out)."""

from __future__ import annotations

import json

import pytest
from llm_models import CHATML, char_tokenizer

from lora_lightning.tasks import DataError, InstructDataModule, instruct_path
from lora_lightning.tasks.chat import (
    IGNORE_INDEX,
    Encoded,
    Example,
    collate,
    encode,
    encode_prompt,
    pack,
    parse_row,
    read_rows,
)
from lora_lightning.tasks.instruct_set import DEFAULT_SEED, FAMILIES, SPLIT_SIZES, generate


def chat(user: str, answer: str, family: str = "all") -> Example:
    return Example(
        ({"role": "user", "content": user}, {"role": "assistant", "content": answer}), family
    )


def trained_text(tokenizer, encoded: Encoded) -> str:
    ids = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    return tokenizer.decode(ids)


# --- rows ---------------------------------------------------------------------------------


def test_an_alpaca_row_becomes_a_user_and_an_assistant_message():
    example = parse_row({"instruction": "Add", "input": "1 2", "output": "3"}, "f:1")
    assert example.messages == (
        {"role": "user", "content": "Add\n\n1 2"},
        {"role": "assistant", "content": "3"},
    )
    assert example.answer == "3"


def test_a_chat_row_keeps_its_messages_and_family():
    row = {
        "family": "math",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"},
        ],
    }
    example = parse_row(row, "f:1")
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert example.family == "math"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"text": "x"}', "needs 'messages'"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
        ('{"instruction": "x", "output": 3}', "'output' is 3"),
    ],
)
def test_a_malformed_row_is_one_error_naming_the_file_and_line(tmp_path, line, expected):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError, match=expected) as caught:
        read_rows(path)
    assert f"{path}:3" in str(caught.value)


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(path)


# --- rendering and labels -----------------------------------------------------------------


def test_labels_cover_the_answer_and_its_end_of_turn_only():
    tokenizer = char_tokenizer()
    encoded = encode(tokenizer, chat("What is 2+2?", "4"), max_length=200)
    assert trained_text(tokenizer, encoded) == "4<|im_end|>\n"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        tokenize=False,
    )
    assert tokenizer.decode(encoded.input_ids) == full


def test_every_assistant_turn_of_a_conversation_is_trained_on():
    tokenizer = char_tokenizer()
    messages = (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    )
    encoded = encode(tokenizer, Example(messages), max_length=200)
    assert trained_text(tokenizer, encoded) == "first<|im_end|>\nsecond<|im_end|>\n"


def test_the_test_prompt_is_the_training_prefix_up_to_the_answer():
    tokenizer = char_tokenizer()
    example = chat("Reverse: a b", "b a")
    prompt = encode_prompt(tokenizer, example, max_length=200)
    encoded = encode(tokenizer, example, max_length=200)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.labels[len(prompt)] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt)])


def test_a_tokenizer_without_a_chat_template_is_refused_unless_one_is_given(tmp_path):
    with pytest.raises(DataError, match="no chat template"):
        InstructDataModule(tokenizer=char_tokenizer(chat_template=None))
    module = InstructDataModule(tokenizer=char_tokenizer(chat_template=None), chat_template=CHATML)
    assert module.tokenizer.chat_template == CHATML


def test_a_template_that_does_not_render_turn_by_turn_is_refused():
    tokenizer = char_tokenizer(
        chat_template="{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError, match="turn by turn"):
        encode(tokenizer, chat("q", "a"), max_length=100)


# --- truncation ---------------------------------------------------------------------------


def test_truncation_error_refuses_a_long_example_naming_it():
    example = Example(chat("x" * 50, "ok").messages, source="data.jsonl:7")
    with pytest.raises(DataError, match=r"data.jsonl:7: \d+ tokens, more than max_length=40"):
        encode(char_tokenizer(), example, max_length=40, truncation="error")


def test_truncation_drop_skips_a_long_example():
    assert encode(char_tokenizer(), chat("x" * 50, "ok"), 40, truncation="drop") is None


def test_truncate_prompt_cuts_the_oldest_prompt_tokens_and_keeps_the_answer_whole():
    tokenizer = char_tokenizer()
    encoded = encode(tokenizer, chat("x" * 50, "the answer"), 40, truncation="truncate_prompt")
    assert len(encoded) == 40
    assert trained_text(tokenizer, encoded) == "the answer<|im_end|>\n"


def test_truncate_prompt_refuses_an_answer_longer_than_max_length():
    with pytest.raises(DataError, match="never cuts an answer"):
        encode(char_tokenizer(), chat("q", "y" * 60), 40, truncation="truncate_prompt")


def test_the_datamodule_logs_and_drops_rows_too_long_under_drop(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "x" * 80, "output": "a"}, {"instruction": "hi", "output": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = InstructDataModule(
        tokenizer=char_tokenizer(),
        train_file=path,
        val_file=path,
        test_file=path,
        max_length=60,
        truncation="drop",
    )
    with caplog.at_level("WARNING"):
        module.setup("fit")
    assert len(module.datasets["train"]) == 1
    assert "1 of 2 rows" in caplog.text


# --- packing and padding ------------------------------------------------------------------


def test_packing_restarts_positions_per_example_and_never_splits_one():
    items = [Encoded([1] * 5, [1] * 5), Encoded([2] * 4, [2] * 4), Encoded([3] * 6, [3] * 6)]
    rows = pack(items, max_length=10)
    assert [r.input_ids for r in rows] == [[1] * 5 + [2] * 4, [3] * 6]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_collate_pads_left_or_right_with_positions_counting_real_tokens():
    rows = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8], [8])]
    right = collate(rows, pad_id=0, padding_side="right")
    left = collate(rows, pad_id=0, padding_side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist()[1] == [IGNORE_INDEX, IGNORE_INDEX, 8]
    assert left["position_ids"].tolist()[1][-1] == 0
    assert right["attention_mask"].tolist()[1] == [1, 0, 0]


def test_packed_batches_have_no_attention_mask_and_a_separate_padding_tail():
    rows = pack([Encoded([1, 2, 3], [1, 2, 3]), Encoded([4], [4])], max_length=3)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["labels"].tolist()[1] == [4, IGNORE_INDEX, IGNORE_INDEX]


def test_the_datamodule_gives_test_batches_of_left_padded_prompts_with_answers(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {
            "family": "f1",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        },
        {"family": "f2", "instruction": "longer question", "output": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = InstructDataModule(
        tokenizer=char_tokenizer(), train_file=path, val_file=path, test_file=path
    )
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    assert batch["answers"] == ["a", "b"]
    assert batch["families"] == ["f1", "f2"]
    assert batch["questions"] == ["q", "longer question"]
    assert batch["index"].tolist() == [0, 1]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()


def test_limits_take_a_seeded_subset(tmp_path):
    module = InstructDataModule(
        tokenizer=char_tokenizer(), max_length=400, train_limit=5, val_limit=3, test_limit=4, seed=1
    )
    module.setup("fit")
    again = InstructDataModule(
        tokenizer=char_tokenizer(), max_length=400, train_limit=5, val_limit=3, test_limit=4, seed=1
    )
    again.setup("fit")
    assert [len(module.datasets[s]) for s in ("train", "val", "test")] == [5, 3, 4]
    assert module.examples["train"] == again.examples["train"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_length": 0}, "max_length"),
        ({"train_limit": 0}, "train_limit"),
        ({"truncation": "cut"}, "truncation must be one of"),
        ({"padding_side": "middle"}, "padding_side"),
    ],
)
def test_bad_datamodule_arguments_are_refused_by_name(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        InstructDataModule(tokenizer=char_tokenizer(), **kwargs)


# --- the task set -------------------------------------------------------------------------


def test_the_task_set_is_the_same_for_the_same_seed_and_differs_for_another():
    assert generate(7) == generate(7)
    assert generate(7) != generate(8)


def test_the_committed_task_set_is_what_the_generator_writes():
    for split, rows in generate(DEFAULT_SEED).items():
        committed = [json.loads(line) for line in instruct_path(split).read_text().splitlines()]
        assert committed == rows, (
            f"{split}: regenerate with python -m lora_lightning.tasks.instruct_set"
        )


def test_the_test_split_is_held_out_from_everything_tuned_on():
    splits = generate(DEFAULT_SEED)

    def instructions(rows):
        return {r["messages"][0]["content"] for r in rows}

    tuned = instructions(splits["train"]) | instructions(splits["val"])
    assert not instructions(splits["test"]) & tuned
    assert len(instructions(splits["train"])) == len(splits["train"])


def test_every_family_has_its_share_of_every_split():
    for split, rows in generate(DEFAULT_SEED).items():
        counts = {family: 0 for family in FAMILIES}
        for row in rows:
            counts[row["family"]] += 1
        assert set(counts.values()) == {SPLIT_SIZES[split]}


def test_task_set_answers_are_right():
    rows = generate(3)["train"]
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        if row["family"] == "arithmetic":
            a, op, b = question.removeprefix("What is ").split("?")[0].split()
            expected = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}
            assert int(answer) == expected[op]
        elif row["family"] == "sort_words":
            words = question.split(": ")[1].split(".")[0].split()
            assert answer.split() == sorted(words)
        elif row["family"] == "json_object":
            assert set(json.loads(answer)) == {"name", "age"}


def test_eval_subsets_do_not_depend_on_the_training_seed():
    """Runs with different training seeds are scored on the same val and test rows."""

    def module(seed, eval_seed=0):
        built = InstructDataModule(
            tokenizer=char_tokenizer(), max_length=400, train_limit=5, val_limit=3, test_limit=4,
            seed=seed, eval_seed=eval_seed,
        )  # fmt: skip
        built.setup("fit")
        return built

    one, two, other_eval = module(seed=1), module(seed=2), module(seed=1, eval_seed=5)
    assert one.examples["train"] != two.examples["train"]
    assert one.examples["val"] == two.examples["val"]
    assert one.examples["test"] == two.examples["test"]
    assert one.examples["val"] != other_eval.examples["val"]
    assert one.examples["test"] != other_eval.examples["test"]
