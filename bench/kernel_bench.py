"""Kernel benchmark on the GPU: fusegen's Triton kernels against torch, with the hardware
ceilings measured in the same run.

    python bench/kernel_bench.py [--out bench/results/kernels.json]
    python bench/kernel_bench.py --only decode --out bench/results/decode_attention.json
    python bench/kernel_bench.py --only prefill --out bench/results/prefill_attention.json
        [--prefill-configs hopper_m128_n64_w8_s3,hopper_m128_n128_w8_s2_persistent]

- ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate;
- prefill attention, causal bf16, H32 T4096 D128 at B4 and B1: fusegen flash_attention (its
  default, the Hopper kernel with tuned tiles on sm90+, and its FlashAttention-2 kernel) vs
  torch SDPA with the flash and cuDNN backends (TFLOP/s counting the causal half); the same
  as paged prefill over block-16 and block-64 pools (tuning, once per shape class, runs in
  the first call and is not timed; see codegen/prefill_tuning.py);
- paged decode attention, GQA 32/8, D128, block 16, random block tables, at B1 L8192,
  B1 L32768, B32 L4096, and at short contexts under tables sized for 4096 keys (as the
  runtime's graphs run them): fusegen paged_attention (splits combined in the kernel, and by
  the separate reduction kernel) vs SDPA on dense KV (TB/s of KV read), all replayed from
  CUDA graphs as the runtime runs decode;
- generated fused groups (RMSNorm T4096 H4096, residual + RMSNorm, SiLU*mul T4096 I11008)
  vs the same ops in eager torch (TB/s of the bytes each must move), each replayed from a
  CUDA graph so the kernel, not the Python launch, is timed;
- skinny GEMM: every linear shape of the 1B and 7B configs (fused q/k/v and gate/up) at
  M = 1, 8, 64: the template's best measured configuration vs cuBLAS (F.linear), TB/s of
  the weight, input and output bytes and % of the copy rate, both replayed from CUDA graphs.
Every timing is a median over CUDA-event-timed repetitions after warm-up, on random data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import triton.testing
from torch import nn

from fusegen.codegen import attention as attn_kernels
from fusegen.codegen import skinny_gemm
from fusegen.codegen.lower import lower
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.fuse_pointwise import fuse_pointwise
from fusegen.passes.infra import PassContext

DT = torch.bfloat16


def bench(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graphed(fn):
    """``fn`` captured into a CUDA graph (after a warm-up); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def ceilings() -> dict:
    x = torch.randn(256 * 1024 * 1024 // 2, device="cuda", dtype=DT)  # 256 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    copy_tbs = 2 * x.numel() * x.element_size() / ms / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = bench(lambda: a @ b)
    return {"copy_TBps": copy_tbs, "matmul_TFLOPs": 2 * 8192 ** 3 / ms / 1e9}


def _tflops(flops: float, fn) -> float:
    return flops / bench(fn) / 1e9


def prefill(B: int, H=32, T=4096, D=128, configs=()) -> dict:
    """Dense causal prefill: fusegen's default (the Hopper kernel, tuned, on sm90+), its
    FlashAttention-2 kernel (config="fa2"), any ``configs`` by name, SDPA flash and cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DT) for _ in range(3))
    scale = 1 / math.sqrt(D)
    flops = 4 * B * H * T * T * D / 2
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True) \
        if B * T <= 4096 else None
    out = {"shape": f"B{B} H{H} T{T} D{D} causal bf16"}
    got = attn_kernels.flash_attention(q, k, v, scale, True)
    if ref is not None:
        out["fusegen_rel_err"] = rel_err(got, ref)
        out["fusegen_fa2_rel_err"] = rel_err(attn_kernels.flash_attention(q, k, v, scale, True, config="fa2"), ref)
    out["fusegen_TFLOPs"] = _tflops(flops, lambda: attn_kernels.flash_attention(q, k, v, scale, True))
    out["fusegen_fa2_TFLOPs"] = _tflops(flops, lambda: attn_kernels.flash_attention(q, k, v, scale, True, config="fa2"))
    for name in configs:
        try:
            fn = lambda: attn_kernels.flash_attention(q, k, v, scale, True, config=name)
            err = rel_err(fn(), ref if ref is not None else got)
            out[f"config {name}"] = {"TFLOPs": _tflops(flops, fn), "rel_err": err}
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            out[f"config {name}"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                want = fn()
                out[f"{name}_TFLOPs"] = flops / bench(fn) / 1e9
            out.setdefault("agreement_rel_err", rel_err(got, want))
        except RuntimeError as exc:
            out[f"{name}_error"] = str(exc).splitlines()[0]
    return out


def paged_prefill(B: int, block: int, H=32, T=4096, D=128) -> dict:
    """Causal prefill of B sequences of T tokens packed as [1, H, B*T, D] over a paged pool of
    ``block``-row blocks in random order (MHA, the dense rows' FLOPs): fusegen's default
    and its FA2 kernel; rel err against fusegen's dense kernel on the same K/V."""
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DT) for _ in range(3))
    per_seq = T // block
    tables = torch.randperm(B * per_seq, device="cuda", dtype=torch.int32).reshape(B, per_seq)
    pool = torch.empty(1, 2, B * per_seq, block, H, D, device="cuda", dtype=DT)
    for i, t in enumerate((k, v)):
        pool[0, i, tables.long()] = t.transpose(1, 2).reshape(B, per_seq, block, H, D)
    qp = q.transpose(0, 1).reshape(1, H, B * T, D)
    seq_lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    starts = torch.arange(B + 1, device="cuda", dtype=torch.int32) * T
    scale = 1 / math.sqrt(D)
    flops = 4 * B * H * T * T * D / 2
    call = lambda cfg=None: attn_kernels.paged_attention(qp, pool, 0, tables, seq_lens, starts, scale,
                                                         True, 0, 0.0, config=cfg)
    dense = attn_kernels.flash_attention(q, k, v, scale, True).transpose(0, 1).reshape(1, H, B * T, D)
    out = {"shape": f"B{B} H{H} T{T} D{D} causal bf16 paged block {block}",
           "fusegen_rel_err_vs_dense": rel_err(call(), dense),
           "fusegen_fa2_rel_err_vs_dense": rel_err(call("fa2"), dense)}
    out["fusegen_TFLOPs"] = _tflops(flops, call)
    out["fusegen_fa2_TFLOPs"] = _tflops(flops, lambda: call("fa2"))
    return out


def prefill_rows(matmul_tflops: float, configs=()) -> dict:
    """The prefill attention rows, printed as they finish."""
    rows = {"dense": [], "paged": []}
    for B in (4, 1):
        p = prefill(B, configs=configs)
        rows["dense"].append(p)
        extra = "".join(f", {n.removeprefix('config ')} {r.get('TFLOPs', float('nan')):.0f}"
                        for n, r in p.items() if n.startswith("config "))
        print(f"prefill {p['shape']}: fusegen {p['fusegen_TFLOPs']:.0f} TFLOP/s "
              f"({100 * p['fusegen_TFLOPs'] / matmul_tflops:.0f}% of matmul), FA2 kernel {p['fusegen_fa2_TFLOPs']:.0f}, "
              f"SDPA flash {p.get('sdpa_flash_TFLOPs', float('nan')):.0f}, cuDNN {p.get('sdpa_cudnn_TFLOPs', float('nan')):.0f}"
              f"{extra}, rel err {p.get('fusegen_rel_err', p.get('agreement_rel_err', float('nan'))):.1e}", flush=True)
    for B in (4, 1):
        for block in (16, 64):
            p = paged_prefill(B, block)
            rows["paged"].append(p)
            print(f"prefill {p['shape']}: fusegen {p['fusegen_TFLOPs']:.0f} TFLOP/s "
                  f"({100 * p['fusegen_TFLOPs'] / matmul_tflops:.0f}% of matmul), FA2 kernel {p['fusegen_fa2_TFLOPs']:.0f}"
                  f", rel err vs dense {p['fusegen_rel_err_vs_dense']:.1e}", flush=True)
    from fusegen.codegen import prefill_tuning
    rows["tuned"] = prefill_tuning.stored_choices()
    return rows


def decode(B: int, L: int, Hq=32, Hkv=8, D=128, block=16, context=None) -> dict:
    """Paged decode at B sequences of ``context`` keys (default L) in block tables sized for L,
    the split count chosen for L: the runtime captures decode graphs for the longest context
    and replays them at shorter ones. Also timed with the splits combined by the separate
    reduction kernel (``fused_reduce=False``)."""
    context = context or L
    blocks_per_seq = L // block
    num_blocks = B * blocks_per_seq
    pool = torch.randn(1, 2, num_blocks, block, Hkv, D, device="cuda", dtype=DT)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).reshape(B, blocks_per_seq)
    q = torch.randn(1, Hq, B, D, device="cuda", dtype=DT)
    seq_lens = torch.full((B,), context, device="cuda", dtype=torch.int32)
    starts = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    kv_bytes = 2 * B * context * Hkv * D * 2

    def graph_of(fused_reduce):
        call = lambda: attn_kernels.paged_attention(q, pool, 0, tables, seq_lens, starts, scale, True, 0, 0.0,
                                                    fused_reduce=fused_reduce)
        got = call()
        # Decode runs inside CUDA graphs in the runtime, so time graph replays (no launch overhead).
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return got, graph.replay
    got, run = graph_of(True)
    got_two, run_two = graph_of(False)
    # the same K/V, dense, for SDPA (and as the reference)
    rows = tables[:, :triton.cdiv(context, block)].long()
    k = pool[0, 0, rows].reshape(B, -1, Hkv, D)[:, :context].transpose(1, 2).contiguous()
    v = pool[0, 1, rows].reshape(B, -1, Hkv, D)[:, :context].transpose(1, 2).contiguous()
    qd = q[0].transpose(0, 1).unsqueeze(2).contiguous()  # [B, Hq, 1, D]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, k, v, enable_gqa=True)
    want = sdpa()
    shape = f"B{B} L{L}" if context == L else f"B{B} L{context} (tables for {L})"
    out = {"shape": f"{shape} GQA {Hq}/{Hkv} D{D} block {block}",
           "rel_err": rel_err(got[0].transpose(0, 1), want[:, :, 0]),
           "reduce_kernel_rel_err": rel_err(got_two[0].transpose(0, 1), want[:, :, 0]),
           "num_splits": attn_kernels.decode_num_splits(B, Hkv, L, torch.cuda.get_device_properties(0).multi_processor_count)}
    out["fusegen_us"] = 1e3 * bench(run)
    out["fusegen_reduce_kernel_us"] = 1e3 * bench(run_two)
    out["fusegen_TBps"] = kv_bytes / out["fusegen_us"] / 1e6
    sdpa_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(sdpa_graph):
        sdpa()
    out["sdpa_dense_us"] = 1e3 * bench(sdpa_graph.replay)
    out["sdpa_dense_TBps"] = kv_bytes / out["sdpa_dense_us"] / 1e6
    return out


def decode_rows() -> list[dict]:
    return [decode(1, 8192), decode(1, 32768), decode(32, 4096),
            decode(1, 4096, context=52), decode(1, 4096, context=1000), decode(8, 4096, context=300)]


class RMSNorm(nn.Module):
    def __init__(self, H):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H, dtype=DT))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class AddRMSNorm(RMSNorm):
    def forward(self, x, residual):
        s = x + residual
        return s, super().forward(s)


class SiluMul(nn.Module):
    def forward(self, gate, up):
        return torch.nn.functional.silu(gate) * up


def fused(module: nn.Module, *args):
    """The module captured, cleaned, grouped by fuse_pointwise and lowered to Triton."""
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
    ctx = PassContext()
    gm = cleanup_graph(gm, ctx).gm
    result = fuse_pointwise(gm, ctx)
    gm = result.gm
    gm.recompile()
    lower(gm)
    return gm, result.stats


def fused_groups(T=4096, H=4096, I=11008) -> list[dict]:
    rows = []
    x = torch.randn(T, H, device="cuda", dtype=DT)
    r = torch.randn(T, H, device="cuda", dtype=DT)
    g = torch.randn(T, I, device="cuda", dtype=DT)
    u = torch.randn(T, I, device="cuda", dtype=DT)
    cases = [
        ("RMSNorm", RMSNorm(H).cuda(), (x,), 2 * T * H * 2 + H * 2),
        ("residual+RMSNorm", AddRMSNorm(H).cuda(), (x, r), 4 * T * H * 2 + H * 2),
        ("SiLU*mul", SiluMul().cuda(), (g, u), 3 * T * I * 2),
    ]
    for name, module, args, nbytes in cases:
        gm, stats = fused(module, *args)
        with torch.no_grad():
            want, got = module(*args), gm(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        err = max(rel_err(a, b) for a, b in zip(got, want))
        # the same bytes moved by a plain copy (read half, write half), timed the same way:
        # the ceiling at this size, which is below the large-buffer copy rate
        src = torch.randn(nbytes // 4, device="cuda", dtype=DT)
        dst = torch.empty_like(src)
        with torch.no_grad():
            t_fused = bench(graphed(lambda: gm(*args)))
            t_eager = bench(graphed(lambda: module(*args)))
            t_copy = bench(graphed(lambda: dst.copy_(src)))
        rows.append({"kernel": name, "shape": f"T{T} x {args[0].shape[-1]} bf16", "groups": stats.get("groups", 0),
                     "rel_err": err, "fusegen_TBps": nbytes / t_fused / 1e9, "eager_TBps": nbytes / t_eager / 1e9,
                     "same_bytes_copy_TBps": nbytes / t_copy / 1e9})
    return rows


def linear_shapes(name: str) -> list[tuple[str, int, int]]:
    """(linear, N, K) of a Llama config of bench/e2e.py as fusegen runs it (q/k/v and
    gate/up fused)."""
    from e2e import CONFIGS

    c = CONFIGS[name]
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * D
    return [("qkv", H + 2 * kv, H), ("o", H, H), ("gate_up", 2 * I, H), ("down", H, I), ("lm_head", V, H)]


def skinny_gemms(copy_tbps: float, ms=(1, 8, 64)) -> list[dict]:
    rows = []
    table = skinny_gemm.TABLE
    for model in ("1b", "7b"):
        for linear, N, K in linear_shapes(model):
            table.measure([(N, K, False)], ms, DT, "cuda")
            copies = max(1, min(32, -(-skinny_gemm.L2_FLUSH_BYTES // (N * K * 2))))
            ws = [torch.randn(N, K, device="cuda", dtype=DT) * K ** -0.5 for _ in range(copies)]
            w = ws[0]
            for M in ms:
                choice = table.choices[(M, N, K, DT, False)]
                x = torch.randn(M, K, device="cuda", dtype=DT)
                nbytes = (N * K + M * K + M * N) * 2
                # one CUDA graph over weight copies larger than the L2: every call reads HBM
                t_cublas = skinny_gemm._time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]) / 1e3
                row = {"model": model, "linear": linear, "shape": f"M{M} N{N} K{K} bf16",
                       "chosen": choice.kernel, "cublas_TBps": nbytes / t_cublas / 1e9}
                best = _best_template(table, M, N, K)   # timed even where cuBLAS won
                if best is not None:
                    want = torch.nn.functional.linear(x.double(), w.double())
                    row["template_rel_err"] = rel_err(skinny_gemm.skinny_linear(x, w, None, best), want)
                    row["template"] = str(best)
                    row["template_TBps"] = nbytes / (skinny_gemm._time_us(
                        [lambda w=w: skinny_gemm.skinny_linear(x, w, None, best) for w in ws]) / 1e3) / 1e9
                chosen = row.get("template_TBps", 0) if choice.config is not None else row["cublas_TBps"]
                row["chosen_TBps"] = chosen
                row["chosen_pct_copy"] = 100 * chosen / copy_tbps
                rows.append(row)
                print(f"skinny GEMM {model} {linear:8s} {row['shape']:24s} template {row.get('template_TBps', 0):.2f} TB/s"
                      f" ({row.get('template', '-')}), cuBLAS {row['cublas_TBps']:.2f}, chosen {choice.kernel}"
                      f" = {row['chosen_pct_copy']:.0f}% of copy", flush=True)
    return rows


def _best_template(table, M, N, K):
    trace = table.trace.get((M, N, K, DT, False))
    return min(trace, key=trace.get) if trace else None


def main() -> None:
    parser = argparse.ArgumentParser(description="fusegen kernel benchmark (GPU)")
    parser.add_argument("--out", default="bench/results/kernels.json")
    parser.add_argument("--only", choices=["prefill", "decode"], help="run only these rows (and the ceilings)")
    parser.add_argument("--prefill-configs", default="",
                        help="comma-separated PREFILL_CONFIGS names timed as extra dense prefill rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    attn_kernels.register()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "ceilings": ceilings()}
    c = result["ceilings"]
    print(f"device {result['device']}: copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    configs = [n for n in args.prefill_configs.split(",") if n]
    if args.only in (None, "prefill"):
        result["prefill"] = prefill_rows(c["matmul_TFLOPs"], configs)
    if args.only in (None, "decode"):
        result["decode"] = decode_rows()
    if args.only is None:
        result["fused_groups"] = fused_groups()
        result["skinny_gemm"] = skinny_gemms(result["ceilings"]["copy_TBps"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for d in result.get("decode", []):
        print(f"decode {d['shape']}, {d['num_splits']} splits: fusegen {d['fusegen_us']:.1f} us, "
              f"{d['fusegen_TBps']:.2f} TB/s ({100 * d['fusegen_TBps'] / c['copy_TBps']:.0f}% of copy); "
              f"with the reduction kernel {d['fusegen_reduce_kernel_us']:.1f} us; SDPA dense "
              f"{d['sdpa_dense_us']:.1f} us, {d['sdpa_dense_TBps']:.2f} TB/s; rel err {d['rel_err']:.1e}"
              f" / {d['reduce_kernel_rel_err']:.1e}")
    for f_ in result.get("fused_groups", []):
        print(f"{f_['kernel']} {f_['shape']}: fusegen {f_['fusegen_TBps']:.2f} TB/s "
              f"({100 * f_['fusegen_TBps'] / c['copy_TBps']:.0f}% of copy, {100 * f_['fusegen_TBps'] / f_['same_bytes_copy_TBps']:.0f}%"
              f" of a {f_['same_bytes_copy_TBps']:.2f} TB/s copy of the same bytes), eager {f_['eager_TBps']:.2f}"
              f", rel err {f_['rel_err']:.1e}")


if __name__ == "__main__":
    main()
