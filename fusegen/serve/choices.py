"""One choice of a completion as its tokens arrive: text deltas, stop strings, eos, log-probs,
and the finish reason, for both the completions and the chat format.

    TokenEvent ─▶ Choice.take(event) ─▶ Delta(text, logprobs, finished)

eos is not part of the text (as in OpenAI's API); a stop string ends the choice with
``finish_reason="stop"`` and the text cut before it; running out of ``max_tokens`` gives
``"length"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusegen.runtime.scheduler import TokenEvent
from fusegen.serve.text import IncrementalDetokenizer, StopMatcher


@dataclass
class TokenInfo:
    """A generated token's text and log-probs, for the ``logprobs`` fields."""
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """What one or more new tokens of a choice add."""
    text: str
    logprobs: list[TokenInfo]
    finish_reason: str | None
    token_ids: list[int]

    def merge(self, later: "Delta") -> "Delta":
        return Delta(self.text + later.text, self.logprobs + later.logprobs, later.finish_reason or self.finish_reason,
                     self.token_ids + later.token_ids)


@dataclass
class Choice:
    index: int
    request_id: int
    tokenizer: object
    stops: list[str]
    eos_token_ids: frozenset[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        self._detok = IncrementalDetokenizer(self.tokenizer)
        self._stop = StopMatcher(self.stops)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, event: TokenEvent) -> Delta:
        self.token_ids.append(event.token)
        eos = event.finished and event.token in self.eos_token_ids
        piece = "" if eos else self._detok.push(event.token)
        if event.finished:
            piece += self._detok.flush()
        out = self._stop.feed(piece)
        if self._stop.stopped or eos:
            self.finish_reason = "stop"
        elif event.finished:
            self.finish_reason = "length"
        if event.finished and not self._stop.stopped:
            out += self._stop.flush()
        infos = [self._info(event)] if event.logprob is not None else []
        self.text += out
        self.logprobs += infos
        return Delta(out, infos, self.finish_reason, [event.token])

    def _info(self, event: TokenEvent) -> TokenInfo:
        decode = lambda t: self.tokenizer.decode([t])
        return TokenInfo(decode(event.token), event.logprob.logprob,
                         [(decode(t), lp) for t, lp in event.logprob.top])


# --- the two wire formats ---------------------------------------------------------------------

def completion_logprobs(infos: list[TokenInfo], start: int, top: int) -> dict | None:
    """The completions API's ``logprobs`` object; ``start``: text offset of the first token."""
    if not infos:
        return None
    offsets, at = [], start
    for info in infos:
        offsets.append(at)
        at += len(info.text)
    return {"tokens": [i.text for i in infos], "token_logprobs": [i.logprob for i in infos],
            "top_logprobs": [dict(i.top[:top]) for i in infos] if top else None, "text_offset": offsets}


def chat_logprobs(infos: list[TokenInfo], top: int) -> dict | None:
    """The chat API's ``logprobs`` object."""
    if not infos:
        return None
    entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [dict(entry(i.text, i.logprob), top_logprobs=[entry(t, lp) for t, lp in i.top[:top]])
                        for i in infos]}
