"""Stream tokens from the serving engine as they are produced, then serve a batch at once.

    python examples/stream.py [MODEL] [--prompt TEXT] [--max-new-tokens N]

``compiled.stream`` yields one request's new token ids; ``compiled.generate_batch`` runs many
requests through the same engine with continuous batching. Both take the sampling values
(``temperature``, ``top_k``, ``top_p``, ``seed``); temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import time

import fusegen
from fusegen.models import load_model, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    compiled = fusegen.compile(load_model(args.model))

    prompt = tokenizer(args.prompt).input_ids
    tokens: list[int] = []
    shown = ""
    start = time.perf_counter()
    print(args.prompt, end="", flush=True)
    for token in compiled.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=0):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)  # decode the tail: a character may span tokens
        shown = text
    seconds = time.perf_counter() - start
    print(f"\n[{len(tokens)} tokens in {seconds:.1f} s]")

    prompts = [tokenizer(p).input_ids for p in ("The sky is", "My favourite food is", "In 1969,")]
    for ids, new in zip(prompts, compiled.generate_batch(prompts, max_new_tokens=8)):
        print(repr(tokenizer.decode(ids + new, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
