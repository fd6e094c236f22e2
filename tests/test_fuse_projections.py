"""fuse_projections before and after.

- Hand-written modules captured with ``fusegen.capture`` and cleaned up, the pass run
  directly and verified as the pipeline does (with a full symbolic re-run): three projections
  of one input become one linear, a projection of another input stays; bias mixes; a view
  that needs contiguous memory keeps its projection unfused.
- Mini Llama and Qwen2 (biased q/k/v): one q/k/v and one gate/up group per layer, logits as HF's.
- GPT-2: its Conv1D c_attn is one addmm already; nothing to fuse.
- The user's model is left as it was.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import families
import fusegen
from fusegen.config import CompileConfig
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.fuse_projections import fuse_projections
from fusegen.passes.infra import PassContext, call_nodes, getattr_path, val, verify
from helpers import assert_close_report

aten = torch.ops.aten
LAYERS = 2  # families.mini_model


def _run_pass(gm, ctx: PassContext | None = None):
    """The pass as the pipeline runs it: recompile, then verify (here with shapes re-derived)."""
    ctx = ctx or PassContext(config=CompileConfig(verify_shapes=True))
    result = fuse_projections(gm, ctx)
    result.gm.recompile()
    if result.changed:
        verify(result.gm, fuse_projections, ctx)
    return result


def _captured(module: nn.Module):
    torch.manual_seed(0)
    module = module.eval()
    result = cleanup_graph(fusegen.capture(module), PassContext())
    result.gm.recompile()
    return module, result.gm


def _run(gm, ids):
    B, S = ids.shape
    with torch.no_grad():
        return gm(ids, torch.ones_like(ids), torch.arange(S).expand(B, S))


def _weight(gm, linear):
    return getattr_path(gm, linear.args[1].target)


def _bias(gm, linear):
    return getattr_path(gm, linear.args[2].target) if len(linear.args) > 2 else None


# --- hand-written modules --------------------------------------------------------------------

class SharedInput(nn.Module):
    """q/k/v-like projections of one input (GQA widths 16/8/8) and a head on another input."""

    def __init__(self, bias=(True, True, True)):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.q = nn.Linear(16, 16, bias=bias[0])
        self.k = nn.Linear(16, 8, bias=bias[1])
        self.v = nn.Linear(16, 8, bias=bias[2])
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        B, S = input_ids.shape
        x = self.embed(input_ids)
        q = self.q(x).view(B, S, 2, 8)
        kv = torch.stack([self.k(x), self.v(x)], 2)
        return self.head(torch.relu((q * kv).reshape(B, S, 16)))


def test_three_projections_of_one_input_become_one_linear():
    model, gm = _captured(SharedInput())
    ids = torch.randint(0, 32, (2, 7))
    want = _run(gm, ids)
    q_meta = next(n for n in gm.graph.nodes if n.target is aten.linear.default).meta
    ctx = PassContext(config=CompileConfig(verify_shapes=True))

    result = _run_pass(gm, ctx)

    assert result.changed
    assert result.stats == {"groups_fused": 1, "linears_fused": 3}
    fused, head = call_nodes(result.gm, aten.linear.default)
    assert tuple(val(fused).shape[-1:]) == (32,)  # 16 + 8 + 8
    assert torch.equal(_weight(result.gm, fused), torch.cat([model.q.weight, model.k.weight, model.v.weight]))
    assert torch.equal(_bias(result.gm, fused), torch.cat([model.q.bias, model.k.bias, model.v.bias]))
    assert fused.meta["nn_module_stack"] == q_meta["nn_module_stack"]
    assert head.args[1].target == "m.head.weight" and head.args[0] is not fused.args[0]
    (split,) = call_nodes(result.gm, aten.split_with_sizes.default)
    assert split.args == (fused, [16, 8, 8], -1)
    parts = call_nodes(result.gm, operator.getitem)
    assert [p.args for p in parts] == [(split, 0), (split, 1), (split, 2)]
    assert ctx.facts["fuse_projections.groups"] == {
        "fusegen_fused_proj_0_weight": ["m.q.weight", "m.k.weight", "m.v.weight"]}
    assert_close_report(_run(result.gm, ids), want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert_close_report(_run(result.gm, ids), model(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias, zero_filled", [((False, False, False), 0), ((True, False, True), 1)],
                         ids=["no_bias", "mixed_bias"])
def test_bias_free_and_mixed_groups(bias, zero_filled):
    """No bias stays no bias; a member without one gets zeros in the fused bias."""
    model, gm = _captured(SharedInput(bias))
    ids = torch.randint(0, 32, (2, 7))
    want = _run(gm, ids)

    result = _run_pass(gm)

    assert result.stats == {"groups_fused": 1, "linears_fused": 3,
                            **({"bias_zero_filled": zero_filled} if zero_filled else {})}
    fused = call_nodes(result.gm, aten.linear.default)[0]
    bias = _bias(result.gm, fused)
    if zero_filled:
        assert torch.equal(bias, torch.cat([model.q.bias, torch.zeros(8), model.v.bias]))
    else:
        assert bias is None
    assert_close_report(_run(result.gm, ids), want, atol=1e-6, rtol=1e-6)


class FlattenedProjection(nn.Module):
    """k is flattened with view(-1): a part of a fused output is strided, so it cannot be."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, input_ids):
        B, S = input_ids.shape
        x = self.embed(input_ids)
        k = self.k(x).view(-1) * 2.0
        return self.q(x) * k.view(B, S, 16) + self.v(x)


def test_a_view_that_needs_contiguous_memory_keeps_its_projection():
    model, gm = _captured(FlattenedProjection())
    ids = torch.randint(0, 32, (2, 7))
    want = _run(gm, ids)

    result = _run_pass(gm)

    assert result.stats == {"groups_fused": 1, "linears_fused": 2, "linears_skipped_layout": 1}
    linears = {n.args[1].target: n for n in call_nodes(result.gm, aten.linear.default)}
    assert sorted(linears) == ["fusegen_fused_proj_0_weight", "m.k.weight"]
    fused = linears["fusegen_fused_proj_0_weight"]
    assert tuple(_weight(result.gm, fused).shape) == (32, 16)
    assert_close_report(_run(result.gm, ids), want, atol=1e-6, rtol=1e-6)


def test_a_fused_graph_has_nothing_left_to_fuse():
    _, gm = _captured(SharedInput())
    gm = _run_pass(gm).gm
    again = _run_pass(gm)
    assert not again.changed and again.stats == {}


# --- HF families -----------------------------------------------------------------------------

def _fused_compile(model):
    """A stateless compile with fuse_projections applied: its pipeline record if the pipeline
    ran it, else the pass run here on the compiled graph."""
    compiled = fusegen.compile(model, "stateless")
    records = [r for r in compiled.report.records if r.name == "fuse_projections"]
    if records:
        return compiled, records[0].changed, records[0].stats
    ctx = PassContext(config=compiled.config.replace(verify_shapes=True), facts=compiled.facts)
    result = _run_pass(compiled.graph_module, ctx)
    compiled.graph_module = result.gm
    return compiled, result.changed, result.stats


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def family(request):
    model = families.mini_model(request.param)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    compiled, changed, stats = _fused_compile(model)
    return request.param, model, params, before, compiled, changed, stats


def test_one_qkv_and_one_gate_up_group_per_layer(family):
    name, model, _, _, compiled, changed, stats = family
    gm = compiled.graph_module
    linears = call_nodes(gm, aten.linear.default)
    if name == "gpt2":  # c_attn / c_fc are addmm; the only linear is lm_head
        assert not changed and stats == {}
        assert len(linears) == 1
        return
    assert changed and stats == {"groups_fused": 2 * LAYERS, "linears_fused": 5 * LAYERS}
    assert len(linears) == LAYERS * 4 + 1  # qkv, o, gate_up, down; lm_head
    fused = [n for n in linears if n.args[1].target.startswith("fusegen_fused_proj_")]
    qkv, gate_up = fused[0::2], fused[1::2]
    layer = model.model.layers[0]
    for node in qkv:  # q 64 + k 32 + v 32
        assert tuple(_weight(gm, node).shape) == (128, 64)
        assert (_bias(gm, node) is not None) == (name == "qwen2")
    for node in gate_up:  # 2 x intermediate 128
        assert tuple(_weight(gm, node).shape) == (256, 64) and _bias(gm, node) is None
    attn = layer.self_attn
    assert torch.equal(_weight(gm, qkv[0]),
                       torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    if name == "qwen2":
        assert torch.equal(_bias(gm, qkv[0]), torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))


def test_fused_logits_match_hf(family):
    name, model, _, _, compiled, _, _ = family
    ids, mask = families.left_padded([9, 6], width=9)
    with torch.no_grad():
        want = model(ids).logits
        want_padded = model(ids, attention_mask=mask).logits
    assert_close_report(compiled(ids), want, atol=1e-5, rtol=1e-5, msg=name)
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], want_padded[real], atol=1e-5, rtol=1e-5,
                        msg=f"{name}, left-padded")


def test_the_users_model_is_left_as_it_was(family):
    _, model, params, before, _, _, _ = family
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
