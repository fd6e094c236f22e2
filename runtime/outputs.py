"""Each consumer's own queue of tokens: whichever caller drives a step, the tokens of every
request land in that request's queue, so interleaved streams, batches and threads each get
exactly their own tokens.

    stream A ─┐                 ┌─▶ queue A: 17 4
    batch B  ─┼─ drive step() ──┼─▶ queue B: 9
    thread C ─┘  (one at a time) └─▶ queue C: 31 31 8 (finished)
"""

from __future__ import annotations

from collections import deque


class RequestOutput:
    """Tokens produced for one request and not yet taken, whether it finished, and the error
    that ended it (a ``RequestFailedError``), if any."""

    __slots__ = ("request_id", "tokens", "finished", "error")

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.tokens: deque[int] = deque()
        self.finished = False
        self.error: BaseException | None = None

    @property
    def ready(self) -> bool:
        """Something to hand over: a token, the end, or an error."""
        return bool(self.tokens) or self.finished

    def push(self, token: int, finished: bool) -> None:
        self.tokens.append(token)
        self.finished = finished

    def fail(self, error: BaseException) -> None:
        self.error, self.finished = error, True

    def take(self) -> list[int]:
        out = list(self.tokens)
        self.tokens.clear()
        return out
