"""Next-token choice for a batch of logits, on the logits' device.

    logits [B, V] --repetition penalty--> --temperature--> --top-k--> --top-p--> draw

The order and the penalty follow HF's processors (``RepetitionPenaltyLogitsProcessor``,
then ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``). A row with
``temperature == 0`` is greedy; a batch of greedy rows takes one argmax.

A sampled row draws exactly one uniform number per token from its own ``torch.Generator``
(inverse-CDF over its sorted, filtered distribution), so a seeded request gets the same
tokens whichever requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off; > 1 discourages tokens already seen
    seed: int | None = None           # None: torch's global generator

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]],
                             penalties: list[float]) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by the penalty if positive, else
    multiplied. Rows with penalty 1 are untouched."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return logits
    logits = logits.clone()
    width = max(len(history[i]) for i in rows)
    seen = torch.tensor([history[i] + [history[i][0]] * (width - len(history[i])) for i in rows],
                        dtype=torch.long, device=logits.device)
    sub = logits[rows]
    penalty = torch.tensor([penalties[i] for i in rows], dtype=logits.dtype,
                           device=logits.device)[:, None]
    picked = sub.gather(1, seen)
    sub.scatter_(1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    logits[rows] = sub
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None] | None = None,
           history: list[list[int]] | None = None) -> torch.Tensor:
    """Token ids [B] (long, on ``logits.device``) for ``logits`` [B, V]. ``history[i]``
    (prompt + generated tokens) is needed when a row has a repetition penalty."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"sample: logits {tuple(logits.shape)} must be [B, V] with B = "
                         f"{len(params)} sampling params")
    generators = generators if generators is not None else [None] * len(params)
    if any(p.repetition_penalty != 1.0 for p in params):
        if history is None:
            raise ValueError("sample: repetition_penalty needs the token history of each row")
        logits = apply_repetition_penalty(logits, history, [p.repetition_penalty for p in params])
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        tokens[idx] = _draw(logits[idx].float(), [params[i] for i in drawn],
                            [generators[i] for i in drawn])
    return tokens


def _draw(logits: torch.Tensor, params: list[SamplingParams],
          generators: list[torch.Generator | None]) -> torch.Tensor:
    B, V = logits.shape
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    top_k = torch.tensor([p.top_k or V for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    # Stable: equal logits keep vocabulary order, so a draw never depends on sort internals.
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=dev)[None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    cdf = probs.cumsum(-1)
    nucleus = (cdf - probs) < top_p     # keep the smallest head whose mass reaches top_p
    probs = probs * nucleus
    cdf = probs.cumsum(-1)
    kept = (probs > 0).sum(-1, keepdim=True).clamp(min=1)
    u = torch.cat([torch.rand(1, device=dev, generator=g) for g in generators])[:, None]
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=kept - 1)
    return order.gather(1, pick)[:, 0]
