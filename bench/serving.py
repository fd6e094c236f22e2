"""Serving benchmark on the GPU: TTFT, TPOT and throughput under Poisson arrivals.

Measured the way inference servers are (vLLM's benchmark_serving), with HF's continuous
batching measured in the same run as the baseline.

    python bench/serving.py [--model 1b|7b] [--requests 200] [--rates 8 16 32] [--seed 0]
                            [--hf-requests N] [--http] [--out bench/results/serving_<model>.json]
    python bench/serving.py --url http://127.0.0.1:8000 --served-model NAME [--model 1b] [...]

A random-weight bf16 Llama config (bench/e2e.py's). One request set drawn from --seed: prompt
lengths uniform in 32-2048, output lengths uniform in 16-512, random token ids, eos disabled.
For each rate (requests per second, Poisson arrivals; "inf" = all at once, always run) a
single-threaded driver adds each request once its arrival time has passed, calls
`engine.step()`, and stamps every token as it comes back. Per rate:
- TTFT (scheduled arrival to first token), TPOT ((last - first token) / (n - 1) per request),
  ITL (gaps between consecutive tokens of a request), end-to-end latency: mean, p50, p99 ms;
- output tok/s, total (prompt + output) tok/s and requests/s over the run's duration;
- host ms per step against GPU ms per step, per step kind, from the engine's step log.
The engine is warmed up first and its prefix cache cleared before each rate. Baseline: HF
`generate_batch`'s continuous-batching manager on the same requests all at once, each with
its own max_new_tokens (`generate_batch` takes one length for all; its manager takes one per
request).

The HTTP path: ``--http`` then serves the same engine with ``fusegen.serve`` on 127.0.0.1
(a word-level tokenizer over the model's vocabulary stands in for a real one, so every
token is detokenized and streamed) and replays every rate through it from a client in
another process (bench/http_driver.py: streamed /v1/completions, token-id prompts, tokens
stamped on arrival at the client), reporting HTTP over in-process output tok/s per rate.
``--url`` drives a server that is already running instead (prompts drawn from --model's
vocabulary) and reports the same statistics for it alone. About 3 minutes on an H200 for 1b with the defaults (estimate: engine set-up about
a minute, the rates about 50 s, HF about 80 s at the 650 tok/s bench/e2e.py measured; set
--requests / --hf-requests to trade length for spread). A short table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from e2e import CONFIGS, ENGINE_CONFIG, build, compile_engine, copy_bandwidth, reset_prefix_cache, step_summary  # same as e2e

PROMPT_LEN = (32, 2048)
OUTPUT_LEN = (16, 512)
DEFAULT_RATES = {"1b": [8.0, 16.0, 32.0], "7b": [2.0, 4.0, 8.0]}  # below, near and at saturation


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Trace:
    """One run of a request set: seconds from the run's start."""
    arrivals: list[float]
    token_times: list[list[float]]  # per request, one entry per output token
    prompt_tokens: int


def make_requests(n: int, vocab: int, seed, output_len=OUTPUT_LEN) -> list[Request]:
    rng = random.Random(seed)
    return [Request([rng.randrange(3, vocab) for _ in range(rng.randint(*PROMPT_LEN))], rng.randint(*output_len))
            for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed) -> list[float]:
    """Arrival offsets in seconds: the first at 0, then exponential gaps of mean 1 / rate;
    all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    out = [0.0]
    for _ in range(n - 1):
        out.append(out[-1] + rng.expovariate(rate))
    return out


def drive(engine, requests: list[Request], arrivals: list[float]) -> Trace:
    """Feed ``requests`` to ``engine`` on the ``arrivals`` schedule from one thread and stamp
    every token when ``step()`` hands it back (events come one step late, as a client sees them)."""
    token_times: list[list[float]] = [[] for _ in requests]
    index: dict[int, int] = {}
    added = 0
    start = time.perf_counter()
    while added < len(requests) or engine.has_unfinished():
        now = time.perf_counter() - start
        while added < len(requests) and arrivals[added] <= now:
            r = requests[added]
            index[engine.add_request(r.prompt, r.max_new_tokens, eos_token_ids=[])] = added
            added += 1
        if not engine.has_unfinished():
            if added < len(requests):  # idle until the next arrival
                time.sleep(max(0.0, arrivals[added] - (time.perf_counter() - start)))
            continue
        events = engine.step()
        now = time.perf_counter() - start
        for event in events:
            token_times[index[event.request_id]].append(now)
    return checked_trace("fusegen", requests, list(arrivals), token_times)


def checked_trace(system: str, requests: list[Request], arrivals: list[float], token_times) -> Trace:
    """The run's trace, once every request got exactly its max_new_tokens (eos is disabled)."""
    short = [(i, len(t), r.max_new_tokens) for i, (t, r) in enumerate(zip(token_times, requests))
             if len(t) != r.max_new_tokens]
    if short:
        raise RuntimeError(f"{system}: {len(short)} of {len(requests)} requests got another token count than "
                           f"asked (request, got, asked): {short[:5]}")
    return Trace(arrivals, token_times, sum(len(r.prompt) for r in requests))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"mean": statistics.fmean(ms) if ms else None, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def latency_stats(trace: Trace) -> dict:
    """TTFT, TPOT, ITL and end-to-end latency (ms) and throughputs of one run."""
    times = trace.token_times
    duration = max(t[-1] for t in times if t)
    outputs = sum(len(t) for t in times)
    return {
        "requests": len(times), "duration_s": duration, "output_tokens": outputs,
        "request_throughput": len(times) / duration, "output_tok_s": outputs / duration,
        "total_tok_s": (outputs + trace.prompt_tokens) / duration,
        "ttft_ms": spread_ms([t[0] - a for t, a in zip(times, trace.arrivals)]),
        "tpot_ms": spread_ms([(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]),
        "itl_ms": spread_ms([b - a for t in times for a, b in zip(t, t[1:])]),
        "e2e_ms": spread_ms([t[-1] - a for t, a in zip(times, trace.arrivals)]),
    }


def run_rate(engine, requests: list[Request], rate: float, seed) -> dict:
    arrivals = poisson_arrivals(len(requests), rate, f"arrivals-{seed}-{rate}")
    reset_prefix_cache(engine)  # no prefix reuse from an earlier rate
    engine.step_log.clear()
    counters = Counter(getattr(engine, "stats", None) or {})  # scheduler counters, where the engine has them
    out = {"rate": rate if math.isfinite(rate) else "inf", **latency_stats(drive(engine, requests, arrivals))}
    out["steps"] = step_summary(list(engine.step_log))
    out["engine_stats"] = dict(Counter(getattr(engine, "stats", None) or {}) - counters)
    return out


def bench_tokenizer(vocab: int):
    """A word-level tokenizer with one word per id ("t0 t1 ..."), so that the server detokenizes
    and streams every token as it would with a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def http_rate(url: str, name: str, requests: list[Request], rate: float, seed) -> dict:
    from http_driver import run_in_subprocess

    arrivals = poisson_arrivals(len(requests), rate, f"arrivals-{seed}-{rate}")
    times = run_in_subprocess(url, name, [(r.prompt, r.max_new_tokens) for r in requests], arrivals)
    trace = checked_trace("http", requests, arrivals, times)
    return {"rate": rate if math.isfinite(rate) else "inf", **latency_stats(trace)}


def http_serving(engine, vocab: int, requests: list[Request], rates: list[float], seed) -> dict:
    """The same rates through the HTTP server on this engine, started here in a thread."""
    import socket
    import threading

    import uvicorn
    from http_driver import wait_ready

    from fusegen.serve.app import ServedModel, build_app
    from fusegen.serve.main import SWITCH_INTERVAL_S

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = build_app(ServedModel("bench", engine, bench_tokenizer(vocab)))
    sys.setswitchinterval(SWITCH_INTERVAL_S)   # as `fusegen-cli serve` does
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        out = []
        for rate in rates:
            reset_prefix_cache(engine)
            out.append(http_rate(url, "bench", requests, rate, seed))
        return {"rates": out}
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def fusegen_serving(model, requests: list[Request], rates: list[float], seed, hf_requests: int,
                    http: bool = False) -> dict:
    _, engine, compile_s, engine_s = compile_engine(model)
    # Warm-up: prefill, mixed and decode steps at every batch size down from 64 (outputs differ).
    warm = make_requests(64, model.config.vocab_size, f"warm-up-{seed}", output_len=(4, 64))
    start = time.perf_counter()
    drive(engine, warm, [0.0] * len(warm))
    warm_s = time.perf_counter() - start
    out = {"compile_s": compile_s, "engine_setup_s": engine_s, "engine_setup": engine.setup, "warmup_s": warm_s,
           "rates": [run_rate(engine, requests, rate, seed) for rate in rates]}
    if 0 < hf_requests < len(requests):  # the baseline's own subset, all at once, for a like-for-like ratio
        out["subset"] = run_rate(engine, requests[:hf_requests], math.inf, seed)
    if http:
        out["http"] = http_serving(engine, model.config.vocab_size, requests, rates, seed)
        for direct, served in zip(out["rates"], out["http"]["rates"]):
            served["over_in_process"] = served["output_tok_s"] / direct["output_tok_s"]
    return out


def hf_collect(manager, count: int) -> dict:
    results = {}
    while len(results) < count:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"HF generation thread stopped with {len(results)} of {count} requests done")
        elif result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"HF request {result.request_id}: {result.error}")
            results[result.request_id] = result
    return results


def hf_once(model, requests: list[Request], config: GenerationConfig, hints, keep: bool) -> tuple[Trace, float]:
    """All ``requests`` at once through HF's continuous-batching manager (what generate_batch
    runs), each with its own max_new_tokens; token times from HF's own per-token stamps. With
    ``keep`` the manager (its cache and captured CUDA graphs) stays on the model for the next call."""
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=5,
                                                   workload_hints=hints, persistent_manager=keep) as manager:
        setup_s = time.perf_counter() - start  # a new manager's cache and CUDA-graph warm-up
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt, max_new_tokens=r.max_new_tokens, eos_token_id=-1, record_timestamps=True)
               for r in requests]
        results = hf_collect(manager, len(ids))
    times = [[ts - start for ts in results[i].timestamps] for i in ids]
    return checked_trace("HF", requests, [0.0] * len(requests), times), setup_s


def hf_baseline(model, requests: list[Request]) -> dict | str:
    """HF on ``requests`` all at once, after a warm-up on 8 of them (16 tokens each) with the same
    manager (sized for all), as fusegen's engine is warm; the manager's own set-up is reported apart."""
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        config = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in requests), do_sample=False,
                                  eos_token_id=None, pad_token_id=0)  # eos None: HF sets -1, disabled
        hints = WorkloadHints(max_prompt_length=max(len(r.prompt) for r in requests),
                              max_generated_length=config.max_new_tokens, num_requests=len(requests))
        try:
            warm = [Request(r.prompt, min(r.max_new_tokens, 16)) for r in requests[:8]]
            _, setup_s = hf_once(model, warm, config, hints, keep=True)
            trace, _ = hf_once(model, requests, config, hints, keep=False)
        finally:
            model.destroy_cached_continuous_batching_manager()
        return {"manager_setup_s": setup_s, **latency_stats(trace)}
    except Exception as exc:  # the API is young; record why it did not run
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def p50_p99(spread: dict, spec: str, scale: float = 1.0) -> str:
    return "/".join(fmt(None if spread[p] is None else spread[p] * scale, spec) for p in ("p50", "p99"))


def print_table(results: dict) -> None:
    w = results["workload"]
    print(f"{results['device']}, copy {results['copy_TBps']:.2f} TB/s; {results['model']}: weights "
          f"{results['weight_GB']:.2f} GB, decode floor {results['roofline_ms']:.2f} ms/step (weights / copy rate)")
    print(f"{w['requests']} requests, prompts {PROMPT_LEN[0]}-{PROMPT_LEN[1]} (mean {w['prompt_mean']:.0f}), "
          f"outputs {OUTPUT_LEN[0]}-{OUTPUT_LEN[1]} (mean {w['output_mean']:.0f}), seed {w['seed']}")
    print(f"{'rate/s':>7} {'req/s':>6} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'E2E p50/p99 s':>14}")
    rows = [(str(r["rate"]), r) for r in results["fusegen"]["rates"]]
    if "subset" in results["fusegen"]:
        rows.append((f"inf/{results['fusegen']['subset']['requests']}", results["fusegen"]["subset"]))
    if isinstance(results["hf"], dict):
        rows.append(("HF inf", results["hf"]))
    for name, r in rows:
        print(f"{name:>7} {r['request_throughput']:6.1f} {r['output_tok_s']:9.0f} {p50_p99(r['ttft_ms'], '.0f'):>17} "
              f"{p50_p99(r['tpot_ms'], '.2f'):>16} {p50_p99(r['itl_ms'], '.2f'):>15} "
              f"{p50_p99(r['e2e_ms'], '.1f', 1e-3):>14}")
    print(f"{'rate/s':>7} {'kind':8} {'steps':>6} {'tokens':>7} {'host ms med/mean':>17} {'GPU ms med/mean':>16} "
          f"{'graph':>6}")
    for r in results["fusegen"]["rates"]:
        for kind, s in r["steps"].items():
            print(f"{str(r['rate']):>7} {kind:8} {s['steps']:6d} {s['tokens_mean']:7.0f} "
                  f"{s['host_ms_median']:8.2f}/{s['host_ms_mean']:<8.2f} "
                  f"{fmt(s['gpu_ms_median'], '.2f'):>7}/{fmt(s['gpu_ms_mean'], '.2f'):<8} {s['graph_share']:6.0%}")
    for r in results["fusegen"].get("http", {}).get("rates", []):
        print(f"HTTP {str(r['rate']):>6}: {r['output_tok_s']:.0f} out tok/s = {r['over_in_process']:.1%} of "
              f"in-process; TTFT p50/p99 {p50_p99(r['ttft_ms'], '.0f')} ms, TPOT p50/p99 "
              f"{p50_p99(r['tpot_ms'], '.2f')} ms")
    hf = results["hf"]
    if isinstance(hf, dict):
        print(f"all at once, {hf['requests']} requests: fusegen {results['ratio_basis_tok_s']:.0f} out tok/s, "
              f"HF generate_batch {hf['output_tok_s']:.0f} out tok/s: fusegen/HF {results['fusegen_over_hf']:.1f}x")
    else:
        print(f"HF generate_batch did not run: {hf}")


def drive_url(args) -> int:
    """``--url``: the request set (from --model's vocabulary) at each rate against a running server."""
    from http_driver import wait_ready

    wait_ready(args.url, timeout=10)
    requests = make_requests(args.requests, CONFIGS[args.model]["vocab_size"], args.seed)
    rates = sorted(set(args.rates or DEFAULT_RATES[args.model]) | {math.inf})
    results = {"url": args.url, "model": args.served_model,
               "rates": [http_rate(args.url, args.served_model, requests, rate, args.seed) for rate in rates]}
    out_path = args.out or "bench/results/serving_url.json"
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    for r in results["rates"]:
        print(f"{str(r['rate']):>6}/s: {r['output_tok_s']:.0f} out tok/s, TTFT p50/p99 "
              f"{p50_p99(r['ttft_ms'], '.0f')} ms, TPOT p50/p99 {p50_p99(r['tpot_ms'], '.2f')} ms")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="1b")
    parser.add_argument("--requests", type=int, default=200, help="requests per rate (default 200)")
    parser.add_argument("--rates", type=float, nargs="+",
                        help="Poisson request rates per second; inf (all at once) is always added "
                             "(default: 8 16 32 for 1b, 2 4 8 for 7b)")
    parser.add_argument("--seed", type=int, default=0, help="request set and arrivals (default 0)")
    parser.add_argument("--hf-requests", type=int, help="HF baseline on the first N requests (default: all; 0 skips)")
    parser.add_argument("--http", action="store_true",
                        help="also replay every rate through fusegen.serve on the same engine, over HTTP")
    parser.add_argument("--url", help="drive this already-running OpenAI-compatible server instead")
    parser.add_argument("--served-model", default="smollm2", help="the model name to send with --url")
    parser.add_argument("--out", help="JSON results (default bench/results/serving_<model>.json)")
    args = parser.parse_args()
    if args.url:
        sys.exit(drive_url(args))
    if args.requests < 1 or any(not r > 0 for r in args.rates or []):
        parser.error(f"--requests must be >= 1 and --rates > 0 (got {args.requests}, {args.rates})")
    if not torch.cuda.is_available():
        sys.exit("bench/serving.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
    rates = sorted(set(args.rates or DEFAULT_RATES[args.model]) | {math.inf})
    hf_requests = args.requests if args.hf_requests is None else min(args.hf_requests, args.requests)
    out_path = args.out or f"bench/results/serving_{args.model}.json"
    bandwidth = copy_bandwidth()
    model = build(args.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    requests = make_requests(args.requests, model.config.vocab_size, args.seed)
    results = {"device": torch.cuda.get_device_name(), "copy_TBps": bandwidth / 1e12, "model": args.model,
               "weight_GB": weight_bytes / 1e9, "roofline_ms": weight_bytes / bandwidth * 1e3,
               "engine_config": ENGINE_CONFIG,
               "workload": {"requests": len(requests), "seed": args.seed, "prompt_len": PROMPT_LEN,
                            "output_len": OUTPUT_LEN, "prompt_mean": statistics.fmean(len(r.prompt) for r in requests),
                            "output_mean": statistics.fmean(r.max_new_tokens for r in requests)}}
    with torch.no_grad():
        results["fusegen"] = fusegen_serving(model, requests, rates, args.seed, hf_requests, args.http)
        gc.collect()
        torch.cuda.empty_cache()  # the engine's pool and graphs go before HF sizes its cache
        results["hf_start_allocated_GB"] = torch.cuda.memory_allocated() / 1e9
        results["hf"] = hf_baseline(model, requests[:hf_requests]) if hf_requests else "skipped (--hf-requests 0)"
    if isinstance(results["hf"], dict):
        basis = results["fusegen"].get("subset") or results["fusegen"]["rates"][-1]  # inf sorts last
        results["ratio_basis_tok_s"] = basis["output_tok_s"]
        results["fusegen_over_hf"] = basis["output_tok_s"] / results["hf"]["output_tok_s"]
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print_table(results)


if __name__ == "__main__":
    main()
