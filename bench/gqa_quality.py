"""Quality cost of convert_mha_to_gqa on real weights: perplexity on held-out English text
and KV-cache bytes, for each method and target number of KV heads.

    python bench/gqa_quality.py [--model smollm2] [--targets 3 1] [--out bench/results/gqa_quality.json]

Calibration uses fusegen/data/calibration.txt; perplexity is measured on
fusegen/data/heldout.txt through the compiled (paged) graph. Runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import fusegen
from fusegen.data import calibration_text, heldout_text
from fusegen.models import load_model, load_tokenizer


def chunks(tokenizer, text: str, length: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // length
    return ids[: n * length].reshape(n, length)


@torch.no_grad()
def perplexity(compiled, ids: torch.Tensor) -> float:
    logits = compiled(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--targets", type=int, nargs="+", default=[1])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default="bench/results/gqa_quality.json")
    args = parser.parse_args()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    calib = chunks(tokenizer, calibration_text(), args.length)
    heldout = chunks(tokenizer, heldout_text(), args.length)
    kv_heads = model.config.num_key_value_heads
    rows = []
    baseline = fusegen.compile(model)
    layers, head_dim = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    rows.append({"method": "none", "kv_heads": kv_heads, "heldout_ppl": perplexity(baseline, heldout),
                 "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * itemsize})
    for target in args.targets:
        for method in ("mean", "lsq"):
            start = time.perf_counter()
            compiled = fusegen.compile(model, f"gqa_kv_heads={target},gqa_method={method}",
                                       calibration_ids=calib)
            stats = next(r.stats for r in compiled.report.records if r.name == "convert_mha_to_gqa")
            rows.append({"method": method, "kv_heads": target,
                         "heldout_ppl": perplexity(compiled, heldout),
                         "kv_bytes_per_token": stats["kv_bytes_per_token_after"],
                         "calibration_ppl": stats["calibration_ppl_after"],
                         "compile_seconds": time.perf_counter() - start})
    result = {"model": args.model, "calibration_tokens": calib.numel(), "heldout_tokens": heldout.numel(),
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'method':8} {'kv heads':>8} {'held-out ppl':>13} {'KV bytes/token':>15}")
    for r in rows:
        print(f"{r['method']:8} {r['kv_heads']:>8} {r['heldout_ppl']:>13.2f} {r['kv_bytes_per_token']:>15}")


if __name__ == "__main__":
    main()
