"""Instruction rows to tokens and a loss mask, in small steps that can be tested apart.

    JSONL row --read_rows--> Example(messages, family) --encode--> Encoded(input_ids, labels)
                                                       --encode_prompt--> prompt ids + target
    Encoded rows --pack--> packed rows (one row, several examples) --collate--> batch tensors

- **Rows** come in the two forms users have: alpaca (`instruction`, optional `input`,
  `output`) and chat (`messages: [{role, content}, ...]`, the last one the assistant's). Both
  become a list of messages; a malformed row is one :class:`DataError` naming file and line.
- **Rendering** uses the tokenizer's chat template (or one given explicitly). Every assistant
  message is trained on; everything else (system, user, the template's role headers) is
  masked with `IGNORE_INDEX`. Each segment is tokenized on its own, exactly as generation sees
  it: the prompt up to the assistant header, then the answer, so train and test tokenize alike.
- **Truncation** never cuts an answer: `error` (the default) refuses an example longer than
  `max_length`, `drop` skips it (the datamodule counts and logs how many), `truncate_prompt`
  removes the oldest prompt tokens and refuses an example whose answers alone are too long.
- **Packing** puts several examples into one row; `position_ids` restart at 0 for each example,
  which is how Hugging Face models know where attention must stop (their masks separate
  sequences at position resets when no 2-D attention mask is passed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100
TRUNCATION = ("error", "drop", "truncate_prompt")
Truncation = Literal["error", "drop", "truncate_prompt"]
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or row the causal-LM task cannot use; names the file, line and the fix."""


@dataclass(frozen=True)
class Example:
    """One conversation: messages (`role`, `content`), the last of them the assistant's answer.

    `family` groups examples for per-family metrics (the task set's families); `source` is
    `file:line`, for error messages.
    """

    messages: tuple[dict[str, str], ...]
    family: str = "all"
    source: str = "?"

    @property
    def answer(self) -> str:
        """The final assistant message: what generation is scored against."""
        return self.messages[-1]["content"]


@dataclass
class Encoded:
    """Token ids and labels of one example (labels are `IGNORE_INDEX` where not trained on)."""

    input_ids: list[int]
    labels: list[int]
    family: str = "all"
    position_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def parse_row(row: Any, source: str) -> Example:
    """Turn one decoded JSON row (alpaca or chat form) into an :class:`Example`.

    Raises:
        DataError: the row is neither form, a field has the wrong type, a role is unknown, or
            the last message is not the assistant's; the message names `source`.
    """
    if not isinstance(row, dict):
        raise DataError(f"{source}: a row must be a JSON object, not {type(row).__name__}")
    family = row.get("family", "all")
    if not isinstance(family, str):
        raise DataError(f"{source}: 'family' must be a string, not {family!r}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}: 'messages' must be a non-empty list of {{role, content}}")
        parsed = []
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{source}: messages[{i}] must be an object with string 'role' and 'content'"
                )
            if message["role"] not in _ROLES:
                raise DataError(
                    f"{source}: messages[{i}] has role {message['role']!r}; valid roles: "
                    f"{', '.join(_ROLES)}"
                )
            parsed.append({"role": message["role"], "content": message["content"]})
        if parsed[-1]["role"] != "assistant":
            raise DataError(
                f"{source}: the last message must be the assistant's answer, not "
                f"{parsed[-1]['role']!r}"
            )
        return Example(tuple(parsed), family, source)
    if "instruction" in row or "output" in row:
        instruction, extra, output = row.get("instruction"), row.get("input", ""), row.get("output")
        for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if not isinstance(value, str):
                raise DataError(
                    f"{source}: alpaca rows need string 'instruction' and 'output' (and an "
                    f"optional string 'input'); {name!r} is {value!r}"
                )
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": output})
        return Example(messages, family, source)
    raise DataError(
        f"{source}: a row needs 'messages' (chat form) or 'instruction' and 'output' (alpaca "
        f"form); it has keys {sorted(row)}"
    )


def read_rows(path: str | Path) -> list[Example]:
    """Read a JSONL file of alpaca or chat rows (the forms may be mixed); blank lines skipped.

    Raises:
        FileNotFoundError: `path` does not exist.
        DataError: a line is not valid JSON or not a valid row (file and line named), or the
            file holds no rows.
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{source}: not valid JSON ({error.msg})") from None
            examples.append(parse_row(row, source))
    if not examples:
        raise DataError(f"{path}: holds no rows")
    return examples


def render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template's text for `messages` (the tokenizer's `chat_template` is used)."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def check_chat_template(tokenizer: Any, what: str) -> None:
    """Refuse a tokenizer without a chat template, naming the fix.

    Raises:
        DataError: the tokenizer has no `chat_template`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{what}: the tokenizer has no chat template, so rows cannot be rendered; pass "
            "chat_template=<a Jinja template string> (for example ChatML's) or use a tokenizer "
            "that has one"
        )


def segments(tokenizer: Any, example: Example) -> list[tuple[str, bool]]:
    """Split the rendered conversation into `(text, trained)` pieces, in order.

    Each assistant answer (with the template's end-of-turn text) is a trained piece; the text
    before it (earlier turns, the role header) is not. The template must render incrementally:
    the text of the first k messages is a prefix of the text of the first k+1.

    Raises:
        DataError: the template does not render incrementally (the example's source named).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, example.messages[:i], generation_prompt=True)
        full = render(tokenizer, example.messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"{example.source}: the chat template does not render turn by turn (the text "
                "of the first k messages is not a prefix of the text of the first k+1), so the "
                "answer tokens cannot be told apart from the prompt; use a template that does"
            )
        if len(prompt) > len(done):
            pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return pieces


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(
    tokenizer: Any, example: Example, max_length: int, truncation: Truncation = "error"
) -> Encoded | None:
    """Tokenize `example` for training: ids of the whole conversation, labels on answers only.

    Returns None when `truncation="drop"` and the example is longer than `max_length`.

    Raises:
        DataError: the example is too long under `truncation="error"`, or its answers alone are
            too long under `truncation="truncate_prompt"` (an answer is never cut).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(tokenizer, example):
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    excess = len(input_ids) - max_length
    if excess > 0:
        if truncation == "drop":
            return None
        if truncation == "error":
            raise DataError(
                f"{example.source}: {len(input_ids)} tokens, more than max_length={max_length}; "
                "raise max_length, or set truncation=drop (skip such rows) or "
                "truncation=truncate_prompt (cut the oldest prompt tokens, never the answer)"
            )
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        if excess > first_trained:
            raise DataError(
                f"{example.source}: the answer alone needs {len(input_ids) - first_trained} "
                f"tokens, more than max_length={max_length}; truncation=truncate_prompt never "
                "cuts an answer: raise max_length or drop the row"
            )
        input_ids, labels = input_ids[excess:], labels[excess:]
    return Encoded(input_ids, labels, example.family)


def encode_prompt(tokenizer: Any, example: Example, max_length: int) -> list[int]:
    """Token ids of everything before the final answer, ending with the assistant header.

    The prompt's oldest tokens are cut to fit `max_length` (generation still needs room).
    """
    prompt = render(tokenizer, example.messages[:-1], generation_prompt=True)
    return _ids(tokenizer, prompt)[-max_length:]


def pack(encoded: Iterable[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate examples, in order, into rows of at most `max_length` tokens.

    Each packed row carries `position_ids` that restart at 0 for every example in it. An
    example never spans two rows (each is at most `max_length` long after `encode`).
    """
    rows: list[Encoded] = []
    current = Encoded([], [], "packed", [])
    for item in encoded:
        if current.input_ids and len(current) + len(item) > max_length:
            rows.append(current)
            current = Encoded([], [], "packed", [])
        current.input_ids += item.input_ids
        current.labels += item.labels
        current.position_ids += list(range(len(item)))
    if current.input_ids:
        rows.append(current)
    return rows


def collate(
    rows: Sequence[Encoded], pad_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, Tensor]:
    """Pad `rows` into a batch: `input_ids`, `labels`, `position_ids` `(batch, longest)`.

    Unpacked rows also get `attention_mask` (0 on padding), and positions that count real
    tokens only, so a left-padded row sees the same positions as a right-padded one. Packed
    rows (with `position_ids`) get no attention mask: their padding tail is a separate
    sequence (positions restart at 0 there) whose labels are all ignored.
    """
    longest = max(len(row) for row in rows)
    packed = bool(rows[0].position_ids)
    ids, labels, positions, masks = [], [], [], []
    for row in rows:
        gap = longest - len(row)
        if packed:
            ids.append(row.input_ids + [pad_id] * gap)
            labels.append(row.labels + [IGNORE_INDEX] * gap)
            positions.append(row.position_ids + list(range(gap)))
            continue
        real = list(range(len(row)))
        if padding_side == "left":
            ids.append([pad_id] * gap + row.input_ids)
            labels.append([IGNORE_INDEX] * gap + row.labels)
            positions.append([0] * gap + real)
            masks.append([0] * gap + [1] * len(row))
        else:
            ids.append(row.input_ids + [pad_id] * gap)
            labels.append(row.labels + [IGNORE_INDEX] * gap)
            positions.append(real + [0] * gap)
            masks.append([1] * len(row) + [0] * gap)
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }
    if not packed:
        batch["attention_mask"] = torch.tensor(masks, dtype=torch.long)
    return batch
