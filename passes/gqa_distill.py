"""``gqa_distill_steps`` (called by convert_mha_to_gqa, opt-in): a short distillation of the
converted attention weights against the original model's logits on the calibration text.

The merges (``mean``, ``lsq``) and the per-layer refit fit each layer to the original's
activations at that layer; their errors still add up through the layers after it.
Distillation fits what the model outputs (Hinton et al. 2015, "Distilling the knowledge in a
neural network"): Adam on the q/k/v/o projection weights and biases of every converted
layer, minimising the KL divergence of the next-token distributions

    KL(p_original || p_converted), averaged over every position of the calibration windows,

with the graph as it was before the conversion (a copy) as the teacher. Nothing else
moves: the KV head count, the graph and every other weight stay as the conversion left
them, and ``gqa_distill_steps=0`` (the default) leaves the converted weights untouched.

Autograd runs through the graph itself: an interpreter replaces the two fusegen ops the
graph holds at this point, ``attention`` and ``rotate_half``, by their reference math in
plain PyTorch (fusegen/ops.py), which autograd follows.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from fusegen.ops import attention_reference, rotate_half_reference
from fusegen.passes.gqa_layers import NAME, back_to_linear, forward_to_linear, graph_args
from fusegen.passes.infra import getattr_path, refusal

aten = torch.ops.aten
LEARNING_RATE = 3e-5   # Adam; the projections' entries are O(1e-2), so a step moves them ~0.3%
WINDOWS_PER_STEP = 2
KL_WINDOWS = 8         # the KL reported before and after: over the first windows only (it costs two forwards each)
REFERENCES = {torch.ops.fusegen.attention.default: attention_reference,
              torch.ops.fusegen.rotate_half.default: rotate_half_reference}


class _Differentiable(fx.Interpreter):
    """Runs the graph with fusegen's ops replaced by their autograd-friendly references."""

    def call_function(self, target, args, kwargs):
        return REFERENCES.get(target, target)(*args, **kwargs)


def attention_weights(gm: fx.GraphModule, sites: list[fx.Node]) -> list[Tensor]:
    """The weight and bias tensors of every site's q, k, v and o projections, once each, as
    leaf tensors (one computed from others, as a loader may leave it, is detached in place:
    the graph reads the same values, now with no history)."""
    tensors, seen = [], set()
    for site in sites:
        projections = [back_to_linear(site.args[i])[0] for i in range(3)] + [forward_to_linear(site)]
        for linear in projections:
            positions = (1, 2) if linear.target is aten.linear.default else (2, 0)   # addmm: (bias, x, W)
            for position in positions:
                arg = linear.args[position] if position < len(linear.args) else None
                if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target not in seen:
                    seen.add(arg.target)
                    tensors.append(_leaf(gm, arg.target))
    return tensors


def _leaf(gm: fx.GraphModule, target: str) -> Tensor:
    tensor = getattr_path(gm, target)
    if tensor.is_leaf:
        return tensor
    owner, _, name = target.rpartition(".")
    module = getattr_path(gm, owner) if owner else gm
    setattr(module, name, tensor.detach())
    return getattr(module, name)


def _check_ops(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "fusegen" and target not in REFERENCES:
            raise refusal(NAME, f"gqa_distill_steps cannot differentiate through {target}", node,
                          "gqa_distill_steps=0")


def _kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    teacher = nn.functional.log_softmax(teacher_logits.float(), -1)
    student = nn.functional.log_softmax(student_logits.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@torch.no_grad()
def mean_kl(gm: fx.GraphModule, teacher: fx.GraphModule, ids: Tensor) -> float:
    """KL(teacher || gm), nats per position, over every position of the windows ``ids``."""
    total = 0.0
    for start in range(0, ids.shape[0], WINDOWS_PER_STEP):
        batch = ids[start:start + WINDOWS_PER_STEP]
        total += _kl(teacher(*graph_args(batch)), gm(*graph_args(batch))).item() * batch.shape[0]
    return total / ids.shape[0]


def distill_attention(gm: fx.GraphModule, teacher: fx.GraphModule, sites: list[fx.Node], ids: Tensor,
                      steps: int, seed: int = 0) -> dict:
    """``steps`` Adam steps on the attention weights of ``sites`` in ``gm`` (in place), each
    on WINDOWS_PER_STEP calibration windows drawn with ``seed``; the counters."""
    _check_ops(gm)
    weights = attention_weights(gm, sites)
    kl_before = mean_kl(gm, teacher, ids[:KL_WINDOWS])
    generator = torch.Generator().manual_seed(seed)
    trained = {id(w) for w in weights}
    frozen = [t for t in gm.parameters() if id(t) not in trained]   # no gradient for the rest
    flags = [t.requires_grad for t in weights + frozen]
    for t in weights + frozen:
        t.requires_grad_(id(t) in trained)
    optimizer = torch.optim.Adam(weights, lr=LEARNING_RATE)
    try:
        for _ in range(steps):
            batch = ids[torch.randperm(ids.shape[0], generator=generator)[:WINDOWS_PER_STEP]]
            with torch.no_grad():
                target = teacher(*graph_args(batch))
            loss = _kl(target, _Differentiable(gm).run(*graph_args(batch)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for t, flag in zip(weights + frozen, flags):
            t.requires_grad_(flag)
            t.grad = None
    return {"distill_steps": steps, "distill_tensors": len(weights),
            "distill_kl_before": round(kl_before, 4), "distill_kl_after": round(mean_kl(gm, teacher, ids[:KL_WINDOWS]), 4)}
