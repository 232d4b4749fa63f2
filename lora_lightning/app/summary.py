"""The comparison of a sweep's jobs, written when a multirun ends.

Owns :class:`SweepSummary`, a Hydra callback (``hydra.callbacks.sweep_summary`` in
``conf/train.yaml``) that reads each job's ``results.json`` and writes, in the sweep folder,
``summary.csv``, ``summary.md`` and ``summary.png`` (the optimised metric against trainable
parameters and against each swept value), then prints the table. Works for every sweeper and
launcher (basic, Optuna, submitit): it only reads files. Must not import Lightning, torch or the
default task; matplotlib is optional (without it the plot is skipped, with a note).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of ``sweep_dir`` that has a ``results.json``, in job order."""
    rows = []
    folders = [p for p in sweep_dir.iterdir() if (p / "results.json").is_file()]
    for folder in sorted(folders, key=lambda p: (len(p.name), p.name)):
        results = json.loads((folder / "results.json").read_text())
        overrides = override_values(results.get("overrides", []))
        rows.append({**results, "job": folder.name, "overrides": overrides})
    return rows


def override_values(overrides: list[str]) -> dict[str, str]:
    """A job's overrides (Hydra's command-line form) as key -> value text, read by Hydra's own
    parser: ``+key=v`` and ``++key=v`` give ``key``; a package names the key as
    ``group@package``; a deletion (``~lora``, the full fine-tuning baseline) gives
    ``lora -> "~lora"``, so that the baseline is a value of the ``lora`` column. Values are the
    text as written (``lr=1e-3`` stays ``1e-3``).

    Raises:
        hydra.errors.OverrideParseException: an override Hydra itself would not accept.
    """
    values = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.package is not None:
            key = f"{key}@{override.package}"
        if override.is_delete():
            values[key] = override.input_line
        else:
            values[key] = override.input_line.split("=", 1)[1]  # after the key, which has none
    return values


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs, in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


def table(rows: list[dict[str, Any]], metric: str | None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: job, swept values, metrics (``metric`` first), parameter counts, time."""
    swept = swept_keys(rows)
    metrics = metric_order({k for row in rows for k in row["metrics"]}, metric)
    header = ["job", *swept, *metrics, "trainable_params", "trainable_%", "wall_time_s"]
    body = []
    for row in rows:
        counts = row["parameters"]
        body.append(
            [row["job"], *(row["overrides"].get(k, "") for k in swept)]
            + [_round(row["metrics"].get(k)) for k in metrics]
            + [counts["trainable"], round(counts["trainable_percent"], 3), row["wall_time_s"]]
        )
    return header, body


#: Splits in the order their metrics are listed.
SPLITS = ("val", "test", "train")


def metric_order(names: set[str], metric: str | None) -> list[str]:
    """Metric names grouped by split (``metric``'s split first, ``metric`` at its head, then
    val, test, train, others), alphabetical within a split: ``val/acc``, ``val/f1``, ...,
    ``test/acc`` and never a split cut in two."""
    first = metric.split("/", 1)[0] if metric else None

    def key(name: str) -> tuple[Any, ...]:
        split = name.split("/", 1)[0]
        rank = SPLITS.index(split) if split in SPLITS else len(SPLITS)
        return (split != first, rank, split, name != metric, name)

    return sorted(names, key=key)


def markdown(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Save :func:`sweep_figure` for this sweep at ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure = sweep_figure(rows, metric, f"{metric} of each job of sweep {path.parent.name}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def sweep_figure(rows: list[dict[str, Any]], metric: str, title: str) -> Any:
    """A matplotlib figure titled ``title``: ``metric`` against trainable parameters, and
    against each swept value, each point labelled with its value (4 decimals) and ticked where it
    lies (numeric values on a numeric axis, others as categories). Needs matplotlib."""
    import matplotlib.pyplot as plt

    rows = [row for row in rows if metric in row["metrics"]]
    swept = swept_keys(rows)
    figure, axes = plt.subplots(1, 1 + len(swept), figsize=(4.5 * (1 + len(swept)), 3.8))
    axes = axes if len(swept) else [axes]
    values = [row["metrics"][metric] for row in rows]
    params = [row["parameters"]["trainable"] for row in rows]
    _labelled_points(axes[0], params, values)
    axes[0].set_xscale("log")
    axes[0].set_xticks(sorted(set(params)), [f"{p:,}" for p in sorted(set(params))], rotation=30)
    axes[0].minorticks_off()
    axes[0].set_xlabel("trainable parameters")
    for axis, key in zip(axes[1:], swept, strict=True):
        xs = [row["overrides"].get(key, "") for row in rows]
        if all(_is_number(x) for x in xs):
            points = [float(x) for x in xs]
            _labelled_points(axis, points, values)
            axis.set_xticks(sorted(set(points)), sorted(set(xs), key=float))
        else:
            _labelled_points(axis, xs, values)
        axis.set_xlabel(key)
    for axis in axes:
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.margins(x=0.15, y=0.12)  # room for the value labels
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_summary(sweep_dir: Path, metric: str | None) -> str | None:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png``; return the table (None if no
    job finished)."""
    rows = collect(sweep_dir)
    if not rows:
        return None
    header, body = table(rows, metric)
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        csv.writer(file).writerows([header, *body])
    text = markdown(header, body)
    (sweep_dir / "summary.md").write_text(text)
    if metric is None or not plot(rows, metric, sweep_dir / "summary.png"):
        text += "(no plot: it needs matplotlib and an optimized_metric)\n"
    return text


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep's jobs when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        text = write_summary(sweep_dir, config.get("optimized_metric"))
        if text is not None:
            print(f"Sweep summary ({sweep_dir}/summary.md, .csv, .png)\n{text}", flush=True)


def _labelled_points(axis: Any, xs: list[Any], values: list[float]) -> None:
    """Scatter the points and write each one's value next to it."""
    axis.scatter(xs, values)
    for x, value in zip(xs, values, strict=True):
        axis.annotate(f"{value:.4f}", (x, value), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)  # fmt: skip


def _round(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
