"""The project's own instruction set: instructions whose answers can be checked exactly.

No instruction data set ships its data on the package index, so the causal-LM task brings its
own, generated here from a seed into `lora_lightning/tasks/data/instruct/{train,val,test}.jsonl`
(committed; regenerate with `python -m lora_lightning.tasks.instruct_set`). Five families, each
with one exact answer, so a generated answer is right or wrong with no judge:

==================  =====================================================  ==================
family              instruction (example)                                  answer
==================  =====================================================  ==================
arithmetic          What is 347 plus 58? Answer with the number only.     405
reverse_words       Reverse the order of these words: sun map oak          oak map sun
sort_words          Sort these words alphabetically: pear fig apple        apple fig pear
uppercase           Write this in capital letters: blue river              BLUE RIVER
json_object         Write a JSON object with "name" set to "Ada" and ...   {"name": "Ada", ...}
==================  =====================================================  ==================

Every instruction text is unique across the three splits, so the test split is held out from
everything the job tunes on (training and validation). Rows are chat rows
(`{"family": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`), the form
`InstructDataModule` reads with the tokenizer's chat template.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Rows per family in each split.
SPLIT_SIZES = {"train": 400, "val": 20, "test": 40}
FAMILIES = ("arithmetic", "reverse_words", "sort_words", "uppercase", "json_object")
DEFAULT_SEED = 1234
DATA_DIR = Path(__file__).resolve().parent / "data" / "instruct"

_WORDS = (
    "apple bread cloud dream eagle field grape house island jacket kettle lemon mountain needle "
    "ocean pencil queen river stone table umbrella valley window yellow zebra anchor basket candle "
    "desert engine forest garden harbor insect jungle kitten ladder marble nickel orange pepper "
    "rabbit saddle tiger violin wagon walnut butter copper dragon falcon ginger hammer iron "
    "jelly koala lizard mirror nectar olive parrot quartz rocket silver tomato velvet whale "
    "bamboo cactus dolphin ember feather glacier horizon igloo jasmine kayak lantern meadow "
    "nutmeg orchid pebble quiver ribbon salmon thunder vapor willow yogurt acorn beacon cobalt "
    "daisy ferry gravel hazel ivory juniper lotus maple"
).split()
_NAMES = (
    "Ada Alan Grace Linus Marie Nikola Rosa Tim Emmy Kurt Lise Niels Hedy Carl Ivy Omar Priya "
    "Sofia Wei Yuki Zara Hugo Lena Mateo Nora Oscar Ravi Sara Tariq Uma"
).split()


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    operation = rng.choice(("plus", "minus", "times"))
    if operation == "times":
        a, b = rng.randint(11, 99), rng.randint(2, 9)
        answer = a * b
    else:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        answer = a + b if operation == "plus" else a - b
    return f"What is {a} {operation} {b}? Answer with the number only.", str(answer)


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(_WORDS, rng.randint(3, 5))


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = _word_list(rng)
    instruction = (
        f"Reverse the order of these words: {' '.join(words)}. "
        "Answer with the words only, separated by spaces."
    )
    return instruction, " ".join(reversed(words))


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = _word_list(rng)
    instruction = (
        f"Sort these words alphabetically: {' '.join(words)}. "
        "Answer with the words only, separated by spaces."
    )
    return instruction, " ".join(sorted(words))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 3))
    phrase = " ".join(words)
    return f"Write this in capital letters: {phrase}", phrase.upper()


def _json_object(rng: random.Random) -> tuple[str, str]:
    name, age = rng.choice(_NAMES), rng.randint(18, 90)
    instruction = (
        f'Write a JSON object with "name" set to "{name}" and "age" set to {age}. '
        "Answer with the JSON only, on one line."
    )
    return instruction, json.dumps({"name": name, "age": age})


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse_words": _reverse_words,
    "sort_words": _sort_words,
    "uppercase": _uppercase,
    "json_object": _json_object,
}


def generate(seed: int = DEFAULT_SEED) -> dict[str, list[dict[str, Any]]]:
    """Generate the three splits from `seed`: the same seed always gives the same rows.

    Returns:
        `{"train": rows, "val": rows, "test": rows}`; each row is a chat row with a `family`.
        No instruction text occurs twice in or across the splits.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    per_family: dict[str, list[tuple[str, str]]] = {}
    wanted = sum(SPLIT_SIZES.values())
    for family in FAMILIES:
        made: list[tuple[str, str]] = []
        while len(made) < wanted:
            instruction, answer = _MAKERS[family](rng)
            if instruction not in seen:
                seen.add(instruction)
                made.append((instruction, answer))
        per_family[family] = made
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLIT_SIZES}
    for family, made in per_family.items():
        start = 0
        for split, size in SPLIT_SIZES.items():
            for instruction, answer in made[start : start + size]:
                splits[split].append(
                    {
                        "family": family,
                        "messages": [
                            {"role": "user", "content": instruction},
                            {"role": "assistant", "content": answer},
                        ],
                    }
                )
            start += size
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write(directory: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write `generate(seed)` as `train.jsonl`, `val.jsonl`, `test.jsonl` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed).items():
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        paths[split] = path
    return paths


def instruct_path(split: str) -> Path:
    """The vendored split file (`train`, `val` or `test`)."""
    if split not in SPLIT_SIZES:
        raise ValueError(
            f"instruct_path: split must be one of {sorted(SPLIT_SIZES)}, not {split!r}"
        )
    return DATA_DIR / f"{split}.jsonl"


def main(argv: list[str] | None = None) -> None:
    """`python -m lora_lightning.tasks.instruct_set [--out DIR] [--seed N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for split, path in write(args.out, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
