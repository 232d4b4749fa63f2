"""Count the files that name each LoRA variant, outside the tests (issue 23's measure).

Scope: the package (``lora_lightning/**.py``), the Hydra configs (``conf/**.yaml``) and
``train.py``: what a user installs and runs. Tests, experiments and docs are left out.

Two counts per variant:

- ``any``: files where a pattern appears anywhere (comments and docstrings included), as
  ``grep -rliE PATTERN lora_lightning conf train.py`` would count them;
- ``code``: files where it appears in code (Python tokens other than comments and
  docstrings; every non-comment line of a YAML file), the edit sites a change of the variant
  would touch. The ``code`` column also gives the number of such lines, and the ``outside``
  column the ``code`` files other than the variant's own modules (:data:`OWN`), with the
  number of code lines in them (issue 23's "edit sites outside its own module": at most 4
  sites in 3 files for a forward variant).

Run: ``python -m experiments.variants.count_sites`` from the repository root.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

#: Variant -> case-insensitive regex of the names that belong to it (its flag, its tensors,
#: its helpers).
PATTERNS = {
    "DoRA": r"dora|magnitude",
    "PiSSA/OLoRA": r"pissa|olora|changes_base|base_chang|base_init|initial_delta"
    r"|convert_to_plain",
    # The same by the two names alone: the rest above is the generic base-changing-init seam
    # (any init whose entry says changes_base uses it), which PiSSA and OLoRA share.
    "PiSSA/OLoRA (names only)": r"pissa|olora",
    "quantization": r"quantiz|nf4|int8|torchao",
    "EVA": r"\beva\b|\beva_|_eva\b",
    "LoRA-GA": r"lora_ga|loraga|lora-ga",
}

#: Variant -> its own modules (where it is meant to live, the registry entry included): the
#: "outside" column counts the code files naming it beyond these.
OWN = {
    "DoRA": ("lora_lightning/core/dora.py", "lora_lightning/core/variants.py"),
    "PiSSA/OLoRA": ("lora_lightning/core/inits.py",),
    "PiSSA/OLoRA (names only)": ("lora_lightning/core/inits.py",),
    "quantization": ("lora_lightning/core/quantize.py",),
    "EVA": ("lora_lightning/core/eva.py", "lora_lightning/core/inits.py"),
    "LoRA-GA": ("lora_lightning/core/lora_ga.py", "lora_lightning/core/inits.py"),
}


def product_files(root: Path) -> list[Path]:
    """The files in scope, sorted."""
    files = sorted(root.glob("lora_lightning/**/*.py")) + sorted(root.glob("conf/**/*.yaml"))
    return files + [root / "train.py"]


def code_lines(path: Path) -> dict[int, str]:
    """Line number -> the code on it: comments and docstrings removed (YAML: comments)."""
    text = path.read_text()
    if path.suffix != ".py":
        return {
            i: line.split("#", 1)[0]
            for i, line in enumerate(text.splitlines(), 1)
            if line.split("#", 1)[0].strip()
        }
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(value.lineno, value.end_lineno + 1))
    lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
            continue
        if token.type == tokenize.STRING and token.start[0] in docstrings:
            continue
        for row in range(token.start[0], token.end[0] + 1):
            lines[row] = lines.get(row, "") + " " + token.string
    return lines


def count(root: Path) -> dict[str, tuple[list[str], list[str], int, int]]:
    """Variant -> (files naming it anywhere, files naming it in code, code lines, code lines
    outside its own modules)."""
    result = {}
    for variant, pattern in PATTERNS.items():
        regex = re.compile(pattern, re.IGNORECASE)
        anywhere, in_code, lines, outside = [], [], 0, 0
        for path in product_files(root):
            name = str(path.relative_to(root))
            if regex.search(path.read_text()):
                anywhere.append(name)
            hits = sum(1 for line in code_lines(path).values() if regex.search(line))
            if hits:
                in_code.append(name)
                lines += hits
                outside += 0 if name in OWN[variant] else hits
        result[variant] = (anywhere, in_code, lines, outside)
    return result


def main(root: Path = Path(".")) -> None:
    """Print a Markdown table and the file lists."""
    counts = count(root)
    print(
        "| variant | files naming it (any text) | files naming it in code | code lines "
        "| in code outside its own modules: files / lines |"
    )
    print("|---|---|---|---|---|")
    for variant, (anywhere, in_code, lines, sites) in counts.items():
        outside = [f for f in in_code if f not in OWN[variant]]
        print(
            f"| {variant} | {len(anywhere)} | {len(in_code)} | {lines} | {len(outside)} / {sites} |"
        )
    for variant, (_, in_code, _, _) in counts.items():
        print(
            f"\n{variant} (in code): "
            + ", ".join(f.removeprefix("lora_lightning/") for f in in_code)
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
