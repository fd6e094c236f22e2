"""Speculative decoding against plain decode, both measured in this one run.

    python bench/speculative.py [--models 7b 1b] [--batches 1 4 16] [--k 4] [--out bench/results/speculative.json]
    python bench/speculative.py --cpu [--k 4] [--ngram 3] [--threads N] [--out bench/results/speculative_cpu.json]

GPU (the default): random-weight bf16 Llama configs (bench/e2e.py's CONFIGS), one engine per
model with CUDA graphs for the speculating step shapes; plain decode is the same engine with
its proposer off (overlapped scheduling, as served). Every request has a 512-token prompt
and decodes NEW = 128 tokens (eos ignored). Workloads:

- repetitive: each prompt a 64-token segment repeated 8 times. Prompt lookup proposes
  wherever the output repeats earlier tokens; with random weights the model decides how
  often that is, so the accepted tokens per step are measured, not assumed;
- random: random prompts, the worst case (prompt lookup rarely finds a match);
- ceiling: the proposals are the model's own greedy continuation (replayed from the plain
  run): every proposal is accepted, 1 + k tokens a step, the most speculation can give;
- nothing accepted: every proposed token is wrong, so each step verifies k tokens and rolls
  them back: the overhead of speculation that never pays;
- draft (self): the target as its own draft model (acceptance 1, and the draft costs as
  much as the target): what the draft mechanism costs.

For each at batch 1, 4 and 16: time per output token ((time for NEW tokens - time for 1) /
(NEW - 1), medians of 3 after a warm-up), the speedup over plain decode of the same prompts,
accepted tokens per verifying step, output tokens per decode step, median GPU and host ms
per decode step (CUDA events, the engine's step log), and whether the greedy tokens equal
plain decoding's. Against the hardware: plain decode's time per step beside the weight
roofline (weight bytes / measured copy bandwidth).

CPU (--cpu): SmolLM2-135M-Instruct (the bundled real weights, fp32) summarises a passage of
fusegen/data/heldout.txt, greedily; prompt lookup's acceptance rate (accepted / proposed
tokens), output tokens per decode step, both wall times, and whether the tokens equal plain
decoding's. The acceptance rate does not depend on the machine; the wall times do (a busy
machine slows both, and a 2-core one shared with other work slows many-thread steps most:
--threads 1 then gives steadier times).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import fusegen
from fusegen.runtime.speculative import NgramProposer

NEW = 128
PROMPT_LEN, SEGMENT = 512, 64
RESULTS = Path(__file__).parent / "results"


class Replay:
    """Proposes each request's reference continuation (``ceiling``), or with every token
    changed (``wrong``: nothing is ever accepted)."""

    overlaps = True

    def __init__(self, references: dict, k: int, vocab: int, wrong: bool = False):
        self.references, self.k, self.vocab, self.wrong = references, k, vocab, wrong

    def propose(self, requests, caps):
        out = []
        for req, cap in zip(requests, caps):
            done = len(req.tokens) - len(req.prompt) + req.num_pending
            proposal = self.references[tuple(req.prompt)][done:done + min(cap, self.k)]
            out.append([(t + 1) % self.vocab for t in proposal] if self.wrong else proposal)
        return out


def workloads(vocab: int, batch: int, seed: int) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)
    repetitive = []
    for _ in range(batch):
        segment = [rng.randrange(3, vocab) for _ in range(SEGMENT)]
        repetitive.append((segment * (PROMPT_LEN // SEGMENT))[:PROMPT_LEN])
    return {"repetitive": repetitive,
            "random": [[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]}


def step_stats(log) -> dict:
    decode = [r for r in log if r.kind == "decode"]
    verifying = [r for r in decode if r.proposed]
    gpu = [r.gpu_ms for r in decode if r.gpu_ms is not None]
    return {"decode_steps": len(decode), "verifying_steps": len(verifying),
            "proposed": sum(r.proposed for r in verifying), "accepted": sum(r.accepted for r in verifying),
            "acceptance_rate": sum(r.accepted for r in verifying) / max(sum(r.proposed for r in verifying), 1),
            # accepted tokens per sequence and step that verified a proposal
            "accepted_per_step": sum(r.accepted for r in verifying) / max(sum(r.speculating for r in verifying), 1),
            "gpu_ms_median": statistics.median(gpu) if gpu else None,
            "host_ms_median": statistics.median(r.host_ms for r in decode) if decode else None}


def measure(engine, prompts, proposer, timed) -> dict:
    """Decode ms per output token of ``prompts`` decoding together under ``proposer``, the
    step statistics of the last timed run, and its outputs (under "_outputs")."""
    engine.proposer = proposer
    engine.generate_batch(prompts, 8, eos_token_ids=[])        # warm-up
    fulls, ones, outputs, log = [], [], [], []
    for _ in range(3):
        engine.step_log.clear()
        fulls.append(timed(lambda: outputs.append(engine.generate_batch(prompts, NEW, eos_token_ids=[]))))
        log = list(engine.step_log)
        ones.append(timed(lambda: engine.generate_batch(prompts, 1, eos_token_ids=[])))
    stats = step_stats(log)
    ms = (statistics.median(fulls) - statistics.median(ones)) / (NEW - 1) * 1e3
    stats.update(ms_per_token=ms, tokens_per_decode_step=len(prompts) * (NEW - 1) / max(stats["decode_steps"], 1))
    return stats | {"_outputs": outputs[-1]}


def gpu_model(name: str, batches: list[int], k: int) -> dict:
    from e2e import CONFIGS, build, copy_bandwidth, timed
    from fusegen.runtime.cuda_graphs import decode_buckets, token_buckets
    from fusegen.runtime.draft import DraftProposer
    from fusegen.runtime.paged import PagedRunner

    bandwidth = copy_bandwidth()
    model = build(name)
    vocab = model.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seqs, tokens = max(batches), 2048
    blocks = 4 * seqs * (PROMPT_LEN + NEW) // 16 + 64
    with torch.no_grad():
        start = time.perf_counter()
        compiled = fusegen.compile(model, "max_seq_len=4096")
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        engine = compiled.engine(num_blocks=blocks, max_num_seqs=seqs, max_num_batched_tokens=tokens,
                                 proposer=NgramProposer(k, 3))
        runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], blocks, compiled.device)
        self_draft = DraftProposer(runner, k, seqs, engine.max_request_len, tokens)
        runner.capture_graphs(decode_buckets(seqs), token_buckets(seqs, tokens))
        setup_s = time.perf_counter() - start
        out = {"model": name, "weight_GB": weight_bytes / 1e9, "roofline_ms": weight_bytes / bandwidth * 1e3,
               "copy_TBps": bandwidth / 1e12, "k": k, "ngram": 3, "compile_s": compile_s,
               "engine_setup_s": setup_s, "engine_setup": engine.setup, "runs": []}
        for batch in batches:
            for workload, prompts in workloads(vocab, batch, seed=batch).items():
                plain = measure(engine, prompts, None, timed)
                refs = {tuple(p): o for p, o in zip(prompts, plain.pop("_outputs"))}
                cases = {"prompt lookup": NgramProposer(k, 3)}
                if workload == "random":
                    cases |= {"ceiling": Replay(refs, k, vocab), "nothing accepted": Replay(refs, k, vocab, wrong=True),
                              "draft (self)": self_draft}
                for case, proposer in cases.items():
                    spec = measure(engine, prompts, proposer, timed)
                    outputs = spec.pop("_outputs")
                    same = [next((i for i, (a, b) in enumerate(zip(o, refs[tuple(p)])) if a != b), None)
                            for p, o in zip(prompts, outputs)]
                    run = {"batch": batch, "workload": workload if case == "prompt lookup" else case,
                           "proposer": "draft" if proposer is self_draft else "ngram",
                           "plain": plain, "speculative": spec, "speedup": plain["ms_per_token"] / spec["ms_per_token"],
                           "greedy_identical": all(s is None for s in same),
                           "first_divergence": min((s for s in same if s is not None), default=None)}
                    out["runs"].append(run)
                    print(f"  {name} b{batch:<3} {run['workload']:17} plain {plain['ms_per_token']:7.3f} ms/tok  "
                          f"spec {spec['ms_per_token']:7.3f} ms/tok  speedup {run['speedup']:5.2f}x  "
                          f"accepted/step {spec['accepted_per_step']:4.2f}  "
                          f"tokens/step {spec['tokens_per_decode_step'] / batch:4.2f}  "
                          f"identical {run['greedy_identical']}", file=sys.stderr, flush=True)
    del engine, runner, self_draft, compiled, model
    torch.cuda.empty_cache()
    return out


def print_table(results: dict) -> None:
    for m in results["models"]:
        print("  (ms/tok: decode time per output token of one sequence; accepted: share of proposed tokens; "
              "acc/step: accepted tokens per sequence and verifying step; tok/step: output tokens per sequence "
              "and decode step; GPU: median ms per decode step)")
        print(f"== {m['model']}: weights {m['weight_GB']:.1f} GB, weight roofline {m['roofline_ms']:.2f} ms/step "
              f"at {m['copy_TBps']:.2f} TB/s, k = {m['k']}, n = {m['ngram']}")
        print(f"  {'batch':>5} {'workload':17} {'plain ms/tok':>12} {'% roofl.':>8} {'spec ms/tok':>11} {'speedup':>8} "
              f"{'accepted':>8} {'acc/step':>8} {'tok/step':>8} {'plain GPU':>9} {'spec GPU':>9} {'identical':>9}")
        for r in m["runs"]:
            p, s, b = r["plain"], r["speculative"], r["batch"]
            print(f"  {b:5d} {r['workload']:17} {p['ms_per_token']:12.3f} {100 * m['roofline_ms'] / p['ms_per_token']:7.0f}% "
                  f"{s['ms_per_token']:11.3f} {r['speedup']:7.2f}x {s['acceptance_rate']:8.0%} {s['accepted_per_step']:8.2f} "
                  f"{s['tokens_per_decode_step'] / b:8.2f} {p['gpu_ms_median'] or 0:9.3f} {s['gpu_ms_median'] or 0:9.3f} "
                  f"{str(r['greedy_identical']):>9}")


def summary_prompt(tokenizer) -> list[int]:
    """The chat-formatted request to summarise heldout.txt's first piece (its title and the
    paragraphs up to the next title)."""
    from fusegen.data import heldout_text

    lines = heldout_text().splitlines()
    title = lambda line: line and len(line) < 60 and line[-1] not in ".?!:\"'"   # noqa: E731
    end = next(i for i in range(1, len(lines)) if title(lines[i]))
    passage = "\n".join(lines[:end]).strip()
    chat = [{"role": "user", "content": "Summarise the following text in a few sentences.\n\n" + passage}]
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))


def cpu(args) -> dict:
    """Prompt lookup's acceptance with real weights on a summarisation prompt (CPU)."""
    from fusegen.models import DEFAULT_MODEL, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL)
    ids = summary_prompt(tokenizer)
    compiled = fusegen.compile(model)
    block = compiled.facts["kv"].block_size

    def run(proposer):
        engine = compiled.engine(num_blocks=-(-(len(ids) + args.new_tokens) // block) + 1, max_num_seqs=1,
                                 max_num_batched_tokens=len(ids), proposer=proposer)
        engine.generate_batch([ids[:8]], 2)                 # warm-up
        engine.kv.pool.reset_cache()
        engine.step_log.clear()
        start = time.perf_counter()
        out = engine.generate_batch([ids], args.new_tokens)[0]
        return out, time.perf_counter() - start, engine

    plain, plain_s, _ = run(None)
    spec, spec_s, engine = run(NgramProposer(args.k, args.ngram))
    stats = step_stats(engine.step_log)
    result = {"model": DEFAULT_MODEL, "model_class": compiled.report.model_class, "prompt_tokens": len(ids),
              "new_tokens": len(spec), "k": args.k, "ngram": args.ngram, **stats,
              "acceptance_rate": stats["accepted"] / stats["proposed"] if stats["proposed"] else 0.0,
              "tokens_per_decode_step": (len(spec) - 1) / max(stats["decode_steps"], 1),
              "plain_s": plain_s, "speculative_s": spec_s, "greedy_identical": plain == spec,
              "torch_threads": torch.get_num_threads(), "summary": tokenizer.decode(spec, skip_special_tokens=True)}
    print(f"{result['model_class']} fp32 on CPU, {len(ids)}-token summarisation prompt, {len(spec)} new tokens, "
          f"prompt lookup k={args.k} n={args.ngram}:")
    print(f"  acceptance {stats['accepted']}/{stats['proposed']} proposed tokens = {result['acceptance_rate']:.1%}, "
          f"{stats['verifying_steps']} of {stats['decode_steps']} decode steps verified proposals, "
          f"{result['tokens_per_decode_step']:.2f} tokens per decode step")
    print(f"  wall: plain {plain_s:.2f} s, speculative {spec_s:.2f} s ({plain_s / spec_s:.2f}x); "
          f"greedy tokens {'identical' if plain == spec else 'DIFFER'}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="prompt lookup's acceptance with SmolLM2 on the CPU")
    parser.add_argument("--models", nargs="+", default=["7b", "1b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=160, help="--cpu: most tokens of the summary")
    parser.add_argument("--threads", type=int, default=None, help="--cpu: torch threads (default: torch's own)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.cpu:
        if args.threads:
            torch.set_num_threads(args.threads)   # a benchmark script, not the library
        result = cpu(args)
        out = Path(args.out or RESULTS / "speculative_cpu.json")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/speculative.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
        sys.path.insert(0, str(Path(__file__).parent))     # bench/e2e.py's configs and timers
        result = {"device": torch.cuda.get_device_name(), "models": [gpu_model(m, args.batches, args.k)
                                                                    for m in args.models]}
        print_table(result)
        out = Path(args.out or RESULTS / "speculative.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"  saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
