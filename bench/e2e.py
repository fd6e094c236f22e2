"""End-to-end generation benchmark on the GPU, every system measured in this one run.

    python bench/e2e.py [--models 1b 7b] [--out bench/results/e2e.json]
    python bench/e2e.py --tp 1 2 [--models 1b 7b]      # fusegen at tp=1 and tp=2, one process per GPU

Random-weight bf16 Llama configs (Llama-2-7B, Llama-3.2-1B). For each:
- decode ms/token at batch 1 (128 new tokens after a 32-token prompt, minus the prefill),
  with % of the roofline = weight bytes / measured copy bandwidth;
- time to first token for a 2048-token prompt;
- throughput on 64 requests, prompts of 32-512 tokens, 128 new tokens each;
- compile time (fusegen: `fusegen.compile`; the engine's pool + CUDA-graph setup apart);
for HF eager, HF static cache + torch.compile (generate compiles the forward itself), HF
`generate_batch` (throughput only) and fusegen. For fusegen also:
- decode ms/step at batch 64 (64 requests of 32-token prompts, 128 new tokens, minus the prefill);
- host versus GPU time per step kind (prefill / decode / mixed) from the engine's step log, for
  each measured phase: median host ms spent in `step()`, median GPU ms between the step's CUDA
  events, and the wall ms per step with wall / GPU where the wall time is known per step (the
  decode phases: (full - one) / NEW; a phase of one kind: its wall time over its steps). The
  target: decode wall per step <= 1.05x GPU busy time at batch 1 and at batch 64.
A short table is printed last.

``--variants bf16 weights=fp8 weights=int4 weights=fp8,kv_dtype=fp8`` measures fusegen once per
compile config (``bf16``: none added), each under the key ``fusegen`` or ``fusegen[CONFIG]``
with its own roofline (the bytes of the constants its graph reads: packed weights, scales) and
its decode and throughput ratios against the first variant.

With ``--tp 1 2`` only fusegen runs, at each tensor-parallel size, in that many processes
(one per GPU, torchrun's environment; rank 0 measures, the others follow its engine): the
same decode at batch 1 and 64, TTFT and 64-request workload, each with its ratio against
tp=1, saved to bench/results/e2e_tp.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import fusegen

CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=8192),
}
NEW = 128
ENGINE_CONFIG = "max_seq_len=4096,max_num_seqs=64,max_num_batched_tokens=4096"
DECODE_TARGET = 1.05  # decode wall per step over GPU busy time per step


def build(name: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=2)).eval()
    torch.set_default_dtype(torch.float32)
    return model


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = min(timed(lambda: y.copy_(x)) for _ in range(10))
    return 2 * x.numel() * 2 / t


def hf_decode(model, prompt, static: bool) -> dict:
    model.generation_config.cache_implementation = "static" if static else None
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([prompt], device="cuda")
    start = time.perf_counter()
    for _ in range(2):  # warm-up (and, with a static cache, compilation)
        model.generate(ids, max_new_tokens=NEW + 1, min_new_tokens=NEW + 1, **kw)
    warm = time.perf_counter() - start
    full = min(timed(lambda: model.generate(ids, max_new_tokens=NEW + 1, min_new_tokens=NEW + 1, **kw)) for _ in range(2))
    one = min(timed(lambda: model.generate(ids, max_new_tokens=1, **kw)) for _ in range(2))
    return {"decode_ms_per_token": (full - one) / NEW * 1e3, "ttft_short_ms": one * 1e3, "warmup_s": warm}


def hf_ttft(model, prompt) -> float:
    ids = torch.tensor([prompt], device="cuda")
    model.generation_config.cache_implementation = None
    model.generate(ids, max_new_tokens=1, pad_token_id=0)
    return min(timed(lambda: model.generate(ids, max_new_tokens=1, pad_token_id=0)) for _ in range(3)) * 1e3


def workload(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))] for _ in range(64)]


def hf_generate_batch(model, prompts) -> float | str:
    try:
        config = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
        model.generate_batch(inputs=prompts[:4], generation_config=config)
        t = timed(lambda: model.generate_batch(inputs=prompts, generation_config=config))
        return len(prompts) * NEW / t
    except Exception as exc:  # the API is young; record why it did not run
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def hf_padded(model, prompts) -> float:
    """HF generate on the 64 prompts as one left-padded batch (the plain-HF way)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    model.generation_config.cache_implementation = None
    kw = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    model.generate(ids[:8], attention_mask=mask[:8], max_new_tokens=4, pad_token_id=0)
    return len(prompts) * NEW / timed(lambda: model.generate(ids, **kw))


def reset_prefix_cache(engine) -> None:
    """Forget the engine's cached prefixes, so that a measurement computes its prompts again."""
    engine.kv.pool.reset_cache()


def step_summary(log) -> dict[str, dict]:
    """Per step kind of an engine's ``step_log``: steps, tokens and sequences per step, host ms
    spent in ``step()`` and GPU ms between the step's CUDA events (median, mean), and the share
    of steps that replayed a CUDA graph. Steps whose GPU time is not in yet are counted apart."""
    kinds: dict[str, list] = {}
    for rec in log:
        kinds.setdefault(rec.kind, []).append(rec)
    out = {}
    for kind, recs in sorted(kinds.items()):
        host = [r.host_ms for r in recs]
        gpu = [r.gpu_ms for r in recs if r.gpu_ms is not None]
        out[kind] = {"steps": len(recs),
                     "tokens_mean": statistics.fmean(r.num_tokens for r in recs),
                     "seqs_mean": statistics.fmean(r.num_seqs for r in recs),
                     "host_ms_median": statistics.median(host), "host_ms_mean": statistics.fmean(host),
                     "gpu_ms_median": statistics.median(gpu) if gpu else None,
                     "gpu_ms_mean": statistics.fmean(gpu) if gpu else None,
                     "gpu_ms_missing": len(recs) - len(gpu),
                     "graph_share": sum(bool(r.graph) for r in recs) / len(recs)}
    return out


def add_wall(summary: dict, kind: str, wall_ms_per_step: float) -> dict:
    """Record a kind's measured wall ms per step and its ratio to the median GPU ms per step."""
    if kind in summary:
        gpu = summary[kind]["gpu_ms_median"]
        summary[kind]["wall_ms_per_step"] = wall_ms_per_step
        summary[kind]["wall_over_gpu"] = wall_ms_per_step / gpu if gpu else None
    return summary


def timed_steps(engine, fn, reps: int, before=None) -> tuple[float, list]:
    """Best wall seconds of ``reps`` calls of ``fn`` and the engine's step records of that call;
    ``before`` (not timed) runs ahead of each call."""
    best, best_log = float("inf"), []
    for _ in range(reps):
        if before is not None:
            before()
        engine.step_log.clear()
        t = timed(fn)
        if t < best:
            best, best_log = t, list(engine.step_log)
    return best, best_log


def fusegen_decode(engine, prompts: list[list[int]], reset: bool) -> tuple[float, dict]:
    """Decode ms per step for ``prompts`` decoding together: (NEW + 1 tokens - 1 token) / NEW,
    with the step log of the NEW + 1 call; ``reset`` clears the prefix cache before each call so
    that every call computes its prefill."""
    before = (lambda: reset_prefix_cache(engine)) if reset else None
    engine.generate_batch(prompts, 4, eos_token_ids=[])  # warm-up: Triton compiles
    full, log = timed_steps(engine, lambda: engine.generate_batch(prompts, NEW + 1, eos_token_ids=[]), 2, before)
    one, _ = timed_steps(engine, lambda: engine.generate_batch(prompts, 1, eos_token_ids=[]), 2, before)
    ms = (full - one) / NEW * 1e3
    return ms, add_wall(step_summary(log), "decode", ms)


def compile_engine(model, config: str = ENGINE_CONFIG):
    """(compiled, engine, compile seconds, engine set-up seconds: KV pool and CUDA graphs)."""
    start = time.perf_counter()
    compiled = fusegen.compile(model, config)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = compiled.engine()  # KV pool + CUDA graphs for every step shape
    return compiled, engine, compile_s, time.perf_counter() - start


def fusegen_measures(model, prompts, long_prompt, short_prompt, config: str = ENGINE_CONFIG,
                     keep: bool = False) -> dict:
    """With tp > 1 in ``config``: rank 0's part (the other ranks follow its engine). ``keep``
    returns the compiled model too, under ``compiled``."""
    compiled, engine, compile_s, engine_s = compile_engine(model, config)
    try:
        out = engine_measures(engine, model.config.vocab_size, prompts, long_prompt, short_prompt)
    finally:
        if compiled.tp_group is not None:
            compiled.stop_followers()
    out = {"compile_s": compile_s, "engine_setup_s": engine_s, "engine_setup": engine.setup, **out}
    del engine
    return {**out, "compiled": compiled} if keep else out


def engine_measures(engine, vocab: int, prompts, long_prompt, short_prompt) -> dict:
    rng = random.Random(2)
    fresh = lambda: [rng.randrange(3, vocab) for _ in range(len(long_prompt))]  # no prefix-cache hits
    steps = {}
    decode_ms, steps["decode_b1"] = fusegen_decode(engine, [short_prompt], reset=False)
    engine.generate_batch([fresh()], 1)
    ttft_prompts = iter([fresh() for _ in range(3)])  # drawn before the timed calls
    ttft, log = timed_steps(engine, lambda: engine.generate_batch([next(ttft_prompts)], 1, eos_token_ids=[]), 3)
    steps["ttft_2048"] = step_summary(log)
    if len(steps["ttft_2048"]) == 1:  # one kind: wall per step is the wall time over its steps
        (kind, s), = steps["ttft_2048"].items()
        add_wall(steps["ttft_2048"], kind, ttft * 1e3 / s["steps"])
    engine.generate_batch(prompts, 8, eos_token_ids=[])  # warm-up: kernels for every batch shape
    # the timed run computes its prompts again
    t, log = timed_steps(engine, lambda: engine.generate_batch(prompts, NEW, eos_token_ids=[]), 1,
                         before=lambda: reset_prefix_cache(engine))
    steps["workload_64"] = step_summary(log)
    batch = [[rng.randrange(3, vocab) for _ in range(32)] for _ in range(64)]
    decode64_ms, steps["decode_b64"] = fusegen_decode(engine, batch, reset=True)
    return {"decode_ms_per_token": decode_ms, "ttft_2048_ms": ttft * 1e3,
            "throughput_tok_s": len(prompts) * NEW / t, "decode_b64_ms_per_step": decode64_ms, "steps": steps}


def inputs(vocab: int) -> tuple[list[int], list[int], list[list[int]]]:
    """The 32-token decode prompt, the 2048-token TTFT prompt and the 64-request workload."""
    rng = random.Random(1)
    short = [rng.randrange(3, vocab) for _ in range(32)]
    long_prompt = [rng.randrange(3, vocab) for _ in range(2048)]
    return short, long_prompt, workload(vocab)


def variant_key(variant: str) -> str:
    return "fusegen" if variant == "bf16" else f"fusegen[{variant}]"


def fusegen_variant(model, variant: str, bandwidth: float, inputs_) -> dict:
    """fusegen_measures under ENGINE_CONFIG plus ``variant``, with the roofline of the bytes
    its compiled graph reads as constants (the packed weights and their scales)."""
    from fusegen.quality import compiled_weight_bytes

    short, long_prompt, prompts = inputs_
    config = ENGINE_CONFIG + ("" if variant == "bf16" else "," + variant)
    out = fusegen_measures(model, prompts, long_prompt, short, config, keep=True)
    compiled = out.pop("compiled")
    weight_bytes = compiled_weight_bytes(compiled)
    del compiled
    gc.collect()  # the engine's pool and graphs go before the next variant sizes its own
    torch.cuda.empty_cache()
    return {"config": config, "weight_GB": weight_bytes / 1e9, "roofline_ms": weight_bytes / bandwidth * 1e3, **out}


def add_variant_ratios(out: dict, variants: list[str]) -> None:
    """Each variant's speed-up over the first: decode ms (batch 1 and 64) and 64-request tok/s."""
    base = out.get(variant_key(variants[0]))
    for v in variants[1:]:
        m = out.get(variant_key(v))
        if base and m:
            m["vs_" + variants[0]] = {"decode_b1": base["decode_ms_per_token"] / m["decode_ms_per_token"],
                                      "decode_b64": base["decode_b64_ms_per_step"] / m["decode_b64_ms_per_step"],
                                      "throughput": m["throughput_tok_s"] / base["throughput_tok_s"]}


def run(name: str, bandwidth: float, systems: set, variants: list[str] = ("bf16",), out: dict | None = None,
        save=lambda: None) -> dict:
    """One model's measurements, filled into ``out``; ``save`` runs after each system, so that a
    run cut short keeps what it measured."""
    model = build(name)
    vocab = model.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    short, long_prompt, prompts = inputs(vocab)
    out = {} if out is None else out
    out.update({"model": name, "weight_GB": weight_bytes / 1e9, "roofline_ms": weight_bytes / bandwidth * 1e3})
    with torch.no_grad():
        if "fusegen" in systems:
            for variant in variants:
                out[variant_key(variant)] = fusegen_variant(model, variant, bandwidth, (short, long_prompt, prompts))
                add_variant_ratios(out, list(variants))
                save()
        if "hf" in systems:
            out["hf_eager"] = hf_decode(model, short, static=False)
            out["hf_eager"]["ttft_2048_ms"] = hf_ttft(model, long_prompt)
            save()
        if "hf_compile" in systems:
            out["hf_static_compile"] = hf_decode(model, short, static=True)
            save()
        if "hf_batch" in systems:
            out["hf_generate_batch_tok_s"] = hf_generate_batch(model, prompts)
        if "hf" in systems:
            out["hf_padded_generate_tok_s"] = hf_padded(model, prompts)
    del model
    torch.cuda.empty_cache()
    return out


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_steps(steps: dict) -> None:
    """fusegen's host versus GPU time per step kind, one row per (phase, kind)."""
    print(f"  {'fusegen phase':13} {'kind':8} {'steps':>5} {'host ms':>8} {'GPU ms':>8} {'wall ms':>8} {'wall/GPU':>8}"
          "   (medians per step)")
    for phase, kinds in steps.items():
        for kind, s in kinds.items():
            ratio = s.get("wall_over_gpu")
            print(f"  {phase:13} {kind:8} {s['steps']:5d} {s['host_ms_median']:8.3f} "
                  f"{fmt(s['gpu_ms_median'], '.3f'):>8} {fmt(s.get('wall_ms_per_step'), '.3f'):>8} "
                  f"{fmt(ratio, '.3f') + ('x' if ratio else ''):>8}")
    ratios = [(b, steps[p].get("decode", {}).get("wall_over_gpu"))
              for b, p in (("1", "decode_b1"), ("64", "decode_b64"))]
    print("  decode wall / GPU busy per step: " + ", ".join(f"batch {b} {fmt(r, '.3f')}{'x' if r else ''}"
                                                        for b, r in ratios)
          + f" (target <= {DECODE_TARGET}x)")


# --- --tp: fusegen at each tensor-parallel size, one process per GPU --------------------------

TP_MEASURES = (("decode_ms_per_token", "decode b1 ms/tok", False), ("ttft_2048_ms", "TTFT 2048 ms", False),
               ("throughput_tok_s", "64 req tok/s", True), ("decode_b64_ms_per_step", "decode b64 ms/step", False))


def tp_rank(rank: int, tp: int, models: list[str], env: dict, out: str) -> None:
    """One rank of ``tp`` (spawned with torchrun's environment): rank 0 measures each model
    (as fusegen_measures does at tp=1) and writes its rows to ``out``; the others follow."""
    import os

    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    config = ENGINE_CONFIG + (f",tp={tp}" if tp > 1 else "")
    bandwidth = copy_bandwidth()
    rows = []
    for name in models:
        model = build(name)
        with torch.no_grad():
            if rank:
                fusegen.compile(model, config).follow()
            else:
                weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                short, long_prompt, prompts = inputs(model.config.vocab_size)
                rows.append({"model": name, "tp": tp, "weight_GB": weight_bytes / 1e9, "copy_TBps": bandwidth / 1e12,
                             "roofline_ms": weight_bytes / tp / bandwidth * 1e3,   # each GPU streams its 1/tp
                             **fusegen_measures(model, prompts, long_prompt, short, config)})
        del model
        torch.cuda.empty_cache()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f, default=str)


def spawn_tp(tp: int, models: list[str]) -> list[dict]:
    """Run ``tp_rank`` on ``tp`` spawned processes; rank 0's rows."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    from fusegen.distributed import free_port

    env = {"WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryDirectory(prefix="e2e-tp-") as folder:
        out = os.path.join(folder, "rank0.json")
        mp.start_processes(tp_rank, args=(tp, models, env, out), nprocs=tp, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def add_tp_ratios(rows: list[dict]) -> list[dict]:
    """Each row's ratio against the tp=1 row of its model: tp=1 time / time (a speed-up),
    or throughput / tp=1 throughput."""
    base = {r["model"]: r for r in rows if r["tp"] == 1}
    for r in rows:
        b = base.get(r["model"])
        r["vs_tp1"] = {key: None if b is None else (r[key] / b[key] if higher else b[key] / r[key])
                       for key, _, higher in TP_MEASURES}
    return rows


def print_tp(rows: list[dict]) -> None:
    print(f"{'model':5} {'tp':>2} " + " ".join(f"{label:>18} {'x tp1':>6}" for _, label, _ in TP_MEASURES)
          + "  % of roofline (b1)")
    for r in rows:
        cells = " ".join(f"{r[key]:18.2f} {fmt(r['vs_tp1'][key]) + ('x' if r['vs_tp1'][key] else ''):>6}"
                         for key, _, _ in TP_MEASURES)
        print(f"{r['model']:5} {r['tp']:2d} {cells}  {100 * r['roofline_ms'] / r['decode_ms_per_token']:.0f}%")
    print("x tp1: speed-up over tp=1 of the same model (tp > 1 steps eagerly: no CUDA graphs across ranks)")


def main_tp(models: list[str], tps: list[int], out: str) -> None:
    rows = add_tp_ratios([row for tp in tps for row in spawn_tp(tp, models)])
    results = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "tp": tps,
               "config": ENGINE_CONFIG, "rows": rows}
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"{results['device']} x {results['gpus']}, copy {rows[0]['copy_TBps']:.2f} TB/s per GPU; written to {out}")
    print_tp(rows)


def check_tp(tps: list[int] | None) -> None:
    """Exit with one line where this machine has fewer GPUs than the largest tp."""
    if tps and torch.cuda.device_count() < max(tps):
        sys.exit(f"bench/e2e.py: error: --tp {' '.join(map(str, tps))} needs {max(tps)} GPUs, "
                 f"this machine has {torch.cuda.device_count()}")


def main() -> None:
    parser = argparse.ArgumentParser(description="fusegen end-to-end benchmark (GPU)")
    parser.add_argument("--models", nargs="+", default=["1b", "7b"])
    parser.add_argument("--systems", nargs="+", default=["fusegen", "hf", "hf_compile", "hf_batch"])
    parser.add_argument("--tp", nargs="+", type=int, default=None, metavar="N",
                        help="fusegen only, at each tensor-parallel size (one process per GPU), with the "
                             "ratio against tp=1; --systems is ignored")
    parser.add_argument("--variants", nargs="+", default=["bf16"], metavar="CONFIG",
                        help="fusegen compile configs to measure, each added to the engine config "
                             "(bf16: none), e.g. bf16 weights=fp8 weights=int4 weights=fp8,kv_dtype=fp8")
    parser.add_argument("--out", default=None, help="default: bench/results/e2e.json, with --tp e2e_tp.json")
    args = parser.parse_args()
    if args.tp is not None and min(args.tp) < 1:
        parser.error(f"--tp values must be >= 1, got {' '.join(map(str, args.tp))}")
    if not torch.cuda.is_available():
        sys.exit("bench/e2e.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    check_tp(args.tp)
    if args.tp is not None:
        return main_tp(args.models, sorted(set(args.tp)), args.out or "bench/results/e2e_tp.json")
    args.out = args.out or "bench/results/e2e.json"
    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "copy_TBps": bandwidth / 1e12, "runs": []}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)

    for m in args.models:
        results["runs"].append({})
        run(m, bandwidth, set(args.systems), args.variants, results["runs"][-1], save)
        save()
    print(f"{results['device']}, copy {results['copy_TBps']:.2f} TB/s")
    for r in results["runs"]:
        print(f"== {r['model']}: weights {r['weight_GB']:.1f} GB, decode roofline {r['roofline_ms']:.2f} ms/token")
        keys = [variant_key(v) for v in args.variants]
        for key in (*keys, "hf_eager", "hf_static_compile"):
            m = r.get(key)
            if m:
                roofline = m.get("roofline_ms", r["roofline_ms"])
                pct = 100 * roofline / m["decode_ms_per_token"]
                extra = "".join(f", {k} {v:.1f}" for k, v in m.items() if k in ("ttft_2048_ms", "throughput_tok_s", "compile_s"))
                ratios = "".join(f", {k} {v:.2f}x" for k, v in m.get("vs_" + args.variants[0], {}).items())
                print(f"{key:18} decode {m['decode_ms_per_token']:.2f} ms/token ({pct:.0f}% of its roofline "
                      f"{roofline:.2f}){extra}{ratios}")
        for key in keys:
            if key in r:
                m = r[key]
                ms = m["decode_b64_ms_per_step"]
                print(f"{key:18} decode at batch 64 {ms:.2f} ms/step ({100 * m['roofline_ms'] / ms:.0f}% of the "
                      f"weight roofline), {64 / ms * 1e3:.0f} tok/s")
        for key in ("hf_generate_batch_tok_s", "hf_padded_generate_tok_s"):
            if key in r:
                print(f"{key:26} {r[key]}")
        for key in keys:
            if key in r:
                print(f"  {key}:")
                print_steps(r[key]["steps"])


if __name__ == "__main__":
    main()
