"""Compile a Hugging Face model with fusegen, see what the passes did, and generate text.

    python examples/compile_and_generate.py [MODEL] [--prompt TEXT] [--max-new-tokens N]

MODEL is the bundled ``smollm2`` (the default), a local Hugging Face directory, or a Hugging
Face name already in the local HF cache. Greedy decoding, so the continuation is the one
``model.generate(do_sample=False)`` gives.
"""

from __future__ import annotations

import argparse

import fusegen
from fusegen.models import load_model, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    compiled = fusegen.compile(load_model(args.model))  # capture -> passes -> CompiledModel
    print(compiled.report.table())                       # one row per pass

    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = compiled.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
