"""A multi-turn conversation with a compiled model, through the tokenizer's chat template.

Every turn renders the whole conversation with the template and generates the assistant's
reply on one engine of the paged graph, whose prefix cache reuses the KV blocks of the
conversation's earlier tokens, so a turn mostly computes its new ones. When the conversation
outgrows the model's length, the oldest exchanges are dropped (a system message stays).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO


class ChatSession:
    """The messages so far and the engine that answers them.

    ``sampling``: temperature (0 for greedy), top_k, top_p, seed, as ``engine.stream`` takes."""

    def __init__(self, compiled, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 **sampling):
        if compiled.kind != "paged":
            raise ValueError(f"this graph is {compiled.kind}; chat needs the paged graph (the default config)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {compiled.report.model_class} has no chat template; "
                             f"use `generate --prompt` for plain continuation")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = []  # user and assistant turns, oldest first
        block = compiled.facts["kv"].block_size
        self.limit = compiled.max_len
        self.engine = compiled.engine(num_blocks=-(-self.limit // block), max_num_seqs=1,
                                      max_num_batched_tokens=self.limit)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` (after the system message) with the assistant's turn opened."""
        text = self.tokenizer.apply_chat_template(self.system + messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def reply(self, text: str) -> Iterator[str]:
        """Yield the reply to ``text`` piece by piece; the exchange joins the conversation once
        the reply is complete (a reply abandoned half-way leaves the conversation as it was)."""
        messages, ids = self._fit(self.messages + [{"role": "user", "content": text}])
        stream = self.engine.stream(ids, self.max_new_tokens, **self.sampling)
        tokens: list[int] = []
        shown = ""
        try:
            for token in stream:
                tokens.append(token)
                decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                yield decoded[len(shown):]  # decode the whole tail: multi-token characters
                shown = decoded
        finally:
            stream.close()  # an abandoned reply frees its blocks
        self.messages = messages + [{"role": "assistant", "content": shown}]

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """``messages`` without the oldest exchanges that do not fit with a full reply, and
        their prompt ids."""
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) + self.max_new_tokens <= self.limit:
                return messages, ids
            if len(messages) <= 1:
                raise ValueError(f"the message is {len(ids)} tokens with the chat template; with "
                                 f"{self.max_new_tokens} new tokens that exceeds the model's {self.limit}")
            messages = messages[2:]

    def reset(self) -> None:
        self.messages = []


def run_repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read a message per line (default: from sys.stdin) until end of input or ``/exit``;
    ``/reset`` forgets the conversation. Ctrl-C during a reply stops that reply."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print("fusegen chat: one message per line; /reset forgets, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=stdout)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if not text:
            continue
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True, file=stdout)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=stdout)
        print(file=stdout)
    return 0
