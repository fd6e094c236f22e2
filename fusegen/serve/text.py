"""Tokens to text as they arrive: incremental detokenization and stop strings.

    tokens ──IncrementalDetokenizer──▶ text deltas ──StopMatcher──▶ text to send, stopped?

A delta is only produced once the decoded text stops changing at its end (a multi-byte
character split over tokens decodes to U+FFFD until its last byte arrives), so the deltas
concatenate to ``tokenizer.decode(tokens, skip_special_tokens=True)``. The stop matcher
holds back the tail that could still become a stop string, and cuts the text before the
first stop string found.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes only a short window of recent tokens per new token (no full re-decode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0   # window start: tokens before it are already in the text
        self._read = 0     # tokens up to here are in the text

    def _window(self) -> tuple[str, str]:
        """The text of the window's tokens already sent, and of all its tokens."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        return decode(self.tokens[self._prefix:self._read]), decode(self.tokens[self._prefix:])

    def push(self, token: int) -> str:
        """The text that ``token`` adds (possibly empty until a character completes)."""
        self.tokens.append(token)
        before, after = self._window()
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]

    def flush(self) -> str:
        """At the end: the text of tokens still held back (an incomplete character included)."""
        before, after = self._window()
        self._prefix = self._read = len(self.tokens)
        return after[len(before):] if len(after) > len(before) else ""


class StopMatcher:
    """Cuts a stream of text at the first of ``stops``; holds back what could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that is safe to send now."""
        if self.stopped:
            return ""
        buffer = self._held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return buffer[:min(cuts)]
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """Whatever was held back, at the end of the stream."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
