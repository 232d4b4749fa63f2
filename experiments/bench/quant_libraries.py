"""Which quantization library stores the frozen base of a QLoRA run (issue 14): a measurement.

Candidates (both maintained, both with a CPU path): **torchao** (``NF4Tensor`` from
``to_nf4``, a tensor subclass whose ``F.linear`` dequantizes and multiplies, with an autograd
function for the input gradient; and ``Int8WeightOnlyConfig``, int8 per-row weight-only) and
**bitsandbytes** (``quantize_4bit``/``matmul_4bit`` with its CPU backend; ``Linear8bitLt``).

For each weight shape (384 x 1536: a MiniLM MLP; 768 x 3072: a BERT-base MLP) and each
scheme: bytes of the stored weight (every inner tensor), relative error of ``W_q x`` against
the float32 ``W x``, and the time of one forward + backward through the base plus a rank-8
LoRA term (``W_q x + s·B A x``, gradients for x, A and B) as the project's hook computes it,
median of ``--repeats`` interleaved rounds, one torch thread.

Run: ``python -m experiments.bench.quant_libraries [--repeats N] [--out DIR]`` (needs both
libraries installed: ``pip install torchao bitsandbytes``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from experiments.bench.common import (
    apply_threads,
    base_parser,
    interleave,
    machine_info,
    machine_lines,
    markdown_table,
    write_results,
)

SHAPES = [(384, 1536), (768, 3072)]  # (in, out)
TOKENS = 32 * 64
RANK = 8


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor, or of every inner tensor of a tensor subclass."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def schemes() -> dict[str, Callable[[torch.Tensor], tuple[Callable, int]]]:
    out: dict[str, Callable[[torch.Tensor], tuple[Callable, int]]] = {}

    def float32(w):
        return (lambda x: F.linear(x, w)), _nbytes(w)

    out["float32"] = float32
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        def torchao_nf4(w):
            q = to_nf4(w)
            return (lambda x: F.linear(x, q)), _nbytes(q)

        def torchao_int8(w):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            lin.requires_grad_(False)
            quantize_(lin, Int8WeightOnlyConfig())
            return (lambda x: F.linear(x, lin.weight)), _nbytes(lin.weight)

        out["torchao_nf4"] = torchao_nf4
        out["torchao_int8"] = torchao_int8
    except ImportError as err:
        warnings.warn(f"torchao not measured: {err}", stacklevel=1)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        def bnb_nf4(w):
            packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
            nbytes = _nbytes(packed) + _nbytes(state.absmax)
            return (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)), nbytes

        def bnb_int8(w):
            lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
            lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            lin = lin.to("cpu")
            lin._parameters["weight"] = lin.weight  # quantized on .to()
            nbytes = _nbytes(lin.weight.data) + _nbytes(lin.weight.SCB)
            return lin, nbytes

        out["bitsandbytes_nf4"] = bnb_nf4
        out["bitsandbytes_int8"] = bnb_int8
    except ImportError as err:
        warnings.warn(f"bitsandbytes not measured: {err}", stacklevel=1)
    return out


def measure(repeats: int) -> dict[str, Any]:
    rows = []
    for fan_in, fan_out in SHAPES:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5
        x = torch.randn(TOKENS, fan_in, generator=gen)
        a = (torch.randn(RANK, fan_in, generator=gen) / fan_in**0.5).requires_grad_()
        b = (torch.randn(fan_out, RANK, generator=gen) * 0.01).requires_grad_()
        exact = F.linear(x, w)
        steps: dict[str, Callable[[], float]] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, quantize in schemes().items():
            try:
                base, nbytes = quantize(w)
                with torch.no_grad():
                    err = (base(x).float() - exact).norm() / exact.norm()
            except Exception as e:  # a scheme that does not run on CPU is reported, not fatal
                info[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            info[name] = {"stored_bytes": nbytes, "relative_error": float(err)}

            def step(base=base, x=x, a=a, b=b):
                xi = x.detach().clone().requires_grad_()
                start = time.perf_counter()
                out = base(xi) + 2.0 * F.linear(F.linear(xi, a), b)
                out.sum().backward()
                elapsed = time.perf_counter() - start
                a.grad = b.grad = None
                if xi.grad is None:
                    raise RuntimeError("no input gradient through the quantized base")
                return elapsed

            try:
                step()
                steps[name] = step
            except Exception as e:
                info[name]["backward_error"] = f"{type(e).__name__}: {e}"[:200]
        times = interleave(steps, repeats)
        for name, values in info.items():
            row = {"shape_in_out": [fan_in, fan_out], "scheme": name, **values}
            if name in times:
                row["fwd_bwd_ms_median"] = statistics.median(times[name]) * 1e3
            rows.append(row)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_repeats=7)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    machine = machine_info()
    import importlib.metadata as md

    for dist in ("torchao", "bitsandbytes"):
        try:
            machine["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            machine["versions"][dist] = None
    result = measure(args.repeats or 7)
    table = []
    for row in result["rows"]:
        f32 = next(
            r
            for r in result["rows"]
            if r["scheme"] == "float32" and r["shape_in_out"] == row["shape_in_out"]
        )
        table.append(
            [
                "x".join(map(str, row["shape_in_out"])),
                row["scheme"],
                f"{row['stored_bytes'] / 1024:.0f}" if "stored_bytes" in row else "-",
                f"{row['stored_bytes'] / f32['stored_bytes']:.3f}"
                if "stored_bytes" in row
                else "-",
                f"{row['relative_error']:.4f}" if "relative_error" in row else "-",
                f"{row['fwd_bwd_ms_median']:.2f}" if "fwd_bwd_ms_median" in row else "-",
                row.get("error") or row.get("backward_error") or "",
            ]
        )
    md_text = "\n".join(
        [
            "# Quantization libraries for the frozen base (issue 14)",
            "",
            *machine_lines(machine),
            f"- torchao {machine['versions']['torchao']}, bitsandbytes "
            f"{machine['versions']['bitsandbytes']}",
            "",
            f"Linear weight [out, in], input {TOKENS} tokens, rank-{RANK} LoRA term, one "
            "forward + backward (grads for x, A, B), median of interleaved rounds.",
            "",
            markdown_table(
                [
                    "in x out",
                    "scheme",
                    "stored KiB",
                    "vs fp32",
                    "rel. error of W x",
                    "fwd+bwd ms",
                    "problem",
                ],
                table,
            ),  # fmt: skip
        ]
    )
    paths = write_results(args.out, "quant_libraries", {"machine": machine, **result}, md_text)
    print(md_text)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
