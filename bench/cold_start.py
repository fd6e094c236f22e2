"""Cold start: an artifact loaded by `fusegen.load` against compiling the model again.

    python bench/cold_start.py [--model 7b] [--workdir /tmp/fusegen-cold] [--out bench/results/cold_start.json]

A random-weight bf16 Llama config is written once as a Hugging Face checkpoint. Then, each
in a fresh interpreter (nothing imported, files in the page cache from the writes before):
- compile: `from_pretrained` + `fusegen.compile` (capture, passes, kernel lowering), then the
  export (timed apart, not part of any cold start);
- load: `fusegen.load(artifact)` as on a machine that never compiled the model: an empty
  Triton cache directory, which the artifact's compiled kernels seed. Its steps (verify
  hashes, seed Triton's cache, read and hash the weights in parallel through pinned memory,
  rebuild the graph, attach kernels), the weight read's GB/s against the pinned
  host-to-device rate measured here, and Triton's cache hits and compiles of fusegen's
  kernels during load and first token (misses: kernels compiled after all);
- load_lazy: the same with CUDA graphs captured per bucket at first use (lazy_cuda_graphs=1);
- weights: the shards read onto the GPU by safetensors and nothing else (the earlier path),
  and the pinned host-to-device copy rate;
and for compile and the loads, the first token of a 32-token prompt after the model is ready.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from e2e import CONFIGS  # the same model configs as the end-to-end benchmark

CHILD = {
    "compile": """
import time, json, sys
t0 = time.perf_counter()
import torch, fusegen
from transformers import AutoModelForCausalLM
t_import = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda").eval()
torch.cuda.synchronize(); t_weights = time.perf_counter()
compiled = fusegen.compile(model)
torch.cuda.synchronize(); t_ready = time.perf_counter()
ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
first = compiled.generate(ids, 1)
torch.cuda.synchronize(); t_first = time.perf_counter()
compiled.save(sys.argv[2])
t_export = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "read_model_s": t_weights - t_import,
                  "compile_s": t_ready - t_weights, "ready_s": t_ready - t0,
                  "first_token_s": t_first - t_ready, "export_s": t_export - t_first,
                  "token": first[0, -1].item()}))
""",
    "load": """
import time, json, sys
t0 = time.perf_counter()
import torch, fusegen
from fusegen.codegen import triton_cache
t_import = time.perf_counter()
with triton_cache.count_compiles() as counts:
    compiled = fusegen.load(sys.argv[2], runtime=sys.argv[3])
    torch.cuda.synchronize(); t_ready = time.perf_counter()
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    first = compiled.generate(ids, 1)
    torch.cuda.synchronize(); t_first = time.perf_counter()
report = compiled.triton_binaries
weight_bytes = json.load(open(sys.argv[2] + "/manifest.json"))["weights"]["bytes"]
print(json.dumps({"import_s": t_import - t0, "load_s": t_ready - t_import, "ready_s": t_ready - t0,
                  "steps_s": compiled.load_seconds, "first_token_s": t_first - t_ready,
                  "weight_bytes": weight_bytes, "weights_bytes_per_s": weight_bytes / compiled.load_seconds["weights"],
                  "triton": {"shipped": report.shipped, "seeded": report.seeded, "present": report.present,
                             "ignored": report.ignored, "reasons": list(report.reasons),
                             "hits": counts["hits"], "misses": counts["misses"]},
                  "graphs_captured": len(compiled._engine.setup["captured"]),
                  "graph_buckets": len(compiled._engine.setup["buckets"]),
                  "token": first[0, -1].item()}))
""",
    "weights": """
import time, json, sys, glob
t0 = time.perf_counter()
import torch
from safetensors import safe_open
t_import = time.perf_counter()
total = 0
for path in sorted(glob.glob(sys.argv[2] + "/weights/*.safetensors")):
    with safe_open(path, framework="pt", device="cuda") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            total += t.numel() * t.element_size()
torch.cuda.synchronize()
read_s = time.perf_counter() - t_import
# The ceiling for this step: host-to-device copies from pinned memory, 1 GiB, best of 5.
host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
dev = torch.empty_like(host, device="cuda")
best = float("inf")
for _ in range(6):
    torch.cuda.synchronize(); t = time.perf_counter()
    dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
print(json.dumps({"read_s": read_s, "bytes": total, "h2d_bytes_per_s": host.numel() / best}))
""",
}


def child(kind: str, hf_dir: Path, artifact: Path, runtime: str = "", triton_cache: Path | None = None) -> dict:
    env = dict(os.environ)
    if triton_cache is not None:   # as on a machine that never compiled these kernels
        shutil.rmtree(triton_cache, ignore_errors=True)
        env["TRITON_CACHE_DIR"] = str(triton_cache)
    done = subprocess.run([sys.executable, "-c", CHILD[kind.removesuffix("_lazy")], str(hf_dir), str(artifact),
                           runtime], capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="7b", choices=sorted(CONFIGS))
    parser.add_argument("--workdir", default="/tmp/fusegen-cold")
    parser.add_argument("--out", default="bench/results/cold_start.json")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        sys.exit("bench/cold_start.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)")

    work = Path(args.workdir)
    hf_dir, artifact = work / "hf", work / "artifact"
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.model], bos_token_id=1, eos_token_id=2))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(hf_dir)
    del model
    torch.cuda.empty_cache()
    print(f"checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)

    results = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for kind, runtime in (("compile", ""), ("load", ""), ("load_lazy", "lazy_cuda_graphs=1"), ("weights", "")):
        cold = work / f"triton-cache-{kind}" if kind.startswith("load") else None
        results[kind] = child(kind, hf_dir, artifact, runtime, cold)
        print(kind, json.dumps(results[kind]), flush=True)
    load, weights = results["load"], results["weights"]
    h2d = weights["h2d_bytes_per_s"]
    results["artifact_bytes"] = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    results["load_minus_weight_read_s"] = load["load_s"] - load["steps_s"]["weights"]
    results["same_first_token"] = results["compile"]["token"] == load["token"] == results["load_lazy"]["token"]
    results["speedup_ready"] = results["compile"]["ready_s"] / load["ready_s"]

    print(f"\n{args.model}: artifact {results['artifact_bytes'] / 2**30:.1f} GiB")
    print(f"  compile from the model: ready in {results['compile']['ready_s']:.1f} s "
          f"(import {results['compile']['import_s']:.1f}, read model {results['compile']['read_model_s']:.1f}, "
          f"compile {results['compile']['compile_s']:.1f})")
    for kind in ("load", "load_lazy"):
        run = results[kind]
        t = run["triton"]
        print(f"  {kind + ' the artifact:':22s}ready in {run['ready_s']:.1f} s (import {run['import_s']:.1f}, "
              f"load {run['load_s']:.1f}: " + ", ".join(f"{k} {v:.2f}" for k, v in run["steps_s"].items()) + "), "
              f"first token {run['first_token_s']:.2f} s after; graphs captured {run['graphs_captured']} "
              f"of {run['graph_buckets']}")
        print(f"    weights read and hashed at {run['weights_bytes_per_s'] / 1e9:.1f} GB/s, "
              f"{100 * run['weights_bytes_per_s'] / h2d:.0f}% of the pinned host-to-device rate ({h2d / 1e9:.1f} GB/s)")
        print(f"    Triton binaries: {t['shipped']} shipped, {t['seeded']} seeded, {t['ignored']} ignored; "
              f"fusegen kernels loaded from cache {t['hits']}, compiled {t['misses']}"
              + (f" ({'; '.join(t['reasons'][:3])})" if t["reasons"] else ""))
    rate = weights["bytes"] / weights["read_s"]
    print(f"  weights by safetensors: {weights['read_s']:.1f} s for {weights['bytes'] / 2**30:.1f} GiB = "
          f"{rate / 1e9:.1f} GB/s, {100 * rate / h2d:.0f}% of the pinned host-to-device rate")
    print(f"  load - weight read:     {results['load_minus_weight_read_s']:.2f} s (goal <= 3 s)")
    print(f"  ready speed-up {results['speedup_ready']:.1f}x; first token after ready: compile "
          f"{results['compile']['first_token_s']:.2f} s, load {load['first_token_s']:.2f} s, "
          f"load_lazy {results['load_lazy']['first_token_s']:.2f} s; same first token: {results['same_first_token']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
