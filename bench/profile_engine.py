"""Where an engine step's time goes: host versus GPU per step kind, and a torch.profiler view
of decode steps, on a random-weight bf16 Llama config, with the kernels of one step in
launch order.

    python bench/profile_engine.py [--model 1b] [--requests 64] [--out bench/results/profile_1b.json]

For decode at batch 1 and at batch ``--requests`` and for a fresh 2048-token prefill:
wall time per step (CUDA-synchronised host clock over many steps), the engine's own
per-step host time and GPU time (events around each step's GPU work), and, from the
profiler, the GPU busy time per step (the union of kernel intervals) and kernels per step.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusegen
from e2e import build


def top_kernels(prof, per: int, count: int = 15) -> list[dict]:
    """The kernels with the most GPU time in a profile, in ms and launches per ``per`` steps."""
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(e.name[:90], [0.0, 0])
            entry[0] += (e.time_range.end - e.time_range.start) / 1e3
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
    return [{"kernel": name, "ms_per_step": round(ms / per, 4), "launches_per_step": n / per}
            for name, (ms, n) in ranked]


def kernel_sequence(prof, per: int) -> list[list]:
    """The first step's kernels in launch order: [name, microseconds], of a profile over
    ``per`` equal steps (what a step runs, to find copies and launches to remove)."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    first = kernels[:round(len(kernels) / per)]
    return [[e.name[:70], round(e.time_range.end - e.time_range.start, 1)] for e in first]


def busy_ms(prof) -> tuple[float, int]:
    """Union of the GPU kernel intervals (ms) and the kernel count in a profile."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3, len(spans)


def decode_steps(engine, prompts, steps: int) -> dict:
    for p in prompts:
        engine.add_request(p, steps + 40, eos_token_ids=[])
    while len(engine.scheduler.running) < len(prompts) or any(r.remaining > 1 for r in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    engine.step_log.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    busy, kernels = busy_ms(prof)
    log = [r for r in engine.step_log if r.kind == "decode" and r.gpu_ms is not None][:steps]
    out = {"batch": len(prompts), "wall_ms_per_step": wall, "gpu_busy_ms_per_step": busy / 20,
           "kernels_per_step": kernels / 20,
           "engine_host_ms": statistics.median(r.host_ms for r in log),
           "engine_gpu_ms": statistics.median(r.gpu_ms for r in log),
           "graph_steps": sum(r.graph for r in log), "steps": len(log),
           "top_kernels": top_kernels(prof, 20), "kernel_sequence": kernel_sequence(prof, 20)}
    out["wall_over_busy"] = out["wall_ms_per_step"] / out["gpu_busy_ms_per_step"]
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return out


def prefill(engine, vocab: int, length: int) -> dict:
    rng = random.Random(5)
    fresh = lambda: [rng.randrange(3, vocab) for _ in range(length)]
    engine.generate_batch([fresh()], 1, eos_token_ids=[])
    times = []
    for _ in range(5):
        prompt = fresh()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate_batch([prompt], 1, eos_token_ids=[])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate_batch([fresh()], 1, eos_token_ids=[])
        torch.cuda.synchronize()
    busy, kernels = busy_ms(prof)
    record = engine.step_log[-1]
    return {"tokens": length, "ttft_ms": statistics.median(times), "gpu_busy_ms": busy, "kernels": kernels,
            "engine_host_ms": record.host_ms, "engine_gpu_ms": record.gpu_ms, "graph": record.graph,
            "top_kernels": top_kernels(prof, 1), "kernel_sequence": kernel_sequence(prof, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/profile_engine.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    model = build(args.model)
    vocab = model.config.vocab_size
    compiled = fusegen.compile(model, "max_seq_len=4096,max_num_seqs=64,max_num_batched_tokens=4096")
    engine = compiled.engine()
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(3, vocab) for _ in range(32)]
    results = {"device": torch.cuda.get_device_name(), "model": args.model, "setup": engine.setup,
               "decode_b1": decode_steps(engine, [prompt()], 100),
               f"decode_b{args.requests}": decode_steps(engine, [prompt() for _ in range(args.requests)], 50),
               "prefill_2048": prefill(engine, vocab, 2048)}
    results["setup"]["buckets"] = [list(b) for b in results["setup"]["buckets"]]
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
