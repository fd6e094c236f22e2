"""Where an engine step's time goes on the GPU: torch.profiler over the 64-request workload
of bench/e2e.py on the Llama-3.2-1B config (random bf16 weights).

    python bench/profile_engine.py [--model 1b] [--requests 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusegen
from e2e import NEW, build, workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    model = build(args.model)
    compiled = fusegen.compile(model, "max_seq_len=4096,max_num_seqs=64,max_num_batched_tokens=4096")
    engine = compiled.engine()
    prompts = workload(model.config.vocab_size)[: args.requests]
    engine.generate_batch(prompts[:8], 8, eos_token_ids=[])
    for p in prompts:
        engine.add_request(p, NEW, eos_token_ids=[])
    steps, kinds = [], []
    while engine.has_unfinished():
        torch.cuda.synchronize()
        start = time.perf_counter()
        events = engine.step()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
        kinds.append(len(events))
    decode = [t for t, n in zip(steps, kinds) if n == len(prompts)]
    print(f"{len(steps)} steps, {sum(steps):.2f} s; full decode steps: {len(decode)}, "
          f"median {sorted(decode)[len(decode) // 2] * 1e3:.2f} ms" if decode else "")
    for p in prompts:
        engine.add_request(p, 32, eos_token_ids=[])
    while len(engine.step()) < len(prompts):  # until every request is decoding
        pass
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
