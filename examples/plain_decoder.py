"""A small decoder-only language model in plain PyTorch, and fusegen compiling it.

No transformers here: norms, rotary embeddings and attention are written by hand, the way
many research and teaching codebases write them. Run it to see what fusegen found:

    python examples/plain_decoder.py

``bias_mode`` selects two attention variants that are NOT plain causal attention:
``"learned"`` adds a trained distance bias to the scores (ALiBi with learned slopes),
``"bidirectional"`` lets every token see every other one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """cos/sin tables for the positions given, in the rotate_half layout."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [B, S, D]
        return emb.cos()[:, None], emb.sin()[:, None]            # [B, 1, S, D]


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, max_len: int, bias_mode=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = hidden // heads
        self.bias_mode = bias_mode
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        if bias_mode == "learned":
            self.slopes = nn.Parameter(0.1 + 0.1 * torch.rand(heads))

    def forward(self, x, cos, sin, attention_mask=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

        scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
        if self.bias_mode == "learned":
            pos = torch.arange(S, device=x.device)
            distance = (pos[None, :] - pos[:, None]).to(scores.dtype)
            scores = scores + self.slopes[:, None, None] * distance
        if self.bias_mode != "bidirectional":
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        if attention_mask is not None:
            padding = attention_mask[:, None, None, :] == 0
            scores = scores.masked_fill(padding, float("-inf"))
        probs = F.softmax(scores, dim=-1)
        out = probs @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, hidden, heads, kv_heads, max_len, bias_mode):
        super().__init__()
        self.attn_norm = RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads, max_len, bias_mode)
        self.mlp_norm = RMSNorm(hidden)
        self.mlp = MLP(hidden, 4 * hidden)

    def forward(self, x, cos, sin, attention_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attention_mask)
        return x + self.mlp(self.mlp_norm(x))


class PlainDecoder(nn.Module):
    """Token ids [B, S] -> logits [B, S, vocab]."""

    def __init__(self, vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, max_len=512,
                 bias_mode=None, tie_embeddings=True):
        super().__init__()
        if bias_mode not in (None, "learned", "bidirectional"):
            raise ValueError(f"bias_mode must be None, 'learned' or 'bidirectional', got {bias_mode!r}")
        self.embed = nn.Embedding(vocab, hidden)
        self.rotary = Rotary(hidden // heads)
        self.blocks = nn.ModuleList(
            Block(hidden, heads, kv_heads, max_len, bias_mode) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        cos, sin = self.rotary(position_ids)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask)
        return self.lm_head(self.norm(x))


if __name__ == "__main__":
    import fusegen

    torch.manual_seed(0)
    model = PlainDecoder().eval()
    compiled = fusegen.compile(model, "stateless")
    print(compiled.report.table())

    input_ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = model(input_ids)
    got = compiled(input_ids)
    print(f"max abs difference of logits vs. the model: {(got - want).abs().max().item():.3g}")
