"""Host time per engine step on the CPU, against context length: what the engine itself
costs (schedule, staging, bookkeeping), with the model's forward and the sampling timed
apart, for a small random Llama (fp32).

    python bench/host_overhead.py [--contexts 16 256 1024 1900] [--batch 8] [--out FILE]

If any Python work per token were left on the step path, the engine's own time would grow
with the context; it should stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusegen


def timed_calls(obj, name: str, spent: list):
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out

    setattr(obj, name, wrapper)


def measure(compiled, context: int, batch: int, steps: int) -> dict:
    engine = compiled.engine(max_num_seqs=batch, max_num_batched_tokens=batch * context)
    inside: list[float] = []
    timed_calls(engine.runner, "forward", inside)
    timed_calls(engine, "_sample", inside)
    g = torch.Generator().manual_seed(context)
    for _ in range(batch):
        engine.add_request(torch.randint(3, 500, (context,), generator=g).tolist(), steps + 4, eos_token_ids=[])
    engine.step()
    engine.step()
    own, model = [], []
    for _ in range(steps):
        inside.clear()
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        model.append(sum(inside))
        own.append(total - sum(inside))
    return {"context": context, "batch": batch, "engine_ms_per_step": statistics.median(own) * 1e3,
            "model_and_sampling_ms_per_step": statistics.median(model) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 256, 1024, 1900])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench/results/host_overhead_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                         max_position_embeddings=2048)).eval()
    compiled = fusegen.compile(model, "block_size=16")
    rows = [measure(compiled, c, args.batch, args.steps) for c in args.contexts]
    print(f"{'context':>8} {'engine ms/step':>15} {'model+sampling ms/step':>23}")
    for r in rows:
        print(f"{r['context']:>8} {r['engine_ms_per_step']:>15.3f} {r['model_and_sampling_ms_per_step']:>23.3f}")
    with open(args.out, "w") as f:
        json.dump({"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
