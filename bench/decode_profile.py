"""Where a decode step's GPU time goes, kernel by kernel, on random-weight bf16 Llama configs.

    python bench/decode_profile.py [--models 1b 7b] [--batches 1 8 64] [--config K=V,...]
                                   [--out bench/results/decode_profile.json]

For each model and batch: a torch.profiler trace over 20 CUDA-graph decode steps gives the
kernels launched per step, the GPU busy time per step (union of kernel intervals) and, per
kernel name, its launches, time and share of the step. Rooflines use the copy rate measured
in the same run: the GEMMs against the bytes of every linear weight (read once per step),
the decode attention against the KV bytes of the batch's contexts, the whole step against
weights + KV. Where a step launches exactly one GEMM kernel per linear (the template, or
cuBLAS without split-K reduce kernels), each launch is matched to its linear in graph order
and the rows per linear shape give its TB/s and % of copy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusegen
from e2e import ENGINE_CONFIG, build, copy_bandwidth
from profile_engine import busy_ms

GEMM_NAMES = ("gemm", "gemv", "nvjet", "cutlass", "skinny", "splitk", "cublas", "sm90_xmma")
ATTENTION_NAMES = ("_decode_split_kernel", "_decode_reduce_kernel", "_paged_prefill_kernel", "flash")


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION_NAMES):
        return "attention"
    if any(k in low for k in GEMM_NAMES):
        return "gemm"
    if "fused_" in low:
        return "fused_group"
    if "kv_write" in low:
        return "kv_write"
    return "other"


def linears(gm) -> list[tuple[int, int, int]]:
    """(N, K, weight bytes) of every linear in graph order (routed or not)."""
    from fusegen.codegen.fused_gemm import FusedGemm

    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, FusedGemm):   # a linear with its prologue/epilogue groups
            weight = node.target._split(node.args)[1]
        elif getattr(node.target, "__name__", "") in ("linear", "linear.default"):
            weight = node.args[1]
        else:
            continue
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            w = gm
            for part in weight.target.split("."):
                w = getattr(w, part)
            out.append((w.shape[0], w.shape[1], w.numel() * w.element_size()))
    return out


def profile_batch(engine, model_cfg, gm, batch: int, copy: float) -> dict:
    vocab = model_cfg.vocab_size
    rng = random.Random(batch)
    for _ in range(batch):
        engine.add_request([rng.randrange(3, vocab) for _ in range(32)], 200, eos_token_ids=[])
    while len(engine.scheduler.running) < batch or any(r.remaining > 1 for r in engine.scheduler.running):
        engine.step()
    for _ in range(10):
        engine.step()
    steps = 20
    contexts = [r.num_computed + steps // 2 for r in engine.scheduler.running]   # mean over the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    busy, kernels = busy_ms(prof)
    busy /= steps
    # wall time per step without the profiler (host and GPU overlapped as in serving)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3 / steps
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_name: dict[str, list] = {}
    for e in events:
        row = per_name.setdefault(e.name, [0.0, 0])
        row[0] += (e.time_range.end - e.time_range.start) / 1e3
        row[1] += 1
    geom = engine.runner.geometry
    kv_bytes = sum(contexts) * geom.layers * 2 * geom.kv_heads * geom.head_dim * geom.dtype.itemsize
    shapes = linears(gm)
    weight_bytes = sum(b for _, _, b in shapes)
    class_ms: dict[str, float] = {}
    rows = []
    for name, (ms, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0]):
        cls = kernel_class(name)
        class_ms[cls] = class_ms.get(cls, 0.0) + ms / steps
        rows.append({"kernel": name[:100], "class": cls, "launches_per_step": n / steps,
                     "us_per_step": 1e3 * ms / steps, "share": ms / steps / busy})
    roofline_ms = (weight_bytes + kv_bytes) / copy * 1e3
    out = {"batch": batch, "context_tokens": sum(contexts), "kernels_per_step": kernels / steps,
           "gpu_busy_ms_per_step": busy, "wall_ms_per_step": wall, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
           "roofline_ms": roofline_ms, "pct_roofline": 100 * roofline_ms / busy,
           "class_ms_per_step": class_ms, "kernels": rows}
    if class_ms.get("gemm"):
        out["gemm_pct_copy"] = 100 * weight_bytes / (class_ms["gemm"] * 1e-3) / copy
    if class_ms.get("attention"):
        out["attention_pct_copy"] = 100 * kv_bytes / (class_ms["attention"] * 1e-3) / copy
    # One step's GEMM launches in order, matched to the graph's linears when the counts agree.
    first = events[:round(len(events) / steps)]
    gemm_launches = [e for e in first if kernel_class(e.name) == "gemm"]
    if len(gemm_launches) == len(shapes):
        per_shape: dict[tuple, list] = {}
        for (N, K, nbytes), e in zip(shapes, gemm_launches):
            acc = per_shape.setdefault((N, K), [0.0, 0, nbytes, e.name[:60]])
            acc[0] += (e.time_range.end - e.time_range.start)
            acc[1] += 1
        out["linears"] = [{"N": N, "K": K, "launches": n, "kernel": name, "us": us / n,
                           "TBps": nbytes / (us / n * 1e-6) / 1e12, "pct_copy": 100 * nbytes / (us / n * 1e-6) / copy}
                          for (N, K), (us, n, nbytes, name) in per_shape.items()]
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["1b", "7b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--config", default="", help="extra compile config, e.g. fuse_pointwise=0")
    parser.add_argument("--out", default="bench/results/decode_profile.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_profile.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    copy = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "copy_TBps": copy / 1e12, "models": {}}
    for name in args.models:
        model = build(name)
        config = ENGINE_CONFIG + ("," + args.config if args.config else "")
        compiled = fusegen.compile(model, config)
        engine = compiled.engine()
        gm = engine.runner.graph_gm
        entry = {"config": config, "gemm_table": engine.setup.get("gemm", []),
                 "gemm_fusion": engine.setup.get("gemm_fusion", {}), "batches": []}
        for row in entry["gemm_fusion"].get("calls", []):
            print(f"  {row['call'][:40]:40s} M{row['M']:<3} fused {row['fused_us']:7.1f} us, unfused {row['unfused_us']:7.1f} us"
                  f" -> {row['chosen']}", flush=True)
        for b in args.batches:
            r = profile_batch(engine, model.config, gm, b, copy)
            entry["batches"].append(r)
            print(f"{name} b{b}: {r['kernels_per_step']:.0f} kernels/step, wall {r['wall_ms_per_step']:.3f} ms/step, GPU busy {r['gpu_busy_ms_per_step']:.3f} ms "
                  f"(roofline {r['roofline_ms']:.3f} ms = {r['pct_roofline']:.0f}%), "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["class_ms_per_step"].items(), key=lambda kv: -kv[1]))
                  + (f"; GEMMs {r['gemm_pct_copy']:.0f}% of copy" if "gemm_pct_copy" in r else ""), flush=True)
            for lin in r.get("linears", []):
                print(f"    N{lin['N']} K{lin['K']}: {lin['us']:.1f} us {lin['TBps']:.2f} TB/s "
                      f"({lin['pct_copy']:.0f}% of copy) {lin['kernel']}")
        result["models"][name] = entry
        del engine, compiled, model
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
