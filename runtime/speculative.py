"""Speculative decoding: proposers guess a decode's next tokens, one paged step verifies them
all, and the engine keeps exactly the tokens the target model itself would have chosen.

    proposer        tokens [ ... a b c ]  proposes d1 d2 d3 (k = 3)
    verify step     entries (row, c, 1) (row, c+1, 1) (row, c+2, 1) (row, c+3, 1)
                    inputs        c     d1     d2     d3
                    target picks  x0    x1     x2     x3      (one logits row per entry)
    accept          x0 == d1, x1 == d2, x2 != d3  ->  new tokens d1 d2 x2, d3's slot rolled back

The paged step graph returns the logits of each entry's last token, so a speculating
sequence enters the step as 1 + k entries of one token each, on the same batch row: every
entry writes its token's K/V and attends over the row's context up to and including its
own position (the KV writes of a layer precede its attention). With the Triton kernels a
step of one-token entries runs the split-KV decode kernel, which reads the sequence's K/V
once per entry; per-token logits for a multi-token entry would need a ``logits_indices`` per
token from codegen/step_inputs.py instead.

Acceptance:

- Greedy: the longest prefix of the proposal where every proposed token is the target's
  argmax after the tokens before it; then the target's own token. The output is the
  non-speculative greedy output.
- Sampling, prompt lookup (a proposal is a point mass q = 1 at the proposed token d): the
  rejection rule accepts d with probability min(1, p(d)/q(d)) = p(d) and otherwise draws
  from the residual max(0, p - q), normalised: p with d removed and renormalised. One draw
  x ~ p realises exactly that: P(x = d) = p(d), and given x != d, x follows the residual.
  The engine draws x with the counter-based uniform of (seed, position) that plain
  sampling uses, so a seeded request gives the same tokens with or without speculation.
- Sampling, draft model: see draft.py (accept with min(1, p/q) by a second uniform, else
  draw from the normalised residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusegen.runtime.sampling import draw

ACCEPT_SALT = 0x2545F4914F6CDD1D   # acceptance tests use seed ^ ACCEPT_SALT, not the draws' uniforms


def accepted_prefix(proposal: list[int], chosen: list[int]) -> int:
    """How many proposed tokens the target accepts: ``chosen[j]`` is its token after the
    input and ``proposal[:j]`` (len(proposal) + 1 of them), accepted while it equals
    ``proposal[j]``."""
    n = 0
    while n < len(proposal) and chosen[n] == proposal[n]:
        n += 1
    return n


def rejection_sample(p: torch.Tensor, q: torch.Tensor, proposed: torch.Tensor, u_accept: torch.Tensor,
                     u_draw: torch.Tensor) -> torch.Tensor:
    """The standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) per
    row: the proposed token d, drawn from q, is kept with probability min(1, p(d) / q(d))
    (``u_accept`` < p(d) / q(d)); otherwise the token is drawn at ``u_draw`` from the
    residual max(0, p - q), normalised. The result follows p exactly. A kept token is
    always d and a redrawn one never is (the residual is 0 at d whenever d can be
    rejected), so the accepted run is read back as the prefix equal to the proposal.

    p, q [B, V] float32 (each row summing to 1); proposed, [B] long; uniforms [B]."""
    p_d = p.gather(1, proposed[:, None])[:, 0]
    q_d = q.gather(1, proposed[:, None])[:, 0]
    keep = u_accept * q_d < p_d
    residual = (p - q).clamp(min=0)
    return torch.where(keep, proposed, draw(residual, u_draw))


def split_entries(entries: list[list[int]], proposals: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """[rows, starts, counts, samples] with each speculating entry (count 1 + k) replaced by
    1 + k entries of one token on the same row, so that the step yields logits for every
    position it verifies; and where each original entry's first new entry is.

        entry (row 3, start 9, count 3, samples 1), proposal [d1, d2]
        -> (3, 9, 1, 1) (3, 10, 1, 1) (3, 11, 1, 1)      offsets [.., i, ..] -> i
    """
    out: list[list[int]] = [[], [], [], []]
    offsets = []
    for (row, start, count, samples), proposal in zip(zip(*entries), proposals):
        offsets.append(len(out[0]))
        if not proposal:
            for col, value in zip(out, (row, start, count, samples)):
                col.append(value)
            continue
        if count != 1 + len(proposal) or not samples:
            raise ValueError(f"a speculating entry computes its input token and {len(proposal)} proposed "
                             f"ones and samples, got count {count}, samples {samples}")
        n = count
        out[0] += [row] * n
        out[1] += range(start, start + n)
        out[2] += [1] * n
        out[3] += [1] * n
    return out, offsets


@dataclass
class _NgramIndex:
    """The latest start of every n-gram of a request's tokens that has a token after it."""
    n: int
    last: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0          # n-grams starting before this position are in ``last``

    def update(self, tokens: list[int]) -> None:
        upto = len(tokens) - self.n          # the last n-gram has no continuation yet
        for j in range(self.indexed, upto):
            self.last[tuple(tokens[j:j + self.n])] = j
        self.indexed = max(self.indexed, upto)


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the request's
    last ``n`` tokens in its own prompt and output, at most ``k`` of them. Costs a dict
    lookup per request and step (each request's n-grams are indexed once, as they arrive).

        tokens    5 7 1 2 3 9 4 | 8 1 2 3          n = 3, last 3-gram (1 2 3)
                      ^ latest earlier (1 2 3) at 2  ->  propose 9 4 8 (k = 3)

    A request whose last token is still on the device (overlapped scheduling: the step
    that samples it is in flight) is matched on the n tokens before it, and the occurrence's
    next token stands in for the unknown one: the proposal is the tokens after that. The
    verification does not depend on how a proposal was made, so a wrong stand-in costs only
    the rejected slots.
    """

    overlaps = True   # proposes for a request whose last token is pending

    def __init__(self, k: int = 4, n: int = 3):
        if k < 1 or n < 1:
            raise ValueError(f"NgramProposer needs k >= 1 and n >= 1, got k={k}, n={n}")
        self.k, self.n = k, n

    def propose(self, requests: list, caps: list[int]) -> list[list[int]]:
        return [self.propose_one(req.tokens, req.num_pending, cap, req) for req, cap in zip(requests, caps)]

    def propose_one(self, tokens: list[int], pending: int, cap: int, req=None) -> list[int]:
        if pending > 1 or len(tokens) <= self.n:
            return []
        index = getattr(req, "spec", None)
        if not isinstance(index, _NgramIndex):
            index = _NgramIndex(self.n)
            if req is not None:
                req.spec = index
        index.update(tokens)
        j = index.last.get(tuple(tokens[-self.n:]))
        if j is None:
            return []
        begin = j + self.n + pending       # skip the stand-in for a pending token
        return tokens[begin:begin + min(cap, self.k)]
