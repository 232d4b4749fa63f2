"""The Markdown report of the GPU check (no Hugging Face or Lightning imports)."""

from __future__ import annotations

from typing import Any

from experiments.bench.common import markdown_table


def render(result: dict[str, Any]) -> str:
    machine = result.get("machine") or {}
    gpu = machine.get("gpu") or {}
    lines = [
        "# GPU check"
        + (
            " (smoke run: tiny shapes, numbers not meaningful)" if result["smoke"] else ""
        ),  # fmt: skip
        "",
        f"`{result['command']}` on {result['date_utc']}: **{result.get('status', '?')}** in "
        f"{result.get('total_wall_s', 0):.0f} s (budget "
        f"{_seconds(result['total_budget_s'])}; each step in its own process, "
        f"{result['isolation']}). Device: **{result.get('device')}**.",
        "",
        *([f"**Stopped**: {result['error']}", ""] if result.get("error") else []),
        "## Machine",
        "",
    ]
    if gpu.get("available"):
        lines += [
            f"- GPU: {gpu.get('name')} ({gpu.get('total_memory_gib')} GiB, compute capability "
            f"{gpu.get('capability')}), {gpu.get('count')} visible",
            f"- Driver {gpu.get('driver')}, CUDA (torch build) {gpu.get('cuda')}, cuDNN "
            f"{gpu.get('cudnn')}, NCCL {gpu.get('nccl')}, bf16 supported: "
            f"{gpu.get('bf16_supported')}",
        ]
    else:
        lines.append(f"- GPU: none ({gpu.get('reason', 'not probed')})")
    if machine:
        versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
        lines += [
            f"- CPU: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores",
            f"- Python {machine.get('python')}; {versions}",
            f"- Git commit: {machine.get('git_commit')}"
            + (" (dirty)" if machine.get("git_dirty") else ""),
        ]
    rows = [
        [s["title"], f"**{s['status']}**", f"{s['wall_s']:.1f} s", f"{s['budget_s']:.0f} s",
         s.get("reason") or s.get("error") or s.get("what", "")]
        for s in result["steps"]
    ]  # fmt: skip
    lines += ["", "## Steps", "", markdown_table(["step", "status", "wall", "budget", "what / why"],
                                                 rows), ""]  # fmt: skip
    for step in result["steps"]:
        if step["name"] == "probe":
            continue
        lines += [f"### {step['title']}: {step['status']}", ""]
        if step.get("checks"):
            lines += [
                markdown_table(
                    ["check", "status", "wall", "numbers / reason"],
                    [
                        [
                            f"`{c['name']}`",
                            c["status"],
                            f"{c.get('wall_s', 0):.1f} s",
                            _cell(c.get("summary") or c.get("reason") or c.get("error") or ""),
                        ]
                        for c in step["checks"]
                    ],  # fmt: skip
                ),
                "",
            ]
        renderer = RENDERERS.get(step["name"])
        if renderer is not None and step.get("data"):
            lines += renderer(step["data"])
        for c in step.get("checks", []):
            if c.get("traceback"):
                lines += [f"`{c['name']}` traceback (last lines):", "", "```",
                          *c["traceback"].rstrip().splitlines()[-12:], "```", ""]  # fmt: skip
        if step.get("traceback") or step.get("log_tail"):
            text = step.get("traceback") or step.get("log_tail")
            lines += ["Step output (last lines):", "", "```",
                      *text.rstrip().splitlines()[-20:], "```", ""]  # fmt: skip
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def render_speed(data: dict[str, Any]) -> list[str]:
    """Tables of the speed step: train step and inference medians, ratios, peak memory."""
    lines: list[str] = []
    for key, block in data.get("train_step", {}).items():
        lines += [f"**Train step, {block.get('label', key)}** ({block.get('setup', '')}):", ""]
        lines += _times_table(block)
    for key, block in data.get("inference", {}).items():
        lines += [f"**Inference, {block.get('label', key)}** ({block.get('setup', '')}):", ""]
        lines += _times_table(block)
    if data.get("notes"):
        lines += [*(f"- {note}" for note in data["notes"]), ""]
    return lines


def _times_table(block: dict[str, Any]) -> list[str]:
    times = block.get("times", {})
    memory = block.get("peak_memory", {})
    rows = []
    for name, t in times.items():
        mem = memory.get(name, {})
        rows.append(
            [
                f"`{name}`",
                _ms(t["median_s"]),
                f"{_ms(t['min_s'])} to {_ms(t['max_s'])}",
                f"{mem['peak_mib']:.0f} MiB (+{mem['increase_mib']:.0f})" if mem else "n/a",
            ]
        )
    lines = [markdown_table(["variant", "median", "range", "peak GPU memory (+ over load)"], rows),
             ""]  # fmt: skip
    ratios = block.get("ratios", {})
    if ratios:
        lines += [
            markdown_table(
                ["ratio", "median of per-round ratios", "interval", "ratio of medians"],
                [
                    [
                        f"`{name}`",
                        f"{r['median_of_pair_ratios']:.3f}",
                        f"{r['median_ci'][0]:.3f} to {r['median_ci'][1]:.3f}",
                        f"{r['ratio_of_medians']:.3f}",
                    ]
                    for name, r in ratios.items()
                ],  # fmt: skip
            ),
            "",
        ]
    for label, n in block.get("numerics", {}).items():
        losses = ", ".join(
            f"{a:.5f} / {b:.5f}"
            for a, b in zip(n["losses_lora_lightning"], n["losses_peft"], strict=False)
        )
        lines += [
            f"Numerics ({label}; PEFT's A copied from ours): losses ours / PEFT {losses}; max "
            f"|diff| {n['max_abs_loss_diff']:.1e} (tolerance {n['tolerance']:.1e}) -> "
            f"{'ok' if n['ok'] else 'FAILED'}.",
            "",
        ]
    return lines


def render_default_job(data: dict[str, Any]) -> list[str]:
    if not data.get("command"):
        return []
    lines = [f"Command: `{data['command']}`", ""]
    if data.get("note"):
        lines += [f"Note: {data['note']}.", ""]
    if data.get("metrics"):
        lines += [
            markdown_table(["metric", "value"],
                           [[k, f"{v:.4f}"] for k, v in sorted(data["metrics"].items())]),
            "",
        ]  # fmt: skip
    return lines


def _seconds(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.0f} s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


RENDERERS = {"speed": render_speed, "llm": render_speed, "default_job": render_default_job}
