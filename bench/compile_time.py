"""Compile time: capture by layer against the whole-model capture.

    python bench/compile_time.py [--models 1b 7b] [--out bench/results/compile_time.json]
    python bench/compile_time.py --cpu [--threads 2]     # the bundled SmolLM2-135M, fp32, on the CPU

For each random-weight bf16 Llama config of `bench/e2e.py` (or, with --cpu, the bundled model
in fp32 on the CPU), in one process, `fusegen.compile`
(capture, passes, kernel lowering, the compile-time check of the compiled graph against the
model) runs three times:
1. by layer, first: Triton's kernel cache may be cold, so this is what a user waits for once;
2. the whole model (`capture_by_layer=0`), the kernel cache now warm;
3. by layer again, warm: against 2, the capture's own gain.
Each run reports its seconds per step (capture and every pass) from the compile report, and
the two graphs are checked to print the same code. No engine is built.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import torch

import fusegen
from e2e import build

CONFIG = "max_seq_len=4096,max_num_seqs=64,max_num_batched_tokens=4096"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_compile(model, config: str) -> tuple[dict, "fusegen.CompiledModel"]:
    _sync()
    start = time.perf_counter()
    compiled = fusegen.compile(model, config)
    _sync()
    total = time.perf_counter() - start
    steps = {r.name: round(r.seconds, 3) for r in compiled.report.records}
    capture = compiled.graph_module.meta.get("fusegen_capture", {})
    return {"total_s": round(total, 3), "passes_s": round(compiled.report.seconds, 3),
            "outside_passes_s": round(total - compiled.report.seconds, 3), "steps_s": steps,
            "capture": capture}, compiled


def run(model, config: str) -> dict:
    """The three compiles, each after the one before is freed (a compiled model alive during
    the next compile would count its garbage collection there)."""
    results, graphs = {}, {}
    for key, cfg in (("by_layer_first", config), ("whole_model_warm", config + ",capture_by_layer=0"),
                     ("by_layer_warm", config)):
        results[key], compiled = one_compile(model, cfg)
        graphs[key] = compiled.report.records[0].snapshot
        del compiled
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    whole, warm = results["whole_model_warm"], results["by_layer_warm"]
    return results | {"same_captured_graph": graphs["by_layer_first"] == graphs["whole_model_warm"],
                      "speedup_warm": round(whole["total_s"] / warm["total_s"], 2),
                      "capture_speedup": round(whole["steps_s"]["capture"] / warm["steps_s"]["capture"], 2)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def report(name: str, r: dict) -> None:
    print(f"{name}: by layer {r['by_layer_first']['total_s']:.1f} s first, {r['by_layer_warm']['total_s']:.1f} s "
          f"warm; whole model {r['whole_model_warm']['total_s']:.1f} s warm ({r['speedup_warm']}x); "
          f"capture {r['by_layer_warm']['steps_s']['capture']:.1f} s vs {r['whole_model_warm']['steps_s']['capture']:.1f} s; "
          f"same graph: {r['same_captured_graph']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="fusegen compile time by layer vs whole model (GPU configs; --cpu: SmolLM2 on the CPU)")
    parser.add_argument("--models", nargs="+", default=["1b", "7b"])
    parser.add_argument("--out", default=None, help="default bench/results/compile_time[_cpu].json")
    parser.add_argument("--cpu", action="store_true", help="the bundled SmolLM2-135M in fp32 on the CPU")
    parser.add_argument("--threads", type=int, default=2, help="--cpu: torch threads")
    args = parser.parse_args()
    if args.cpu:
        from fusegen.models import load_model

        torch.set_num_threads(args.threads)
        args.out = args.out or "bench/results/compile_time_cpu.json"
        results = {"cpu": cpu_name(), "threads": args.threads,
                   "torch": torch.__version__, "smollm2": run(load_model(), "default")}
        report("smollm2", results["smollm2"])
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/compile_time.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")
        args.out = args.out or "bench/results/compile_time.json"
        results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        for name in args.models:
            model = build(name)
            results[name] = run(model, CONFIG)
            del model
            torch.cuda.empty_cache()
            report(name, results[name])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
