"""Schedule sweeps on the GPU: the generated RMSNorm's rows per program and warps (against a
hand-written Triton RMSNorm), and split-KV decode attention's tiles, warps and split count.

    python bench/schedule_sweep.py [--out bench/results/schedule_sweep.json]

Every point is timed from CUDA-graph replays (bench/kernel_bench.py's ``bench``: warm-up,
CUDA events, median, L2 flushed), on random data. RMSNorm rows give rel_err against the
eager module; decode rows against the kernel's output at its default configuration. The decode rows print the sweep's best point per shape next to what
the shape heuristic (``decode_num_splits`` and ``default_decode_config``) picks.
"""
import argparse
import itertools
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench as K  # noqa: E402
from fusegen.codegen import attention as attn_kernels  # noqa: E402
from fusegen.codegen import decode_attention as da  # noqa: E402
from fusegen.codegen import pointwise  # noqa: E402

parser = argparse.ArgumentParser(description="row-schedule and decode-attention sweeps (GPU)")
parser.add_argument("--out", default="bench/results/schedule_sweep.json")
args = parser.parse_args()
if not torch.cuda.is_available():
    sys.exit("bench/schedule_sweep.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
res = {"copy": K.ceilings()}
print("ceilings", res["copy"], flush=True)
copy = res["copy"]["copy_TBps"]


@triton.jit
def _hand_rms(x, w, y, M, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, EVICT: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = row < M
    if EVICT:
        a = tl.load(x + row * N + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        a = tl.load(x + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(a * a, axis=1, keep_dims=True) / N + 1e-6)
    out = (a * r).to(tl.bfloat16).to(tl.float32) * tl.load(w + cols).to(tl.float32)
    tl.store(y + row * N + cols, out.to(tl.bfloat16), mask=mask)


T, H = 4096, 4096
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
nbytes = 2 * T * H * 2 + H * 2
mod = K.RMSNorm(H).cuda()
gm, _ = K.fused(mod, x)
want = mod(x)
rows_out = []
orig_elems = pointwise.ROW_ELEMS
orig_sched = pointwise.row_schedule
for elems, ept in itertools.product([1024, 2048, 4096, 8192, 16384], [4, 8, 16, 32]):
    def sched(M, block, elems=elems, ept=ept):
        rows = max(1, min(elems // block, triton.next_power_of_2(max(M, 1))))
        warps = max(1, min(32, rows * block // (32 * ept)))
        return rows, warps
    pointwise.row_schedule = sched
    # generated launchers import row_schedule by name: patch every loaded generated module
    for m in list(sys.modules.values()):
        if getattr(m, "row_schedule", None) is orig_sched or getattr(m, "_patched_sched", False):
            m.row_schedule = sched
            m._patched_sched = True
    try:
        got = gm(x)
        got = got[0] if isinstance(got, tuple) else got
        err = K.rel_err(got, want)
        with torch.no_grad():
            t = K.bench(K.graphed(lambda: gm(x)))
        rows_out.append({"elems": elems, "ept": ept, "rows_warps": sched(T, 4096), "TBps": nbytes / t / 1e9, "err": err})
        print("gen", rows_out[-1], flush=True)
    except Exception as e:  # noqa: BLE001
        print("gen fail", elems, ept, repr(e)[:200], flush=True)
pointwise.row_schedule = orig_sched
for m in list(sys.modules.values()):
    if getattr(m, "_patched_sched", False):
        m.row_schedule = orig_sched
res["rms_generated"] = rows_out
hand = []
y = torch.empty_like(x)
for rows, warps, evict in itertools.product([1, 2, 4], [4, 8, 16], [0, 1]):
    fn = lambda: _hand_rms[(triton.cdiv(T, rows),)](x, mod.weight, y, T, H, BLOCK=H, ROWS=rows, EVICT=evict, num_warps=warps)
    fn()
    t = K.bench(K.graphed(fn))
    hand.append({"rows": rows, "warps": warps, "evict": evict, "TBps": nbytes / t / 1e9, "err": K.rel_err(y, want)})
    print("hand", hand[-1], flush=True)
res["rms_hand"] = hand

# decode attention
attn_kernels.register()
orig_cfg = da.default_decode_config
dec = []
for (B, L, D) in [(1, 8192, 128), (1, 32768, 128), (32, 4096, 128), (1, 1024, 64), (1, 4096, 64), (8, 1024, 64), (64, 512, 64)]:
    Hq, Hkv, block = 32, 8, 16
    nb = B * L // block
    pool = torch.randn(1, 2, nb, block, Hkv, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nb, device="cuda", dtype=torch.int32).reshape(B, L // block)
    q = torch.randn(1, Hq, B, D, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    starts = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    kvb = 2 * B * L * Hkv * D * 2
    ref = attn_kernels.paged_attention(q, pool, 0, tables, seq_lens, starts, 1 / math.sqrt(D), True, 0, 0.0)
    default_splits = da.decode_num_splits(B, Hkv, L, torch.cuda.get_device_properties(0).multi_processor_count)
    best = None
    for (bn, warps), stages, splits in itertools.product([(64, 2), (64, 4), (32, 2), (32, 4), (128, 4), (128, 8)], [3], [1, 2, 4, 8, 16, 32, 64, 128]):
        if splits * 16 > L or (splits > 16 and B >= 32):
            continue
        da.default_decode_config = lambda hd, cuda, c=dict(BLOCK_N=bn, num_warps=warps, num_stages=stages): c
        call = lambda: attn_kernels.paged_attention(q, pool, 0, tables, seq_lens, starts, 1 / math.sqrt(D), True, 0, 0.0, num_splits=splits)
        try:
            got = call()
            err = K.rel_err(got, ref)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                call()
            t = K.bench(g.replay, warmup=10, rep=40)
        except Exception as e:  # noqa: BLE001
            print("dec fail", B, L, bn, warps, stages, splits, repr(e)[:120], flush=True)
            continue
        row = {"B": B, "L": L, "D": D, "BLOCK_N": bn, "warps": warps, "stages": stages, "splits": splits,
               "TBps": kvb / t / 1e9, "us": t * 1e3, "err": err}
        dec.append(row)
        if best is None or row["TBps"] > best["TBps"]:
            best = row
    da.default_decode_config = orig_cfg
    cur = [r for r in dec if r["B"] == B and r["L"] == L and r["D"] == D and r["splits"] == default_splits
           and (r["BLOCK_N"], r["warps"], r["stages"]) == ((64 if D <= 128 else 32), 2, 3)]
    print("DEC BEST", best, "CURRENT", cur, flush=True)
    top = sorted([r for r in dec if r["B"] == B and r["L"] == L and r["D"] == D], key=lambda r: -r["TBps"])[:8]
    for r in top:
        print("   top", r, flush=True)
    del pool
res["decode"] = dec
with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
