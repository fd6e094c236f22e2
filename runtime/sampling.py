"""Next-token choice for a batch of logits, on the logits' device, without host syncs.

    logits [B, V] --repetition penalty--> --temperature--> --top-k--> --top-p--> draw

The order and the penalty follow HF's processors (``RepetitionPenaltyLogitsProcessor``,
then ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``). Every
parameter is a per-row device tensor (``SamplingRows``); a row with temperature 0 is
greedy. Whether any row draws or is penalised is known on the host (from the requests'
parameters), so an all-greedy batch runs one argmax.

Randomness is counter-based: a row's uniform number is a hash of (seed, position), where
position is the index of the token being chosen. A seeded request therefore gets the same
tokens alone, in any batch, and whether or not steps overlap. The draw is inverse-CDF over
the row's sorted, filtered distribution (one uniform per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def greedy_tokens(logits: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """``logits.argmax(-1)`` for [B, V] logits, the same ids (the first maximum), in two
    passes over chunks of the vocabulary on CUDA: one argmax kernel over a 128k row runs as a
    single block per row (37 us for the 1B config's vocabulary on an H200, a third of its LM
    head), while the chunked one spreads a row over many blocks. ``chunks`` forces the
    chunked path with that many chunks (a divisor of V)."""
    B, V = logits.shape
    if chunks is None:
        if not logits.is_cuda or V < 16384:
            return logits.argmax(-1)
        chunks = next((c for c in range(256, 15, -1) if V % c == 0), None)
        if chunks is None:
            return logits.argmax(-1)
    if V % chunks:
        raise ValueError(f"greedy_tokens: {chunks} chunks do not divide a vocabulary of {V}")
    width = V // chunks
    best, where = logits.view(B, chunks, width).max(-1)    # first maximum of each chunk
    chunk = best.argmax(-1, keepdim=True)                   # first chunk holding the maximum
    return (chunk * width + where.gather(1, chunk)).squeeze(1)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off; > 1 discourages tokens already seen
    seed: int | None = None           # None: the engine draws one from torch's generator

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 63):
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.top_k >= 1 << 63:
            raise ValueError(f"top_k must fit in 64 bits, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class SamplingRows:
    """Per-row parameters as device tensors ([B] each), plus what the host knows of them."""
    temperature: torch.Tensor     # float32; 0 = greedy
    top_k: torch.Tensor           # long; 0 = off
    top_p: torch.Tensor           # float32
    repetition_penalty: torch.Tensor  # float32
    seed: torch.Tensor            # long
    position: torch.Tensor        # long: index of the token each row chooses
    any_random: bool = True
    any_penalty: bool = True

    @classmethod
    def from_params(cls, params: list[SamplingParams], positions: list[int], device) -> "SamplingRows":
        """Rows for a host-side list of parameters (tests and one-off calls); unseeded rows
        use seed 0."""
        f32, i64 = torch.float32, torch.long
        return cls(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=f32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=i64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=f32, device=device),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=f32, device=device),
            seed=torch.tensor([p.seed or 0 for p in params], dtype=i64, device=device),
            position=torch.tensor(positions, dtype=i64, device=device),
            any_random=any(not p.greedy for p in params),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, constants from Wellons' hash prospector)
    on int64 tensors holding values < 2**32; the products stay below 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), a pure function of (seed, counter) (both int64 tensors)."""
    x = _mix32((counter & _MASK32) ^ 0x9E3779B9)
    x = _mix32(x ^ (seed & _MASK32))
    x = _mix32(x ^ ((seed >> 32) & _MASK32) ^ ((counter >> 32) & _MASK32))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, history: torch.Tensor,
                             lengths: torch.Tensor) -> torch.Tensor:
    """HF semantics: a token in ``history[b, :lengths[b]]`` has its logit divided by the
    row's penalty if positive, else multiplied. Rows with penalty 1 come out unchanged."""
    keep = torch.arange(history.shape[1], device=history.device)[None] < lengths[:, None]
    seen = torch.where(keep, history, history[:, :1])    # padding repeats a seen token
    picked = logits.gather(1, seen)
    p = penalty.to(logits.dtype)[:, None]
    return logits.scatter(1, seen, torch.where(picked > 0, picked / p, picked * p))


def sample(logits: torch.Tensor, rows: SamplingRows, history: torch.Tensor | None = None,
           lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B] (long, on ``logits.device``) for ``logits`` [B, V]. ``history`` [B, L]
    and ``lengths`` [B] (prompt + generated tokens) are needed when a row is penalised."""
    if logits.dim() != 2 or logits.shape[0] != rows.temperature.shape[0]:
        raise ValueError(f"sample: logits {tuple(logits.shape)} must be [B, V] with B = "
                         f"{rows.temperature.shape[0]} rows of sampling parameters")
    if rows.any_penalty:
        if history is None or lengths is None:
            raise ValueError("sample: repetition_penalty needs the token history of each row")
        logits = apply_repetition_penalty(logits, rows.repetition_penalty, history, lengths)
    greedy = greedy_tokens(logits)
    if not rows.any_random:
        return greedy
    drawn = _draw(logits.float(), rows)
    return torch.where(rows.temperature > 0, drawn, greedy)


def _filtered(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in descending order, unnormalised after top-k and top-p, and the
    vocabulary ids in that order)."""
    B, V = logits.shape
    temperature = torch.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    top_k = torch.where(rows.top_k > 0, rows.top_k, V)[:, None]
    # Stable: equal logits keep vocabulary order, so a draw never depends on sort internals.
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=logits.device)[None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    cdf = probs.cumsum(-1)
    nucleus = (cdf - probs) < rows.top_p[:, None]    # the smallest head whose mass reaches top_p
    return probs * nucleus, order


def _draw(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    probs, order = _filtered(logits, rows)
    cdf = probs.cumsum(-1)
    kept = (probs > 0).sum(-1, keepdim=True).clamp(min=1)
    u = uniform(rows.seed, rows.position)[:, None]
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=kept - 1)
    return order.gather(1, pick)[:, 0]


def probabilities(logits: torch.Tensor, rows: SamplingRows, history: torch.Tensor | None = None,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution ``sample`` draws from, [B, V] float32 in vocabulary order, summing
    to 1: after the repetition penalty, temperature, top-k and top-p; a greedy row is one-hot
    at its argmax. (Speculative verification compares a target's and a draft's.)"""
    if rows.any_penalty:
        if history is None or lengths is None:
            raise ValueError("probabilities: repetition_penalty needs the token history of each row")
        logits = apply_repetition_penalty(logits, rows.repetition_penalty, history, lengths)
    B, V = logits.shape
    onehot = torch.nn.functional.one_hot(greedy_tokens(logits), V).to(torch.float32)
    if not rows.any_random:
        return onehot
    sorted_probs, order = _filtered(logits.float(), rows)
    probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(rows.temperature[:, None] > 0, probs, onehot)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token per row of ``probs`` [B, V] (non-negative, not necessarily normalised) by the
    inverse CDF in vocabulary order at ``u`` [B] in [0, 1); never a zero-probability token
    (a row of zeros gives token 0)."""
    B, V = probs.shape
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    last = V - 1 - (probs.flip(-1) > 0).to(torch.int32).argmax(-1)   # the last token it may pick
    return torch.minimum(pick, last)
