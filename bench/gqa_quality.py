"""Quality cost of convert_mha_to_gqa on real weights: held-out perplexity, KV-cache bytes per
token and weight bytes of the base model and of each method at each target number of KV
heads (the table of ``fusegen-cli quality``, one base row for every config).

    python bench/gqa_quality.py [--model smollm2] [--targets 1] [--methods mean lsq refit]
                                [--threads 2] [--out bench/results/gqa_quality.json]

Calibration uses fusegen/data/calibration.txt; perplexity is measured on the disjoint
fusegen/data/heldout.txt (see fusegen/quality.py), through the compiled (paged) graph.
Runs on CPU; ``compile_seconds`` is the whole compile, ``convert_mha_to_gqa.seconds`` the
conversion's share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from fusegen.config import GQA_METHODS
from fusegen.quality import SEQUENCE_LENGTH, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--targets", type=int, nargs="+", default=[1])
    parser.add_argument("--methods", nargs="+", choices=GQA_METHODS, default=list(GQA_METHODS))
    parser.add_argument("--length", type=int, default=SEQUENCE_LENGTH)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/gqa_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [f"gqa_kv_heads={t},gqa_method={m}" for t in args.targets for m in args.methods]
    result = measure(args.model, configs, args.length)
    print(result.table())
    data = {**result.to_dict(), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
