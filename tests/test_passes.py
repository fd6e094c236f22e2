"""Each graph pass before and after, on tiny graphs.

- cleanup_graph / normalize_graph: hand-written modules captured with ``fusegen.capture``,
  the pass run directly, exact counters, the rewritten nodes, numerics unchanged.
- fuse_attention: the HF sdpa and eager paths, a hand-written decoder and a sliding-window
  model; sites that are not plain attention (a learned bias) are left alone and reported.
- insert_kv_cache / insert_paged_blocks: graph inputs, one write and one read per layer,
  the LM head computing only the rows ``logits_indices`` picks, provenance next to what
  fuse_projections and fuse_pointwise (which run in the same compile) leave in the graph;
  the paged graph run step by step against the HF model.
- The block pool the paged runtime allocates from, with exact block ids.

Every compile is module-scoped and shared: capturing is the slow part (a few seconds each).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import operator
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import fusegen
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.infra import PROVENANCE, PassContext, call_nodes, node_counts, val
from fusegen.passes.normalize_graph import normalize_graph
from fusegen.passes.pipeline import run_pipeline
from fusegen.kv import PAGED_INPUTS, KVGeometry
from helpers import assert_close_report

aten = torch.ops.aten
ops = torch.ops.fusegen

LAYERS = 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
VOCAB = 256


def _load_plain_decoder():
    path = Path(__file__).resolve().parents[1] / "examples" / "plain_decoder.py"
    spec = importlib.util.spec_from_file_location("plain_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PlainDecoder = _load_plain_decoder().PlainDecoder


def _llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,  # 32000
        hidden_size=HEADS * HEAD_DIM,  # 4096
        intermediate_size=128,  # 11008
        num_hidden_layers=LAYERS,  # 32
        num_attention_heads=HEADS,  # 32
        num_key_value_heads=KV_HEADS,  # 8 (Llama-3-8B)
        max_position_embeddings=128,  # 8192
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _mistral(sliding_window: int):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,  # 32000
        hidden_size=HEADS * HEAD_DIM,  # 4096
        intermediate_size=128,  # 14336
        num_hidden_layers=LAYERS,  # 32
        num_attention_heads=HEADS,  # 32
        num_key_value_heads=KV_HEADS,  # 8
        max_position_embeddings=128,  # 32768
        sliding_window=sliding_window,  # 4096 (Mistral-7B-v0.1)
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def _plain(bias_mode=None):
    torch.manual_seed(0)
    return PlainDecoder(vocab=VOCAB, hidden=HEADS * HEAD_DIM, layers=LAYERS, heads=HEADS,
                        kv_heads=KV_HEADS, bias_mode=bias_mode).eval()


def _logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def _padded_batch(S: int = 11, seed: int = 0):
    """Two rows, the second left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def _graph_inputs(ids, mask=None):
    B, S = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    return ids, mask, torch.arange(S).expand(B, S)


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


# --- cleanup_graph ---------------------------------------------------------------------------

class Leftovers(nn.Module):
    """Token ids -> logits through ops that compute nothing at inference."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.drop(self.embed(input_ids))            # eval: dropout(x, 0.1, train=False)
        x = x.clone().contiguous()                      # export drops contiguous() of a contiguous tensor
        x = x.to(torch.float32)                         # already float32
        return self.head(x)


def _capture(module: nn.Module):
    torch.manual_seed(0)
    module = module.eval()
    return module, fusegen.capture(module)


def _run(gm, ids):
    with torch.no_grad():
        return gm(*_graph_inputs(ids))


def test_cleanup_graph_removes_identities_with_exact_counts():
    model, gm = _capture(Leftovers())
    before = node_counts(gm)
    assert before["aten.dropout"] == 1 and before["aten.clone"] == 1 and before["aten.to"] == 1

    result = cleanup_graph(gm, PassContext())
    result.gm.recompile()

    assert result.changed
    assert result.stats == {
        "dropout_removed": 1,       # the clone stays: it is a real copy
        "noop_cast_removed": 1,     # .to(float32) of a float32 tensor
        "asserts_removed": 1,       # the dtype assert export put before the cast
        "guards_removed": 1,        # export's input guard module
    }
    after = node_counts(result.gm)
    for op in ("aten.dropout", "aten.contiguous", "aten.to",
               "aten._assert_tensor_metadata", "call_module"):
        assert after[op] == 0, op
    assert after["aten.clone"] == 1
    placeholders = [n.target for n in result.gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask", "position_ids"]

    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        want = model(ids)
    assert torch.equal(_run(result.gm, ids), want)


def test_cleanup_graph_on_a_clean_graph_changes_nothing_but_the_calling_convention():
    class Clean(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.head = nn.Linear(16, 32)

        def forward(self, input_ids):
            return self.head(torch.relu(self.embed(input_ids)))

    _, gm = _capture(Clean())
    result = cleanup_graph(gm, PassContext())
    assert result.stats == {"guards_removed": 1}
    assert node_counts(result.gm)["aten.relu"] == 1


class ContiguousThenView(nn.Module):
    """``x.transpose(1, 2).contiguous().view(...)``: the view needs the copy contiguous() made
    (nanoGPT's attention ends this way)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        B, S = input_ids.shape
        x = self.embed(input_ids).view(B, S, 4, 4).transpose(1, 2).contiguous().view(B, 4, S * 4)
        return self.head(x.transpose(1, 2).reshape(B, S, 16))


class CloneThenInPlace(nn.Module):
    """A clone that is then modified in place: the original must stay as it was."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        y = x.clone()
        y.mul_(2.0)
        return self.head(x + y)


class CloneThenSliceAssign(nn.Module):
    """A clone written through a view (``y[:, 0] = 0``): how masks were often edited in place."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        y = x.clone()
        y[:, 0] = 0.0
        return self.head(x + y)


class SourceWrittenAfterClone(nn.Module):
    """The original is written through a view after the copy was taken."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids) * 1.0
        y = x.clone()
        x[:, 0].zero_()
        return self.head(x + y)


@pytest.mark.parametrize("module", [ContiguousThenView, CloneThenInPlace, CloneThenSliceAssign,
                                    SourceWrittenAfterClone])
def test_cleanup_graph_keeps_copies_the_computation_depends_on(module):
    """A contiguous() a view needs, clones mutated in place or through a view, a source
    written after the copy: cleanup must not change what the graph computes."""
    model, gm = _capture(module())
    result = cleanup_graph(gm, PassContext())
    result.gm.recompile()
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        want = model(ids)
    assert_close_report(_run(result.gm, ids), want)


class CloneOfAWeight(nn.Module):
    """Scales a copy of its weight in place; the weight itself never changes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids):
        weight = self.head.weight.clone()
        weight.mul_(2.0)
        return nn.functional.linear(self.embed(input_ids), weight)


def test_running_the_cleaned_graph_leaves_the_weights_alone():
    model, gm = _capture(CloneOfAWeight())
    weight = model.head.weight.detach().clone()
    result = cleanup_graph(gm, PassContext())
    result.gm.recompile()
    ids = torch.randint(0, 32, (2, 7))
    _run(result.gm, ids)
    _run(result.gm, ids)
    assert torch.equal(model.head.weight, weight)


# --- normalize_graph -------------------------------------------------------------------------

class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        B, S = input_ids.shape
        x = self.embed(input_ids).view(B, S, 4, 4)
        x = (x / 4.0).transpose(-1, -2)
        x = torch.softmax(x, dim=-1)
        return self.head(x.reshape(B, S, 16))


def test_normalize_graph_rewrites_to_one_spelling():
    model, gm = _capture(Spellings())
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        want = model(ids)

    result = normalize_graph(gm, PassContext())
    result.gm.recompile()

    assert result.changed
    assert result.stats == {"div_to_mul": 1, "transpose_canonical": 1, "softmax_canonical": 1}
    targets = _targets(result.gm)
    assert aten.div.Tensor not in targets and aten.softmax.int not in targets
    (mul,) = call_nodes(result.gm, aten.mul.Tensor)
    assert mul.args[1] == 0.25
    (transpose,) = call_nodes(result.gm, aten.transpose.int)
    assert transpose.args[0] is mul and tuple(transpose.args[1:]) == (2, 3)
    (softmax,) = call_nodes(result.gm, aten._softmax.default)
    assert softmax.args[0] is transpose and tuple(softmax.args[1:]) == (3, False)
    assert_close_report(_run(result.gm, ids), want)


def test_normalize_graph_leaves_canonical_graphs_alone():
    class Canonical(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.head = nn.Linear(16, 32)

        def forward(self, input_ids):
            return self.head(self.embed(input_ids) * 0.5)

    _, gm = _capture(Canonical())
    result = normalize_graph(gm, PassContext())
    assert not result.changed and result.stats == {}


class Rotary(nn.Module):
    """``x * cos + rotate_half(x) * sin`` on [B, H, S, D] heads, rotate_half spelled out the
    way HF models write it (``form="hf"``) or in a layout that is a different computation."""

    FORMS = {
        "hf": lambda x, y, h: torch.cat((-x[..., h:], x[..., :h]), dim=-1),
        "halves_swapped": lambda x, y, h: torch.cat((-x[..., :h], x[..., h:]), dim=-1),
        "neg_second": lambda x, y, h: torch.cat((x[..., h:], -x[..., :h]), dim=-1),
        "two_sources": lambda x, y, h: torch.cat((-x[..., h:], y[..., :h]), dim=-1),
        "not_last_dim": lambda x, y, h: torch.cat((-x[:, 1:], x[:, :1]), dim=1),  # over heads
    }

    def __init__(self, form: str = "hf"):
        super().__init__()
        self.form = form
        self.embed = nn.Embedding(32, 16)
        self.cos = nn.Parameter(torch.randn(8))
        self.sin = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        B, S = input_ids.shape
        x = self.embed(input_ids).view(B, S, 2, 8).transpose(1, 2)   # [B, 2, S, 8]
        y = x * 2.0 if self.form == "two_sources" else None
        rotated = self.FORMS[self.form](x, y, 4)
        out = x * self.cos + rotated * self.sin
        return self.head(out.transpose(1, 2).reshape(B, S, 16))


def _clean_capture(module: nn.Module):
    """Capture, then cleanup_graph: the graph normalize_graph sees in the pipeline."""
    model, gm = _capture(module)
    result = cleanup_graph(gm, PassContext())
    result.gm.recompile()
    return model, result.gm


def test_normalize_graph_rewrites_rotate_half_to_one_op():
    model, gm = _clean_capture(Rotary())
    (cat,) = call_nodes(gm, aten.cat.default)
    (neg,) = call_nodes(gm, aten.neg.default)
    assert cat.args[0][0] is neg
    provenance = cat.meta.get(PROVENANCE)
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        want = model(ids)

    result = normalize_graph(gm, PassContext())
    result.gm.recompile()

    assert result.changed
    assert result.stats == {"rotate_half": 1}
    assert aten.cat.default not in _targets(result.gm)
    (rot,) = call_nodes(result.gm, ops.rotate_half.default)
    assert rot is cat  # rewritten in place: the same node, its metadata kept
    assert rot.meta.get(PROVENANCE) == provenance
    assert not rot.kwargs
    (source,) = rot.args
    assert source.target is aten.transpose.int
    # rotate_half reads the very [B, H, S, D] tensor the cos product reads
    by_weight = {m.args[1].target: m for m in call_nodes(result.gm, aten.mul.Tensor)}
    assert set(by_weight) == {"m.cos", "m.sin"}
    assert by_weight["m.cos"].args[0] is source and by_weight["m.sin"].args[0] is rot
    assert val(rot).shape == val(source).shape
    assert_close_report(_run(result.gm, ids), want, atol=1e-6, rtol=1e-6)


def test_normalize_graph_rotate_half_leaves_no_dead_nodes():
    """The rewritten cat no longer reads neg(x[..., D/2:]) or x[..., :D/2]: those nodes leave
    the graph with it, not left behind for a later pass to collect."""
    _, gm = _clean_capture(Rotary())
    assert len(call_nodes(gm, aten.slice.Tensor)) == 2 and len(call_nodes(gm, aten.neg.default)) == 1
    before = len(gm.graph.nodes)
    result = normalize_graph(gm, PassContext())
    assert result.stats == {"rotate_half": 1}
    dead = [n.name for n in result.gm.graph.nodes if n.op == "call_function" and not n.users]
    assert dead == []
    assert aten.neg.default not in _targets(result.gm)
    assert aten.slice.Tensor not in _targets(result.gm)
    assert len(result.gm.graph.nodes) == before - 3  # neg and both slices


@pytest.mark.parametrize("form", ["halves_swapped", "neg_second", "two_sources", "not_last_dim"])
def test_normalize_graph_leaves_other_cats_alone(form):
    model, gm = _clean_capture(Rotary(form))
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        want = model(ids)
    before = node_counts(gm)
    assert before["aten.cat"] == 1 and before["aten.neg"] == 1
    result = normalize_graph(gm, PassContext())
    result.gm.recompile()
    assert not result.changed and result.stats == {}
    assert node_counts(result.gm) == before
    assert_close_report(_run(result.gm, ids), want, atol=1e-6, rtol=1e-6)


# --- fuse_attention --------------------------------------------------------------------------

# name -> (model factory, fuse_attention counters after a "stateless" compile, window)
FORMS = {
    "llama_sdpa": (lambda: _llama("sdpa"), {"fused_sdpa": LAYERS}, 0),
    "llama_eager": (lambda: _llama("eager"), {"fused_eager": LAYERS}, 0),
    "plain_decoder": (_plain, {"fused_eager": LAYERS}, 0),
    "mistral_window4": (lambda: _mistral(4), {"fused_sdpa": LAYERS, "sliding_window": LAYERS}, 4),
}
# PlainDecoder's own output is NaN on real tokens of a left-padded batch: a pad query row sees
# no key, its NaN hidden state becomes a masked value row, and 0 * NaN reaches real rows.
NAN_WITH_PADDING = {"plain_decoder"}


@pytest.fixture(scope="module", params=list(FORMS))
def fused(request):
    make, form_counters, window = FORMS[request.param]
    model = make()
    compiled = fusegen.compile(model, "stateless")
    counters = {"fused": LAYERS, "causal": LAYERS, "gqa": LAYERS, "key_padding": LAYERS, **form_counters}
    return request.param, model, compiled, counters, window


def _stats(compiled, name: str) -> dict:
    (record,) = [r for r in compiled.report.records if r.name == name]
    return record.stats


def test_fuse_attention_counts_every_site(fused):
    _, _, compiled, counters, _ = fused
    assert _stats(compiled, "fuse_attention") == counters
    assert compiled.facts["fuse_attention.unfused"] == []


def test_fuse_attention_leaves_no_unfused_attention(fused):
    _, _, compiled, _, _ = fused
    targets = _targets(compiled.graph_module)
    for op in (aten.scaled_dot_product_attention.default, aten._softmax.default, aten.softmax.int):
        assert op not in targets
    assert len(call_nodes(compiled.graph_module, ops.attention.default)) == LAYERS


def test_fused_attention_arguments(fused):
    _, _, compiled, _, window = fused
    gm = compiled.graph_module
    mask_input = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    for node in call_nodes(gm, ops.attention.default):
        q, k, v, key_mask, scale, causal, node_window, softcap = node.args
        assert scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
        assert causal is True
        assert node_window == window
        assert softcap == 0.0
        assert key_mask is mask_input
        # repeat_kv undone: k and v keep their own head count
        assert val(q).shape[1] == HEADS
        assert val(k).shape[1] == KV_HEADS and val(v).shape[1] == KV_HEADS
        assert node.meta[PROVENANCE] == "fuse_attention"


def test_fused_graph_matches_the_model(fused):
    name, model, compiled, _, _ = fused
    ids, mask = _padded_batch(S=11)  # longer than the sliding window
    assert_close_report(compiled(ids), _logits(model, ids), atol=1e-5, rtol=1e-5, msg=name)
    if name not in NAN_WITH_PADDING:
        real = mask.bool()
        assert_close_report(compiled(ids, mask)[real], _logits(model, ids, mask)[real],
                            atol=1e-5, rtol=1e-5, msg=f"{name}, left-padded")


def test_a_window_longer_than_max_seq_len_is_not_silently_dropped():
    """The mask is probed at ``max_seq_len`` tokens, where a 16-token window is invisible, so
    the site is fused as full causal attention. A 30-token input must then be refused (it is
    longer than the 14 tokens the model was compiled for) or computed with the window."""
    model = _mistral(16)
    compiled = fusegen.compile(model, "stateless,max_seq_len=14")
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    try:
        got = compiled(ids)
    except ValueError as refused:
        assert "14" in str(refused)
        return
    assert_close_report(got, _logits(model, ids), atol=1e-5, rtol=1e-5)


# --- fuse_attention: sites that are not plain attention --------------------------------------
#
# One capture of the learned-bias model serves three configs: ``fusegen.compile`` is capture
# followed by ``run_pipeline``, so running the pipeline on copies of the capture is the same
# compile at a third of the cost.

@pytest.fixture(scope="module")
def learned_bias():
    """ALiBi with learned slopes: an additive bias computed from a parameter."""
    model = _plain("learned")
    return model, fusegen.capture(model)


def _pipeline(captured, config):
    ctx = PassContext(config=fusegen.CompileConfig.preset(config) if isinstance(config, str) else config)
    with warnings.catch_warnings():  # copying export's pytree specs warns about a deprecated API
        warnings.simplefilter("ignore", FutureWarning)
        captured = copy.deepcopy(captured)
    gm, records = run_pipeline(captured, ctx)
    return gm, {r.name: r for r in records}, ctx.facts


def test_learned_bias_is_not_fused(learned_bias):
    model, captured = learned_bias
    gm, records, facts = _pipeline(captured, "stateless")
    assert records["fuse_attention"].stats == {"unfused": LAYERS}
    assert not records["fuse_attention"].changed
    reasons = facts["fuse_attention.unfused"]
    assert len(reasons) == LAYERS
    for layer, reason in enumerate(reasons):
        assert f"blocks.{layer}.attn.slopes" in reason and "learned bias" in reason
    assert not call_nodes(gm, ops.attention.default)
    assert len(call_nodes(gm, aten._softmax.default)) == LAYERS

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = gm(*_graph_inputs(ids))
    assert_close_report(got, _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_strict_refuses_the_learned_bias(learned_bias):
    _, captured = learned_bias
    config = fusegen.CompileConfig(strict=True, insert_kv_cache=False, paged_kv=False)
    with pytest.raises(fusegen.PassError) as info:
        _pipeline(captured, config)
    assert info.value.pass_name == "fuse_attention"
    message = str(info.value)
    assert message.startswith("[fuse_attention]")
    assert f"{LAYERS} attention site(s) left unfused" in message
    assert "slopes" in message


def test_kv_cache_refuses_unfused_sites(learned_bias):
    """The default config caches K/V; an unfused site has no K/V the pass could cache, and the
    error must say so (not that no attention was found)."""
    _, captured = learned_bias
    with pytest.raises(fusegen.PassError) as info:
        _pipeline(captured, "default")
    assert info.value.pass_name == "insert_kv_cache"
    message = str(info.value)
    assert "not fused" in message and "cannot be cached" in message
    assert "slopes" in message


def test_bidirectional_attention_is_fused_without_causality():
    model = _plain("bidirectional")
    compiled = fusegen.compile(model, "stateless")
    assert _stats(compiled, "fuse_attention") == {
        "fused": LAYERS, "fused_eager": LAYERS, "gqa": LAYERS, "key_padding": LAYERS}
    nodes = call_nodes(compiled.graph_module, ops.attention.default)
    assert len(nodes) == LAYERS
    for node in nodes:
        assert node.args[5] is False and node.args[6] == 0  # causal, window
    ids, mask = _padded_batch()
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], _logits(model, ids, mask)[real],
                        atol=1e-5, rtol=1e-5)


# --- insert_kv_cache / insert_paged_blocks ---------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return _llama("sdpa")


@pytest.fixture(scope="module")
def dense(llama):
    return fusegen.compile(llama, "dense_kv")


@pytest.fixture(scope="module")
def paged(llama):
    return fusegen.compile(llama, "default")


def _placeholders(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _layers_once(nodes, position: int) -> None:
    assert sorted(n.args[position] for n in nodes) == list(range(LAYERS))


# fuse_pointwise on this Llama: per layer the RMSNorm before attention (with the residual add
# in front of it, except layer 0's, which reads the embedding), rotary on q and rotary on k
# (x * cos + rotate_half(x) * sin, the cos/sin tables [B, 1, S, D] broadcast over the heads),
# the RMSNorm before the MLP with its residual add, and silu(gate) * up; then the final norm
# with the last residual add; once per step the rotary tables, cos(angles) and sin(angles)
# each times the attention scaling.
GROUPS = 5 * LAYERS + 1 + 2
ROW_GROUPS = 2 * LAYERS + 1        # the norms: a mean over the last dim
POINTWISE_GROUPS = 3 * LAYERS + 2  # rotary on q, rotary on k, silu * up; the cos and sin tables
ROTARY_OPS = [aten.mul.Tensor, ops.rotate_half.default, aten.mul.Tensor, aten.add.Tensor]
# fp32 RMSNorm: pow, mean, add eps, rsqrt, mul, mul weight (cleanup drops its no-op casts), 7
# with the residual add in front; rotary: 4; silu * up: 2; each table: 2
NODES_FUSED = 6 + 7 * 2 * LAYERS + len(ROTARY_OPS) * 2 * LAYERS + 2 * LAYERS + 2 * 2
# ops that only occur in those groups (the norms' pow/mean/rsqrt, rotary's rotate_half, the
# MLP's silu, the tables' cos and sin)
GROUPED_OPS = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default, ops.rotate_half.default,
               aten.silu.default, aten.cos.default, aten.sin.default}
FUSED_PROJ = "fusegen_fused_proj_"


def _is_fused_projection(node) -> bool:
    return (node.op == "call_function" and node.target is aten.linear.default
            and node.args[1].op == "get_attr" and node.args[1].target.startswith(FUSED_PROJ))


def _kernel_pass(node) -> str | None:
    """Which of fuse_projections / fuse_pointwise made ``node``, judged by what their rewrites
    look like: fused weight -> linear -> split_with_sizes -> getitems; call_module -> getitems."""
    if node.op == "call_module":
        return "fuse_pointwise"
    if node.op == "get_attr" and node.target.startswith(FUSED_PROJ):
        return "fuse_projections"
    if _is_fused_projection(node):
        return "fuse_projections"
    if node.op == "call_function" and node.target is aten.split_with_sizes.default \
            and _is_fused_projection(node.args[0]):
        return "fuse_projections"
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        if source.op == "call_module":
            return "fuse_pointwise"
        if source.target is aten.split_with_sizes.default and _is_fused_projection(source.args[0]):
            return "fuse_projections"
    return None


def _check_provenance(gm, made_by: str, made: set) -> None:
    """Nodes whose target is in ``made`` come from ``made_by``, what the kernel passes rewrote
    from them, everything else from capture. Nodes fuse_pointwise moved into a FusedGroup are
    gone from the graph and keep their capture stamp inside the group's reference graph."""
    for node in gm.graph.nodes:
        assert PROVENANCE in node.meta, node.name
        if node.op == "output":
            continue
        want = made_by if (node.target in made) else (_kernel_pass(node) or "capture")
        assert node.meta[PROVENANCE] == want, (node.name, node.target)
    assert not call_nodes(gm, *GROUPED_OPS)
    groups = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in groups] == [f"fused_{i}" for i in range(GROUPS)]
    moved = Counter()
    for group in groups:
        for node in gm.get_submodule(group.target).reference.graph.nodes:
            if node.op == "call_function":
                # normalize_graph rewrote rotate_half in place: it kept the cat's capture stamp
                assert node.meta[PROVENANCE] == "capture", (group.target, node.name)
                moved[node.target] += 1
    assert GROUPED_OPS <= set(moved)
    assert moved[ops.rotate_half.default] == 2 * LAYERS  # one for q, one for k, per layer
    assert len(call_nodes(gm, aten.split_with_sizes.default)) == 2 * LAYERS  # q/k/v and gate/up


def _rotary_groups(gm) -> list:
    """(call_module node, FusedGroup) of every group whose reference reads rotate_half."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if ops.rotate_half.default in _targets(module.reference):
                found.append((node, module))
    return found


def _check_rotary_groups(gm, q_reader: tuple, k_reader: tuple) -> None:
    """Per layer a rotary group on q, then one on k: mul, rotate_half, mul, add over the heads'
    frame [B, H, S] x HEAD_DIM, q/k read as full rows and the cos/sin tables [B, 1, S, D]
    broadcast; rotate_half reads the group's q (k) input itself, at permuted columns.
    ``q_reader`` / ``k_reader`` = (op, tensor arg, layer arg) of the op that reads the result."""
    groups = _rotary_groups(gm)
    assert len(groups) == 2 * LAYERS
    for i, (call, module) in enumerate(groups):
        layer, heads, (op, arg, layer_arg) = i // 2, (HEADS, KV_HEADS)[i % 2], (q_reader, k_reader)[i % 2]
        assert module.schedule == "pointwise", call.target
        nodes = [n for n in module.reference.graph.nodes if n.op == "call_function"]
        assert [n.target for n in nodes] == ROTARY_OPS, call.target
        lead, N = module.frame
        assert N == HEAD_DIM and len(lead) == 3 and lead[1] == str(heads), (call.target, module.frame)
        assert module.input_layouts == ["row", "broadcast", "broadcast"], call.target
        assert module.output_layouts == ["row"], call.target
        x, cos, sin = call.args
        assert val(x).shape[1] == heads and val(x).shape[-1] == HEAD_DIM
        for table in (cos, sin):
            assert val(table).dim() == 4 and val(table).shape[1] == 1 and val(table).shape[-1] == HEAD_DIM
        if i % 2:  # q and k of a layer rotate by the same tables
            assert call.args[1:] == groups[i - 1][0].args[1:]
        ph = [n for n in module.reference.graph.nodes if n.op == "placeholder"]
        cos_mul, rot, sin_mul, add = nodes
        assert cos_mul.args == (ph[0], ph[1]) and rot.args == (ph[0],)
        assert sin_mul.args == (rot, ph[2]) and add.args == (cos_mul, sin_mul)
        # the one output reaches the attention (q) or the cache write (k) of its layer
        (item,) = call.users
        readers = [u for u in item.users if u.op == "call_function" and u.target is op]
        assert len(readers) == 1 and readers[0].args[arg] is item and readers[0].args[layer_arg] == layer
        assert module.kernel is not None
        assert module.source.count("((cols + N // 2) % N)") == 1  # rotate_half: a permuted load


def test_insert_kv_cache_graph(dense):
    gm = dense.graph_module
    assert dense.kind == "dense"
    assert _placeholders(gm) == ["input_ids", "attention_mask", "position_ids", "kv_cache"]
    assert _stats(dense, "insert_kv_cache") == {"layers_cached": LAYERS, "kv_writes": LAYERS}
    writes = call_nodes(gm, ops.dense_kv_write.default)
    reads = call_nodes(gm, ops.dense_kv_attention.default)
    assert len(writes) == len(reads) == LAYERS
    assert not call_nodes(gm, ops.attention.default)
    _layers_once(writes, 1)
    _layers_once(reads, 2)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for w, r in zip(writes, reads):
        assert w.args[1] == r.args[2] and order[w] < order[r]
    cache = next(n for n in gm.graph.nodes if n.target == "kv_cache")
    shape = val(cache).shape
    assert (shape[0], shape[1], shape[3], shape[5]) == (LAYERS, 2, KV_HEADS, HEAD_DIM)
    assert dense.facts["kv"] == KVGeometry(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                           dtype=torch.float32, query_heads=HEADS)
    _check_provenance(gm, "insert_kv_cache",
                      {ops.dense_kv_write.default, ops.dense_kv_attention.default, "kv_cache"})
    _check_rotary_groups(gm, q_reader=(ops.dense_kv_attention.default, 0, 2),
                         k_reader=(ops.dense_kv_write.default, 2, 1))


def test_insert_paged_blocks_graph(paged):
    gm = paged.graph_module
    assert paged.kind == "paged"
    assert _placeholders(gm) == ["input_ids", "position_ids", "kv_pool", "slot_mapping",
                                 "block_tables", "seq_lens", "query_start_loc", "logits_indices"]
    assert tuple(_placeholders(gm)) == PAGED_INPUTS   # the names the runtime feeds
    assert _stats(paged, "insert_paged_blocks") == {"paged_writes": LAYERS, "paged_attention": LAYERS}
    writes = call_nodes(gm, ops.paged_kv_write.default)
    reads = call_nodes(gm, ops.paged_attention.default)
    assert len(writes) == len(reads) == LAYERS
    for gone in (ops.attention.default, ops.dense_kv_write.default, ops.dense_kv_attention.default):
        assert not call_nodes(gm, gone)
    _layers_once(writes, 1)
    _layers_once(reads, 2)
    for node in reads:
        assert node.args[6] == pytest.approx(1 / math.sqrt(HEAD_DIM))
        assert node.args[7] is True and node.args[8] == 0
    pool = next(n for n in gm.graph.nodes if n.target == "kv_pool")
    shape = val(pool).shape
    assert (shape[0], shape[1], shape[3], shape[4], shape[5]) == (LAYERS, 2, 16, KV_HEADS, HEAD_DIM)
    assert paged.facts["kv"].block_size == 16
    # the LM head (the graph's output) reads index_select(hidden, 1, logits_indices): [1, R, V]
    (picked,) = call_nodes(gm, aten.index_select.default)
    indices = next(n for n in gm.graph.nodes if n.target == "logits_indices")
    assert picked.args[1:] == (1, indices)
    (head,) = next(n for n in gm.graph.nodes if n.op == "output").args
    assert head.target is aten.linear.default and head.args[0] is picked
    assert head.args[1].target == "m.lm_head.weight"
    assert val(indices).dtype == torch.int32 and val(indices).dim() == 1
    rows = str(val(indices).shape[0])
    assert [str(d) for d in val(picked).shape[1:]] == [rows, str(HEADS * HEAD_DIM)]
    assert [str(d) for d in val(head).shape[1:]] == [rows, str(VOCAB)]
    _check_provenance(gm, "insert_paged_blocks",
                      {ops.paged_kv_write.default, ops.paged_attention.default, "kv_pool",
                       "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
                       "logits_indices", aten.index_select.default})
    _check_rotary_groups(gm, q_reader=(ops.paged_attention.default, 0, 2),
                         k_reader=(ops.paged_kv_write.default, 2, 1))


def test_every_step_records_the_nodes_it_made(paged):
    made = {r.name: r.nodes_made for r in paged.report.records}
    # capture stamps everything; the paged pass adds 6 inputs, 2 ops per layer and the
    # index_select before the LM head
    assert made["capture"] == paged.report.records[0].total_nodes
    # cleanup only removes; normalize_graph rewrites nodes in place (rotate_half included)
    assert made["cleanup_graph"] == 0 and made["normalize_graph"] == 0
    assert made["insert_kv_cache"] == 1 + 2 * LAYERS
    assert made["insert_paged_blocks"] == 6 + 2 * LAYERS + 1
    assert made["fuse_attention"] == LAYERS
    # per layer: q/k/v and gate/up, each a fused weight, a linear, a split and one getitem
    # per projection (3 + 2)
    assert made["fuse_projections"] == 2 * 3 * LAYERS + 5 * LAYERS
    # a call_module and a getitem per group, a second getitem (the residual sum) for each
    # group with a residual add whose sum is read later: every norm but layer 0's first (no
    # residual add) and the final norm's; the rotary groups have one output each
    assert made["fuse_pointwise"] == 2 * GROUPS + 2 * LAYERS - 1
    # fuse_pointwise runs last: what it made is all still in the graph
    stamped = [n for n in paged.graph_module.graph.nodes if n.meta[PROVENANCE] == "fuse_pointwise"]
    assert len(stamped) == made["fuse_pointwise"]


def test_kernel_steps_counters(paged, dense):
    for compiled in (paged, dense):
        assert _stats(compiled, "fuse_projections") == {"groups_fused": 2 * LAYERS,
                                                        "linears_fused": 5 * LAYERS}
        assert _stats(compiled, "fuse_pointwise") == {
            "groups": GROUPS, "row_groups": ROW_GROUPS, "pointwise_groups": POINTWISE_GROUPS,
            "nodes_fused": NODES_FUSED}
        assert _stats(compiled, "normalize_graph") == {"rotate_half": 2 * LAYERS}
        kernels = compiled.facts["kernels"]
        assert sorted(k["group"] for k in kernels) == sorted(f"fused_{i}" for i in range(GROUPS))
        for record in kernels:
            assert compiled.graph_module.get_submodule(record["group"]).kernel is not None


@pytest.fixture(scope="module")
def normalized(llama):
    """The Llama after cleanup_graph and normalize_graph only."""
    return fusegen.compile(llama, "capture_only")


def _between(src: torch.fx.Node, dst: torch.fx.Node) -> set:
    """Every node on some path from ``src`` to ``dst`` (both included)."""
    ancestors, stack = set(), [dst]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    on_path, stack = set(), [src]
    while stack:
        node = stack.pop()
        if node in ancestors and node not in on_path:
            on_path.add(node)
            stack.extend(node.users)
    return on_path


def test_normalize_graph_puts_one_rotate_half_on_each_q_and_k_path(normalized):
    gm = normalized.graph_module
    (record,) = [r for r in normalized.report.records if r.name == "normalize_graph"]
    assert record.stats == {"rotate_half": 2 * LAYERS} and record.changed
    assert record.nodes_made == 0
    rotations = call_nodes(gm, ops.rotate_half.default)
    assert len(rotations) == 2 * LAYERS
    for rot in rotations:
        assert rot.meta[PROVENANCE] == "capture"  # the cat it was, rewritten in place
        assert val(rot).shape[-1] == HEAD_DIM and val(rot).dim() == 4
    # the one cat left builds the cos/sin tables (cat(freqs, freqs)), on no q/k path
    (table,) = call_nodes(gm, aten.cat.default)
    linears = {n.args[1].target: n for n in call_nodes(gm, aten.linear.default)}
    sites = call_nodes(gm, aten.scaled_dot_product_attention.default)
    assert len(sites) == LAYERS
    seen = []
    for layer, site in enumerate(sites):
        for proj, arg, heads in (("q_proj", 0, HEADS), ("k_proj", 1, KV_HEADS)):
            path = _between(linears[f"m.model.layers.{layer}.self_attn.{proj}.weight"], site.args[arg])
            assert site.args[arg] in path, (layer, proj)
            targets = [n.target for n in path if n.op == "call_function"]
            for gone in (aten.cat.default, aten.neg.default, aten.slice.Tensor):
                assert gone not in targets, (layer, proj, gone)
            (rot,) = [n for n in path if n.target is ops.rotate_half.default]
            assert table not in path
            # rotate_half reads [B, H, S, D] heads the cos product reads too
            (source,) = rot.args
            assert source in path and val(source).shape[1] == heads
            assert any(u.target is aten.mul.Tensor and u.args[0] is source for u in source.users)
            seen.append(rot)
    assert sorted(n.name for n in seen) == sorted(n.name for n in rotations)


def test_dense_graph_matches_the_model_with_left_padding(llama, dense):
    ids, mask = _padded_batch()
    real = mask.bool()
    assert_close_report(dense(ids, mask)[real], _logits(llama, ids, mask)[real], atol=1e-4, rtol=1e-4)


def _repeat_kv_as_older_torch_exports_it(hidden, n_rep):
    """HF's repeat_kv with the whole-dim slices torch 2.11's export records for
    ``hidden[:, :, None, :, :]``: slice(dim 0) -> unsqueeze(2) -> slice(dim 3) -> expand."""
    b, heads, s, d = hidden.shape
    x = torch.ops.aten.slice.Tensor(hidden, 0, 0, 2**63 - 1).unsqueeze(2)
    x = torch.ops.aten.slice.Tensor(x, 3, 0, 2**63 - 1)
    return x.expand(b, heads, n_rep, s, d).reshape(b, heads * n_rep, s, d)


def test_whole_dim_slices_are_removed_so_repeat_kv_is_undone(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    from families import mini_model

    monkeypatch.setattr(sdpa, "repeat_kv", _repeat_kv_as_older_torch_exports_it)
    model = mini_model("llama")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert model.config.num_attention_heads > heads     # GQA
    compiled = fusegen.compile(model)
    counters = compiled.report.counters
    assert counters["cleanup_graph.full_slice_removed"] >= 4 * layers   # two per repeat_kv, k and v
    assert counters["fuse_attention.gqa"] == layers
    assert compiled.facts["kv"].kv_heads == heads      # the cache holds the model's own K/V heads
    assert not [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.expand.default
                and len(val(n).shape) == 5]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                    # left padding
    real = mask.bool()                                 # padding positions get zero logits
    assert_close_report(compiled(ids, mask)[real], _logits(model, ids, mask)[real], atol=1e-4, rtol=0)


def test_slices_that_keep_part_of_a_dim_stay():
    class Parts(nn.Module):
        def forward(self, x):
            a = torch.ops.aten.slice.Tensor(x, 1, 0, 5)        # the whole dim (size 5): removed
            b = torch.ops.aten.slice.Tensor(x, 1, 1, 2**63 - 1)  # starts at 1: stays
            c = torch.ops.aten.slice.Tensor(x, 1, 0, 4)        # ends early: stays
            d = torch.ops.aten.slice.Tensor(x, 1, 0, 2**63 - 1, 2)  # every other: stays
            return a.sum() + b.sum() + c.sum() + d.sum()

    x = torch.randn(3, 5)
    gm = torch.export.export(Parts(), (x,), strict=False).module()
    result = cleanup_graph(gm, PassContext())
    result.gm.recompile()
    assert result.stats.get("full_slice_removed") == 1
    assert node_counts(result.gm)["aten.slice"] == 3
    assert torch.equal(result.gm(x), Parts()(x))
