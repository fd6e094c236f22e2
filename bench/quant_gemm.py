"""Quantized-weight decode GEMMs on the GPU: the packed-weight template (codegen/quant_gemm.py)
against bf16 (the skinny template or cuBLAS, whichever the table picks) and against
dequantize + F.linear (what ``fusegen::quantized_linear`` does without the template), with
the copy rate measured in the same run.

    python bench/quant_gemm.py [--out bench/results/quant_gemm.json] [--formats int8,fp8,int4] [--quick]

Every linear of the Llama-3.2-1B and Llama-2-7B configs as fusegen runs them (q/k/v and
gate/up fused; the LM head, which stays bf16 unless asked, left out) at M = 1, 8, 64 tokens.
Times come from the engine's own table (``GemmTable.measure``): each candidate and each
baseline replayed from one CUDA graph over weight copies larger than the L2, timed with CUDA
events, the median of the repetitions after a warm-up replay, random data. Rates count the
bytes a call must read and write: the weight as stored (packed data + scales), x and y;
``pct_copy`` is that rate over the device-to-device copy rate (bench/kernel_bench.py's ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from fusegen.codegen import quant_gemm, skinny_gemm
from fusegen.codegen.skinny_gemm import table_key

DT = torch.bfloat16
MS = (1, 8, 64)


def shapes(model: str) -> list[tuple[str, int, int]]:
    from kernel_bench import linear_shapes

    return [s for s in linear_shapes(model) if s[0] != "lm_head"]


def rel_err_vs_float64(fmt: str, M: int, N: int, K: int, config) -> float:
    operand = quant_gemm.OPERANDS[fmt]
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = operand.weight(N, K, DT, "cuda", gen)
    x = torch.randn(M, K, device="cuda", dtype=DT, generator=gen)
    want = torch.nn.functional.linear(x.double(), quant_gemm.dequantize(*weight, fmt, torch.float64))
    got = quant_gemm.quant_linear(x, *weight, None, fmt, config).double()
    return ((got - want).norm() / want.norm()).item()


def rows_for(model: str, formats, ms, copy_tbps: float) -> list[dict]:
    table, rows = skinny_gemm.TABLE, []
    for linear, N, K in shapes(model):
        table.measure([(N, K, False)], ms, DT, "cuda")
        for fmt in formats:
            table.measure([(N, K, False)], ms, DT, "cuda", operand=quant_gemm.OPERANDS[fmt])
        for M in ms:
            plain = table.choices[table_key(M, N, K, DT, False)]
            io = (M * K + M * N) * 2
            bf16_bytes = N * K * 2 + io
            row = {"model": model, "linear": linear, "M": M, "N": N, "K": K,
                   "bf16": {"kernel": plain.kernel, "us": plain.us, "cublas_us": plain.cublas_us,
                            "GBps": bf16_bytes / plain.us / 1e3,
                            "pct_copy": 100 * bf16_bytes / plain.us / 1e6 / copy_tbps}}
            for fmt in formats:
                key = table_key(M, N, K, DT, False, fmt)
                choice, best = table.choices[key], table.best_template(M, N, K, DT, False, fmt)
                nbytes = quant_gemm.OPERANDS[fmt].weight_bytes(N, K) + io
                template_us = table.trace[key][best] if best is not None else float("nan")
                row[fmt] = {"template": str(best), "template_us": template_us, "dequant_us": choice.cublas_us,
                            "chosen": choice.kernel, "packed_bytes": nbytes, "GBps": nbytes / template_us / 1e3,
                            "pct_copy": 100 * nbytes / template_us / 1e6 / copy_tbps,
                            "speedup_vs_bf16": plain.us / template_us,
                            "speedup_vs_dequant": choice.cublas_us / template_us,
                            "rel_err_vs_float64": rel_err_vs_float64(fmt, M, N, K, best) if best else None}
                print(f"{model} {linear:8s} M{M:<3} N{N:<6} K{K:<6} {fmt:4s} {template_us:7.1f} us "
                      f"{row[fmt]['GBps']:6.0f} GB/s ({row[fmt]['pct_copy']:3.0f}% of copy)  bf16 {plain.us:7.1f} us "
                      f"[{plain.kernel}]  dequant+cuBLAS {choice.cublas_us:7.1f} us", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="quantized-weight skinny GEMM benchmark (GPU)")
    parser.add_argument("--out", default="bench/results/quant_gemm.json")
    parser.add_argument("--formats", default="int8,fp8,int4", help="comma-separated weight formats")
    parser.add_argument("--quick", action="store_true", help="1B shapes at M=1 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/quant_gemm.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in quant_gemm.OPERANDS]
    if bad:
        sys.exit(f"bench/quant_gemm.py: error: unknown weight format {bad[0]!r}; "
                 f"formats: {', '.join(quant_gemm.OPERANDS)}")
    from kernel_bench import ceilings

    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": ceilings()}
    copy_tbps = result["ceilings"]["copy_TBps"]
    print(f"device {result['device']}: copy {copy_tbps:.2f} TB/s", flush=True)
    models, ms = (("1b",), (1,)) if args.quick else (("1b", "7b"), MS)
    result["rows"] = [row for model in models for row in rows_for(model, formats, ms, copy_tbps)]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
