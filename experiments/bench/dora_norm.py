"""DoRA's row norm ``||W + s·B A||``: formed directly (``core.dora.weight_norm``) against the
expansion it replaced on 2026-12-04.

``python -m experiments.bench.dora_norm [--threads N]`` (~20 s). The expansion
(``||w||² + 2s<W Aᵀ, B> + s²<B (A Aᵀ), B>``, rows past a condition limit formed directly) is
kept here, as it was in ``core/dora.py`` until commit 1f58e90, so that the two can be timed in
one process: interleaved rounds, float32 and bfloat16 weights, r=8, shapes of MiniLM
(384 x 384), SmolLM2's MLP (1536 x 576) and a 7B-class attention (4096 x 4096). Results:
``results/dora_norm.{json,md}``.
"""

from __future__ import annotations

from typing import Any

import torch

from experiments.bench.common import (
    RATIO_HEADERS,
    apply_threads,
    base_parser,
    interleave,
    machine_info,
    machine_lines,
    markdown_table,
    ratio_summary,
    summary,
    timed,
    write_results,
)
from lora_lightning.core.dora import weight_norm

SHAPES = ((384, 384), (1536, 576), (4096, 4096))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LIMIT = 100.0  # the expansion's condition limit (EXPANSION_MAX_CONDITION)


@torch.no_grad()
def expanded_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """The expansion, as ``core.dora.weight_norm`` computed it before 2026-12-04."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    w, a, b = w.to(dtype), a.to(dtype), b.to(dtype)
    weight_sq = w.square().sum(1)
    cross = ((w @ a.t()) * b).sum(1)
    lora_sq = ((b @ (a @ a.t())) * b).sum(1)
    sq = weight_sq + (s * s) * lora_sq + (2.0 * s) * cross
    bound_sq = (weight_sq.sqrt() + abs(s) * (b.abs() @ a.norm(dim=1))).square()
    ill = sq * LIMIT < bound_sq
    if bool(ill.any()):  # the host-device synchronisation, on a GPU
        rows = ill.nonzero().squeeze(1)
        sq[rows] = (w[rows] + s * (b[rows] @ a)).square().sum(1)
    return sq.clamp_min_(0).sqrt_()


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=7)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    rounds = args.repeats or (2 if args.quick else 7)
    calls = 3 if args.quick else 20
    result: dict[str, Any] = {
        "benchmark": "dora_norm",
        "quick": args.quick,
        "machine": machine_info(),
        "setup": {
            "r": 8,
            "scaling": 2.0,
            "rounds": rounds,
            "calls_per_round": calls,
            "threads": args.threads,
        },
        "cases": {},
    }
    for (out, width), (label, dtype) in [(s, d) for s in SHAPES for d in DTYPES.items()]:
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(out, width, generator=generator).to(dtype)
        a = torch.randn(8, width, generator=generator) * 0.01
        b = torch.randn(out, 8, generator=generator) * 0.01
        torch.testing.assert_close(weight_norm(w, a, b, 2.0), expanded_norm(w, a, b, 2.0))

        def run(fn, w=w, a=a, b=b):
            return lambda: timed(lambda: [fn(w, a, b, 2.0) for _ in range(calls)])[0] / calls

        times = interleave({"direct": run(weight_norm), "expansion": run(expanded_norm)}, rounds)
        result["cases"][f"{out} x {width}, {label} weight"] = {
            "times": {name: summary(values) for name, values in times.items()},
            "ratio": ratio_summary(times["direct"], times["expansion"]),
        }
    paths = write_results(args.out, "dora_norm", result, render(result))
    print(render(result))
    print("wrote", *paths)
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def render(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        "# DoRA's row norm: formed directly vs the expansion it replaced",
        "",
        f"r={setup['r']}, scaling {setup['scaling']}; {setup['rounds']} interleaved rounds of "
        f"{setup['calls_per_round']} calls; {setup['threads']} thread(s). "
        "`python -m experiments.bench.dora_norm`.",
        "",
        *machine_lines(result["machine"]),
        "",
        markdown_table(
            ["case", "direct (median per call)", "expansion", *RATIO_HEADERS[1:]],
            [
                [
                    case,
                    _ms(block["times"]["direct"]["median_s"]),
                    _ms(block["times"]["expansion"]["median_s"]),
                    f"{block['ratio']['median_of_pair_ratios']:.3f}",
                    "{:.3f} to {:.3f} ({:.0%})".format(
                        *block["ratio"]["median_ci"], block["ratio"]["median_ci_coverage"]
                    ),
                    f"{block['ratio']['ratio_of_medians']:.3f}",
                ]
                for case, block in result["cases"].items()
            ],
        ),
        "",
        "Ratio: direct / expansion (below 1: the direct form is faster).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
