"""Steady decode on the CPU: fusegen's engine against HF eager ``generate``, both measured in
this one run, on the bundled model (SmolLM2-135M-Instruct, fp32).

    python bench/cpu.py [--new-tokens 32] [--rounds 5] [--threads N] [--out bench/results/cpu.json]

Both decode greedily from the same prompt, after a warm-up. HF's step times come from a
logits processor that stamps the clock at every step; the engine's from its ``step()``
calls once the prompt is in the cache. Steady decode tok/s = steps / time between the first
and the last decode step (the prefill is left out). The rounds alternate HF and fusegen so
that a machine whose load changes during the run shifts both alike; the figures are the
medians over rounds, and the ratio is fusegen / HF per round, then its median.

Against the hardware: every decode step reads all weights once, so weight bytes per step /
the step time is the achieved bandwidth, printed as a share of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fusegen
from fusegen.models import DEFAULT_MODEL, load_model, load_tokenizer

PROMPT = "The capital of France is"
TARGET = 1.5  # fusegen steady decode tok/s over HF eager's


class _Stamps:
    """A logits processor that records when each generation step reaches it."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def steady_rate(times: list[float]) -> float:
    """Tokens per second over consecutive step stamps (the first stamp ends the prefill)."""
    return (len(times) - 1) / (times[-1] - times[0])


def hf_decode(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, temperature=None, top_p=None,
                             top_k=None, logits_processor=LogitsProcessorList([stamps]),
                             pad_token_id=model.generation_config.eos_token_id)
    return steady_rate(stamps.times), out[0, len(ids):].tolist()


def hf_greedy_reference(model, ids: list[int], new: int) -> list[int]:
    """HF's own greedy continuation, stopping at eos. The timed runs force ``new`` tokens
    (HF by suppressing eos with min_new_tokens, the engine by ignoring it), so past an eos
    their choices differ by construction; tokens are compared against this one instead."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def fusegen_decode(compiled, ids: list[int], new: int) -> tuple[float, list[int]]:
    block = compiled.facts["kv"].block_size
    engine = compiled.engine(num_blocks=-(-(len(ids) + new) // block), max_num_seqs=1,
                             max_num_batched_tokens=len(ids))
    engine.add_request(ids, new, eos_token_ids=[])
    tokens, times = [], []
    while engine.has_unfinished():
        events = engine.step()
        if events:
            times.append(time.perf_counter())
        tokens.extend(e.token for e in events)
    return steady_rate(times), tokens


def copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB tensor copy (read + write), best of five."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every distinct parameter once (tied embeddings count once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)   # a benchmark script, not the library

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    ids = tokenizer(PROMPT).input_ids
    start = time.perf_counter()
    compiled = fusegen.compile(model, progress=True)
    compile_s = time.perf_counter() - start

    hf_decode(model, ids, 4)              # warm-up
    fusegen_decode(compiled, ids, 4)
    rounds = []
    for r in range(args.rounds):
        hf_rate, _ = hf_decode(model, ids, args.new_tokens)
        fg_rate, fg_tokens = fusegen_decode(compiled, ids, args.new_tokens)
        rounds.append({"hf_tok_s": hf_rate, "fusegen_tok_s": fg_rate, "ratio": fg_rate / hf_rate})
        print(f"round {r}: HF eager {hf_rate:6.2f} tok/s   fusegen {fg_rate:6.2f} tok/s   "
              f"ratio {fg_rate / hf_rate:.2f}", file=sys.stderr)
    reference = hf_greedy_reference(model, ids, args.new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(reference, fg_tokens)) if a != b), None)

    hf = statistics.median(r["hf_tok_s"] for r in rounds)
    fg = statistics.median(r["fusegen_tok_s"] for r in rounds)
    ratio = statistics.median(r["ratio"] for r in rounds)
    bandwidth, weights = copy_bandwidth(), weight_bytes(model)
    result = {
        "model": args.model, "model_class": compiled.report.model_class, "dtype": str(compiled.facts["dtype"]),
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": rounds,
        "hf_eager_tok_s": hf, "fusegen_tok_s": fg, "ratio": ratio, "target_ratio": TARGET,
        "meets_target": ratio >= TARGET,
        "greedy_tokens_identical": same is None, "first_divergence": same,
        "greedy_tokens_compared": len(reference),
        "weight_bytes": weights, "copy_bandwidth_gb_s": bandwidth / 1e9,
        "hf_bandwidth_share": hf * weights / bandwidth, "fusegen_bandwidth_share": fg * weights / bandwidth,
        "compile_s": compile_s, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    print(f"{compiled.report.model_class} fp32, {len(ids)}-token prompt, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"  HF eager generate   {hf:7.2f} tok/s   {result['hf_bandwidth_share']:6.1%} of "
          f"{bandwidth / 1e9:.1f} GB/s copy bandwidth ({weights / 2**20:.0f} MiB of weights per step)")
    print(f"  fusegen engine      {fg:7.2f} tok/s   {result['fusegen_bandwidth_share']:6.1%}")
    print(f"  ratio               {ratio:7.2f}x   (target >= {TARGET}x: "
          f"{'met' if ratio >= TARGET else 'NOT met'}); greedy tokens "
          f"{'identical' if same is None else f'differ from token {same}'} over HF's "
          f"{len(reference)} (to its eos)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
