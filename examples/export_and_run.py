"""Compile once, export an artifact, and run it: no model code and no passes when it loads.

    python examples/export_and_run.py [MODEL] [-o DIR] [--dtype bf16|fp16|fp32] [--prompt TEXT]

The artifact (``manifest.json``, ``graph.json``, safetensors weights, generated kernels, the
tokenizer) is what ``fusegen-cli export`` writes and ``fusegen-cli run`` reads. In bf16 the
bundled SmolLM2-135M artifact is under 300 MiB.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import fusegen
from fusegen.models import load_model, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("-o", "--output", default=None, help="artifact directory (default: a temporary one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.output or Path(scratch) / "model.fusegen")
        compiled = fusegen.compile(load_model(args.model, dtype=DTYPES[args.dtype]))
        compiled.save(directory, tokenizer=load_tokenizer(args.model))
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        print(f"exported {directory}: {size / 2**20:.1f} MiB in {args.dtype}")

        loaded = fusegen.load(directory)  # checks hashes, rebuilds the graph, no passes
        ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids
        out = loaded.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(loaded.tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
