"""The CPU step graph (runtime/cpu_graph.py): its rewrite counts, the same logits as the step
graph it was made from on prefill, mixed and decode steps (bitwise but for oneDNN's linears),
the engine running it on the CPU (and not when $FUSEGEN_KERNELS=1 asks for kernels); its ops
(runtime/cpu_ops.py) against the references and each rewrite (runtime/cpu_rewrites.py) on a
small graph of odd shapes."""

import operator

import pytest
import torch
from torch import fx

import fusegen
from fusegen.fused_group import KERNELS_ENV, FusedGroup
from fusegen.runtime.cpu_graph import cpu_step_graph
from fusegen.runtime.cpu_rewrites import BINDINGS
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
from helpers import assert_close_report

LAYERS, VOCAB = 2, 256


@pytest.fixture(scope="module")
def paged():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB,           # 49152 (SmolLM2)
                         hidden_size=96,             # 576
                         intermediate_size=128,      # 1536
                         num_hidden_layers=LAYERS,   # 30
                         num_attention_heads=6,      # 9
                         num_key_value_heads=2,      # 3
                         max_position_embeddings=128)
    torch.manual_seed(0)
    return fusegen.compile(LlamaForCausalLM(config).eval())


def test_rewrite_counts_and_nothing_left_to_dispatch(paged):
    gm = paged.graph_module
    groups = sum(isinstance(m, FusedGroup) for m in gm.children())
    flat, stats = cpu_step_graph(gm)
    assert groups > 0
    assert stats["groups_inlined"] == groups and stats["groups_called"] == 0
    assert stats["attention_planned"] == LAYERS and stats["plans"] == 1
    assert stats["kv_writes_planned"] == LAYERS and stats["kv_slots"] == 1
    assert stats["rms_norm"] == 2 * LAYERS + 1              # two per layer and the final norm
    assert stats["rotary"] == 2 * LAYERS                    # q and k
    assert stats["rotary_heads"] == LAYERS                  # ... in one call
    assert stats["attention_tokens"] == LAYERS
    assert stats["common_subexpressions"] == 2 * (LAYERS - 1)   # each layer's unsqueeze of cos, sin
    assert stats["onednn_linear"] == 4 * LAYERS + 1         # qkv, o, gate/up, down per layer, the LM head
    assert stats["direct_ops"] == 0                         # the rewrites above took every fusegen op
    calls = [n for n in flat.graph.nodes if n.op in ("call_function", "call_module")]
    assert not [n for n in calls if n.op == "call_module"]
    assert not [n for n in calls if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fusegen"]
    assert not [n for n in calls if n.target in BINDINGS]   # every aten call through torch's bindings
    assert stats["python_bindings"] > 0
    tensors = {id(t) for t in gm.state_dict(keep_vars=True).values()}
    assert stats["attributes_flat"] == len([n for n in flat.graph.nodes if n.op == "get_attr"]) <= len(tensors)
    assert "getattr(" not in flat.code                      # every weight one attribute lookup away
    assert not [n for n in calls if n.target is operator.getitem and n.args[0].op == "call_module"]
    assert any(isinstance(m, FusedGroup) for m in gm.children())   # the caller's graph is untouched


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("linears", ["aten", "onednn"])
def test_same_logits_as_the_step_graph(paged, linears):
    """Bitwise, but for the linears: oneDNN's inner product sums in another order than the
    BLAS behind aten.linear (within float rounding); without that rewrite, every value is
    the step graph's bit for bit."""
    geometry = paged.facts["kv"]
    kv = KVCacheManager(8, geometry.block_size, enable_prefix_caching=False)
    runner = PagedRunner(paged.graph_module, geometry, 8, device="cpu")
    flat, stats = cpu_step_graph(paged.graph_module, leave_out=["onednn_linear"] if linears == "aten" else [])
    assert stats["onednn_linear"] == (0 if linears == "aten" else 4 * LAYERS + 1)
    seqs = {0: _prompt(14, 1), 1: _prompt(19, 2), 2: _prompt(5, 3)}
    cached = {}

    def step(counts: dict[int, int]):
        chunks = []
        for rid, n in counts.items():
            start = cached.get(rid, 0)
            seqs[rid] += _prompt(max(0, start + n - len(seqs[rid])), rid + start)   # decoded tokens
            if not kv.holds(rid):
                kv.admit(rid, seqs[rid], n)
            assert kv.grow(rid, start + n) is not None
            chunks.append(Chunk(seqs[rid][start:start + n], list(range(start, start + n)), start, kv.blocks(rid)))
            cached[rid] = start + n
        inputs = packed_inputs(runner, chunks)
        with torch.no_grad():
            want = paged.graph_module(**inputs)
            got = flat(**inputs)
        assert got.shape == (1, sum(counts.values()), VOCAB)
        if linears == "aten":
            assert torch.equal(got, want), counts
        else:
            assert_close_report(got, want, atol=1e-5, rtol=1e-5, msg=f"step {counts}")

    step({0: 14, 1: 10})                   # packed prefill, one of them chunked
    step({1: 9, 0: 1, 2: 5})               # the rest of the chunk, a decode and a new prompt
    for _ in range(3):                     # decodes; sequence 0 crosses a block at 16
        step({0: 1, 1: 1, 2: 1})


def test_engine_runs_the_cpu_graph_unless_kernels_are_asked_for(paged, monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    engine = paged.engine(num_blocks=8, max_num_seqs=2, max_num_batched_tokens=64)
    flat = engine.runner.step_graph()
    assert flat is not paged.graph_module and engine.runner.cpu_graph_stats["plans"] == 1
    prompt = _prompt(9, 4)
    greedy = engine.generate_batch([prompt], 6, eos_token_ids=[])[0]
    monkeypatch.setenv(KERNELS_ENV, "1")
    assert engine.runner.step_graph() is paged.graph_module
    monkeypatch.setenv(KERNELS_ENV, "0")
    want = paged.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=[])[0, 9:].tolist()
    assert greedy == want


def test_column_major_weights_keep_values_and_leave_the_source_model_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusegen.runtime.cpu_graph import LINEAR, column_major_weights, row_major_weights

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    compiled = fusegen.compile(model)     # on the CPU the compiled graph's weights are re-laid once
    gm = compiled.graph_module
    attr = lambda t: operator.attrgetter(t)(gm)   # noqa: E731
    weights = {n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR}
    # qkv and gate/up fused per layer, o and down per layer, the LM head
    assert len(weights) == 4 * LAYERS + 1
    for t in weights:
        w = attr(t)
        assert w.stride() == (1, w.shape[0])
    params = dict(model.named_parameters())
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert params[name].is_contiguous()                    # the model's own tensor: untouched
        assert torch.equal(attr("m." + name), params[name])    # the graph's copy: same values
    assert column_major_weights(gm) == 0                       # once only

    row_major = {t: attr(t).contiguous() for t in weights}     # undo, then redo: the count
    for t, w in row_major.items():
        owner, _, name = t.rpartition(".")
        setattr(gm.get_submodule(owner), name, torch.nn.Parameter(w, requires_grad=False))
    ids = torch.tensor([_prompt(11, 4)])
    before = compiled(ids).clone()
    assert column_major_weights(gm) == len(weights)
    assert all(torch.equal(attr(t), w) for t, w in row_major.items())
    torch.testing.assert_close(compiled(ids), before, atol=1e-5, rtol=1e-5)
    assert row_major_weights(gm) == len(weights) and row_major_weights(gm) == 0     # and back, once
    assert all(attr(t).is_contiguous() and torch.equal(attr(t), w) for t, w in row_major.items())


# --- cpu_ops: the planned KV write and attention against the references ----------------------

def _pool_and_tables(lens, block_size, Hkv, D, gen, stale=float("nan"), in_order=False):
    """A pool holding random K/V for sequences of ``lens`` in shuffled blocks (``in_order``:
    blocks 1, 2, ...); the slots past each sequence's length and the spare blocks hold ``stale``."""
    needed = [-(-L // block_size) for L in lens]
    num_blocks = sum(needed) + 2
    ids = list(range(1, num_blocks)) if in_order else torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32)
    pool = torch.full((2, 2, num_blocks, block_size, Hkv, D), stale)
    for n, (L, count) in enumerate(zip(lens, needed)):
        tables[n, :count] = torch.tensor(ids[:count], dtype=torch.int32)
        ids = ids[count:]
        for p in range(L):
            pool[:, :, int(tables[n, p // block_size]), p % block_size] = torch.randn(2, 2, Hkv, D, generator=gen)
    return pool, tables


@pytest.mark.parametrize("lens, q_lens, in_order", [
    ([37], [1], False),                # one decode
    ([37], [1], True),                 # ... whose blocks follow each other: read in place
    ([5, 17, 9], [1, 1, 1], True),     # batched decode, padded to 17, NaN past each length
    ([12, 3, 7, 6], [1, 3, 0, 6], False),   # mixed: a decode, a chunk, no queries, a prefill
])
@pytest.mark.parametrize("causal, window", [(True, 0), (True, 4), (False, 0)])
@pytest.mark.parametrize("block_size, Hq, Hkv, D", [(4, 6, 2, 24), (3, 5, 5, 7)])
def test_planned_attention_is_the_reference_bitwise(lens, q_lens, in_order, causal, window, block_size, Hq, Hkv, D):
    """Either layout of the output; the padding rows and what the first call planned
    (masks, where K and V are read) reused by a second layer's call."""
    from fusegen import ops
    from fusegen.runtime import cpu_ops

    gen = torch.Generator().manual_seed(sum(lens) + block_size)
    pool, tables = _pool_and_tables(lens, block_size, Hkv, D, gen, in_order=in_order)
    T = sum(q_lens) + 2                                             # two padding rows at the end
    q = torch.randn(1, Hq, T, D, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    plan = cpu_ops.step_plan(pool, tables, seq_lens, starts)
    for layer in (1, 0):
        want = ops.paged_attention(q, pool, layer, tables, seq_lens, starts, 0.3, causal, window, 0.0)
        got = cpu_ops.paged_attention(q, pool, layer, plan, 0.3, causal, window, 0.0)
        assert not got.isnan().any() and torch.equal(got, want)
        tokens = cpu_ops.paged_attention_tokens(q, pool, layer, plan, 0.3, causal, window, 0.0)
        assert torch.equal(tokens, want.transpose(1, 2).reshape(1, T, Hq * D))
    decode = [g for g in plan.paged.groups if g.queries == 1]
    assert (plan.decode_kv(decode[0]).buffer is None) == (len(lens) == 1 and in_order)


def test_planned_kv_write_is_the_reference_bitwise():
    """-1 slots skipped, values cast to the pool's dtype; a pool whose rows cannot be viewed
    flat (a slice of a bigger one) goes through the reference."""
    from fusegen import ops
    from fusegen.runtime import cpu_ops

    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 6, 5, generator=gen), torch.randn(1, 2, 6, 5, generator=gen)
    for slot_mapping in ([9, -1, 0, -1, 19, 6], [3, 4, 5, 20, 1, 2]):
        slots = torch.tensor(slot_mapping, dtype=torch.int32)
        for pool in (torch.zeros(3, 2, 7, 3, 2, 5, dtype=torch.float16), torch.zeros(3, 2, 7, 3, 4, 5)[..., :2, :]):
            want = pool.clone()
            ops.paged_kv_write(want, 1, k, v, slots)
            cpu_ops.paged_kv_write(pool, 1, k, v, cpu_ops.kv_slots(pool, slots))
            assert torch.equal(pool, want), slot_mapping
    with pytest.raises(ValueError, match=r"6 tokens but slot_mapping has 2 entries"):
        pool = torch.zeros(1, 2, 4, 4, 2, 5)
        cpu_ops.paged_kv_write(pool, 0, k, v, cpu_ops.kv_slots(pool, torch.tensor([0, 1])))


# --- the rewrites, each on a small graph of odd shapes -----------------------------------------

def _rewrite(fn, rewrite, *inputs):
    """(sites rewritten, the rewritten graph, fn's result, the rewritten graph's result)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(*inputs)
    want = gm(*[x.clone() for x in inputs])
    count = rewrite(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return count, gm, want, gm(*[x.clone() for x in inputs])


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_common_subexpressions_merge_repeats_but_nothing_a_mutation_touches():
    from fusegen.runtime.cpu_rewrites import common_subexpressions

    def f(x, cos, buf):
        a = cos.unsqueeze(1) * x
        b = cos.unsqueeze(1) * x           # the same two calls again: merged
        before = buf * 2.0
        buf.add_(1.0)
        after = buf * 2.0                  # buf was written in between: kept
        return a + b + before.sum() + after.sum() + x * 2                # x * 2 is not x * 2.0

    x, cos, buf = torch.randn(3, 5, 7), torch.randn(3, 7), torch.randn(11)
    count, gm, want, got = _rewrite(f, common_subexpressions, x, cos, buf)
    assert count == 2 and torch.equal(got, want)
    assert _targets(gm).count(torch.ops.aten.mul.Tensor) == 4      # cos*x, buf*2.0 twice, x*2


@pytest.mark.parametrize("weight_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_rewrite_bitwise(weight_first, dtype):
    from fusegen.runtime import cpu_ops
    from fusegen.runtime.cpu_rewrites import rms_norm

    def f(x, w):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * normed if weight_first else normed * w

    x, w = torch.randn(3, 5, 423, dtype=dtype), torch.randn(423, dtype=dtype)
    count, gm, want, got = _rewrite(f, rms_norm, x, w)
    assert count == 1 and torch.equal(got, want)
    assert _targets(gm) == [cpu_ops.rms_norm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_rms_norm_is_aten_rms_norm_bitwise(dtype):
    """On rows viewed from a transposed tensor too; the input is left as it was."""
    from fusegen.runtime import cpu_ops

    gen = torch.Generator().manual_seed(6)
    for x in (torch.randn(1, 1, 577, generator=gen, dtype=dtype) * 40,
              torch.randn(7, 3, 577, generator=gen, dtype=dtype).transpose(0, 1)):
        w, before = torch.randn(577, generator=gen, dtype=dtype), x.clone()
        got = cpu_ops.rms_norm(x, w, 1e-5)
        assert torch.equal(got, torch.rms_norm(x, [577], w, 1e-5)) and torch.equal(x, before)
        assert torch.equal(got, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)))


@pytest.mark.parametrize("case", ["bf16", "weight_3d", "cube", "other_tensor", "first_dim"])
def test_rms_norm_rewrite_leaves_other_norms(case):
    from fusegen.runtime.cpu_rewrites import rms_norm

    x, y = torch.rand(5, 7, 423) + 0.1, torch.rand(5, 7, 423) + 0.1     # positive: x ** 3 has a root
    w = torch.randn(1, 1, 423) if case == "weight_3d" else torch.randn(423)
    if case == "bf16":      # ATen's rms_norm computes half types in float32; the pattern does not
        x, w = x.bfloat16(), w.bfloat16()
    power = 3 if case == "cube" else 2
    source = y if case == "other_tensor" else x

    def f(x, w, source):
        if case == "first_dim":
            return w * (x * torch.rsqrt(source.pow(power).mean(0, keepdim=True) + 1e-6))
        return w * (x * torch.rsqrt(source.pow(power).mean(-1, keepdim=True) + 1e-6))

    count, _, want, got = _rewrite(f, rms_norm, x, w, source)
    assert count == 0 and torch.equal(got, want)


@pytest.mark.parametrize("swap", [False, True])
def test_rotary_rewrite_bitwise_and_sin_signed_once(swap):
    from fusegen.runtime import cpu_ops
    from fusegen.runtime.cpu_rewrites import rotary

    def rope(x, cos, sin):
        a, b = x * cos, torch.ops.fusegen.rotate_half(x) * sin
        return b + a if swap else a + b

    def f(q, k, cos, sin):
        return rope(q, cos, sin), rope(k, cos, sin)

    q = torch.randn(1, 5, 7, 24).transpose(1, 2)       # [1, H, T, D] viewed from token-major
    k = torch.randn(1, 3, 5, 24)
    cos, sin = torch.randn(1, 1, 5, 24), torch.randn(1, 1, 5, 24)
    count, gm, want, got = _rewrite(f, rotary, q, k, cos, sin)
    assert count == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _targets(gm).count(cpu_ops.signed_sin) == 1 and _targets(gm).count(cpu_ops.rotary) == 2


@pytest.mark.parametrize("sizes, pair", [([5 * 8, 3 * 8, 3 * 8], (0, 1)), ([3 * 8, 5 * 8, 2 * 8], (1, 2))])
def test_rotary_heads_rewrite_bitwise(sizes, pair):
    """Two neighbouring pieces of a split, rotated alike: one call over both; a third piece
    (v) left as it was."""
    from fusegen.runtime import cpu_ops
    from fusegen.runtime.cpu_rewrites import rotary, rotary_heads

    def rope(x, cos, sin):
        return x * cos + torch.ops.fusegen.rotate_half(x) * sin

    def f(x, cos, sin):
        heads = [p.view(1, 7, -1, 8).transpose(1, 2) for p in torch.split(x, sizes, -1)]
        return tuple(rope(h, cos, sin) if i in pair else h for i, h in enumerate(heads))

    x = torch.randn(7, sum(sizes) + 3)[:, :sum(sizes)][None]    # [1, T, C] rows of a wider tensor
    cos, sin = torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 8)
    count, gm, want, got = _rewrite(f, lambda g: (rotary(g), rotary_heads(g))[1], x, cos, sin)
    assert count == 1 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _targets(gm).count(cpu_ops.rotary_heads) == 1 and cpu_ops.rotary not in _targets(gm)
    assert _targets(gm).count(torch.ops.aten.transpose.int) == 1                 # the third piece's


def test_rotary_heads_rewrite_leaves_other_pairs():
    """Pieces that are not neighbours, or rotated with another sin, stay two calls."""
    from fusegen.runtime import cpu_ops
    from fusegen.runtime.cpu_rewrites import rotary, rotary_heads

    def rope(x, cos, sin):
        return x * cos + torch.ops.fusegen.rotate_half(x) * sin

    def f(x, cos, sin, other):
        q, v, k = (p.view(1, 5, -1, 8).transpose(1, 2) for p in torch.split(x, [16, 8, 16], -1))
        a, b = torch.split(x, [24, 16], -1)
        a, b = (p.view(1, 5, -1, 8).transpose(1, 2) for p in (a, b))
        return rope(q, cos, sin), rope(k, cos, sin), rope(a, cos, sin), rope(b, cos, other)

    x, cos, sin, other = torch.randn(1, 5, 40), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    count, gm, want, got = _rewrite(f, lambda g: (rotary(g), rotary_heads(g))[1], x, cos, sin, other)
    assert count == 0 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _targets(gm).count(cpu_ops.rotary) == 4


def _attention_chain(q: torch.Tensor, dims=(1, 2), last=None) -> fx.Graph:
    """paged_attention(q, ..) -> reshape to q's shape -> transpose(*dims) -> reshape to
    ``last`` (default [B, T, H * D]), each node's value recorded as the tracer records it."""
    from fusegen.runtime import cpu_ops

    aten, graph = torch.ops.aten, fx.Graph()
    x = graph.placeholder("q")
    x.meta["val"] = q
    attended = graph.call_function(cpu_ops.paged_attention, (x, None, 0, None, 0.5, True, 0, 0.0))
    same = graph.call_function(aten.reshape.default, (attended, list(q.shape)))
    same.meta["val"] = q
    turned = graph.call_function(aten.transpose.int, (same, *dims))
    turned.meta["val"] = q.transpose(*dims)
    B, H, T, D = q.shape
    last = last or [B, T, H * D]
    out = graph.call_function(aten.reshape.default, (turned, last))
    out.meta["val"] = q.transpose(*dims).reshape(last)
    graph.output(out)
    return graph


@pytest.mark.parametrize("dims, last, sites", [((1, 2), None, 1), ((1, 3), [1, 35, 3], 0), ((1, 2), [1, 5, 3, 7], 0)])
def test_attention_tokens_rewrite_takes_the_token_layout_chain_only(dims, last, sites):
    from fusegen.runtime import cpu_ops
    from fusegen.runtime.cpu_rewrites import attention_tokens

    graph = _attention_chain(torch.randn(1, 3, 5, 7), dims, last)
    assert attention_tokens(graph) == sites
    graph.lint()
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    if sites:
        assert targets == [cpu_ops.paged_attention_tokens]
    else:
        assert targets[0] is cpu_ops.paged_attention and len(targets) == 4


def test_rotary_rewrite_needs_sin_over_the_head_dim():
    from fusegen.runtime.cpu_rewrites import rotary

    def f(x, cos, sin):
        return x * cos + torch.ops.fusegen.rotate_half(x) * sin

    x, cos, sin = torch.randn(1, 3, 5, 24), torch.randn(1, 1, 5, 24), torch.randn(1, 1, 5, 1)
    count, _, want, got = _rewrite(f, rotary, x, cos, sin)
    assert count == 0 and torch.equal(got, want)


def _binding_samples():
    """One call per entry of BINDINGS: (args, kwargs), odd shapes."""
    aten, gen = torch.ops.aten, torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    w, ids = torch.randn(11, 7, generator=gen), torch.tensor([[1, 4, 10]])
    return {
        aten.add.Tensor: ((x, y), {"alpha": 2}), aten.sub.Tensor: ((x, 0.5), {}), aten.mul.Tensor: ((x, 3), {}),
        aten.div.Tensor: ((x, y), {}), aten.neg.default: ((x,), {}),
        aten.rsqrt.default: ((x.abs(),), {}), aten.pow.Tensor_Scalar: ((x, 2), {}),
        aten.mean.dim: ((x, [-1], True), {}), aten.exp.default: ((x,), {}), aten.cos.default: ((x,), {}),
        aten.sin.default: ((x,), {}), aten.tanh.default: ((x,), {}), aten.sigmoid.default: ((x,), {}),
        aten.silu.default: ((x,), {}), aten.gelu.default: ((x,), {"approximate": "tanh"}),
        aten.linear.default: ((x, w, torch.randn(11, generator=gen)), {}),
        aten.embedding.default: ((w, ids, 2), {}), aten.index_select.default: ((x, 1, torch.tensor([4, 0])), {}),
        aten.cat.default: (([x, y], -1), {}), aten.split_with_sizes.default: ((x, [2, 5], -1), {}),
        aten.rms_norm.default: ((x, [7], torch.randn(7, generator=gen), 1e-6), {}),
        aten.layer_norm.default: ((x, [7], torch.randn(7, generator=gen), None, 1e-5), {}),
        aten.softmax.int: ((x, -1), {}), aten.transpose.int: ((x, 0, 2), {}), aten.unsqueeze.default: ((x, 1), {}),
        aten.reshape.default: ((x.transpose(0, 1), [5, -1]), {}), aten.permute.default: ((x, [2, 0, 1]), {}),
        aten.view.default: ((x, [15, 7]), {}), aten.expand.default: ((x[:, :1], [3, 4, 7]), {}),
        aten.to.dtype: ((x, torch.float64), {}), aten.sym_size.int: ((x, 1), {}),
    }


def test_every_binding_computes_what_its_overload_does():
    samples = _binding_samples()
    assert set(samples) == set(BINDINGS)
    for overload, (args, kwargs) in samples.items():
        binding, _ = BINDINGS[overload]
        got = getattr(args[0], binding)(*args[1:], **kwargs) if isinstance(binding, str) else binding(*args, **kwargs)
        want = overload(*args, **kwargs)
        for g, w in zip(*(t if isinstance(t, (tuple, list)) else [t] for t in (got, want))):
            same = torch.equal(g, w) and g.stride() == w.stride() if isinstance(w, torch.Tensor) else g == w
            assert same, overload


def test_python_bindings_rewrite_calls_and_leaves_calls_it_cannot_pass():
    from fusegen.runtime.cpu_rewrites import python_bindings

    aten, graph = torch.ops.aten, fx.Graph()
    x = graph.placeholder("x")
    doubled = graph.call_function(aten.mul.Tensor, (x, 2.0))
    viewed = graph.call_function(aten.view.default, (doubled, [35, 3]))
    full = graph.call_function(aten.to.dtype, (viewed, torch.float64, False, False, None))  # 5 positional
    graph.output(full)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.randn(3, 5, 7)
    want = gm(x)
    assert python_bindings(gm.graph) == 2
    gm.recompile()
    assert [(n.op, n.target) for n in gm.graph.nodes if n.op.startswith("call")] == [
        ("call_function", torch.mul), ("call_method", "view"), ("call_function", aten.to.dtype)]
    assert torch.equal(gm(x), want)


@pytest.mark.parametrize("pays", [True, False])
def test_engine_takes_onednn_linears_only_where_they_pay(paged, monkeypatch, pays):
    import fusegen.runtime.paged as paged_runtime

    from fusegen.runtime.cpu_graph import linear_weights

    seen = []
    monkeypatch.setattr(paged_runtime, "onednn_linear_pays", lambda weights: seen.append(weights) or pays)
    monkeypatch.setattr(paged_runtime, "_ONEDNN_LINEARS", __import__("weakref").WeakKeyDictionary())
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    engine = paged.engine(num_blocks=8, max_num_seqs=1, max_num_batched_tokens=64)
    engine.runner.step_graph()
    stats = engine.runner.cpu_graph_stats
    assert len(seen) == 1 and len(seen[0]) == 4 * LAYERS + 1   # every linear's weight (the LM head's too)
    assert all(w.dim() == 2 and w.stride()[0] == 1 for w in seen[0])      # measured column-major
    assert stats["onednn_linear"] == (4 * LAYERS + 1 if pays else 0)
    assert stats["onednn_linear_left_out"] == (0 if pays else 1)
    # oneDNN's linears read the weights row-major, aten.linear column-major
    assert stats["weights_row_major"] == (4 * LAYERS + 1 if pays else 0)
    assert all(w.is_contiguous() == pays for w in linear_weights(paged.graph_module))
    again = paged.engine(num_blocks=8, max_num_seqs=1, max_num_batched_tokens=64).runner
    again.step_graph()                                        # the same graph: decided once
    assert len(seen) == 1 and again.cpu_graph_stats["onednn_linear"] == stats["onednn_linear"]
    assert again.cpu_graph_stats["weights_row_major"] == 0 == again.cpu_graph_stats["weights_column_major"]
    if pays:   # as the next engine of another process finds them: column-major again
        from fusegen.runtime.cpu_graph import column_major_weights
        assert column_major_weights(paged.graph_module) == 4 * LAYERS + 1


def test_onednn_linear_pays_measures_once_per_shapes_and_threads(monkeypatch):
    from fusegen.runtime import cpu_rewrites

    calls = []
    monkeypatch.setattr(cpu_rewrites, "_PAYS", {})
    monkeypatch.setattr(cpu_rewrites, "_measure_onednn", lambda weights, rounds: calls.append(len(weights)) or True)
    weights = [torch.randn(7, 5), torch.randn(5, 7).t().contiguous().t()]
    assert cpu_rewrites.onednn_linear_pays(weights) is cpu_rewrites._onednn_works()
    assert cpu_rewrites.onednn_linear_pays([torch.randn(7, 5), torch.randn(5, 7).t().contiguous().t()]) \
        is cpu_rewrites._onednn_works()
    assert calls == ([2] if cpu_rewrites._onednn_works() else [])   # the same shapes and strides: once
    assert cpu_rewrites.onednn_linear_pays([torch.randn(7, 5, dtype=torch.float64)]) is False
    assert cpu_rewrites.onednn_linear_pays([]) is False
    assert calls == ([2] if cpu_rewrites._onednn_works() else [])


def test_onednn_linear_measurement_gives_a_bool():
    from fusegen.runtime.cpu_rewrites import _measure_onednn, _onednn_works

    if not _onednn_works():
        pytest.skip("this torch has no working oneDNN")
    assert _measure_onednn([torch.randn(64, 48), torch.randn(48, 64).t().contiguous().t()], rounds=1) in (True, False)


def test_onednn_linear_measurement_times_a_bounded_prefix(monkeypatch):
    """oneDNN's pass reads row-major copies of the weights it times: only the first
    MEASURE_BYTES of them (at least one), so a large model's memory is not doubled."""
    from fusegen.runtime import cpu_rewrites

    monkeypatch.setattr(cpu_rewrites, "MEASURE_BYTES", 3 * 100 * 4)   # three 10x10 float32 weights
    weights = [torch.randn(10, 10) for _ in range(5)]
    assert cpu_rewrites.measured_weights(weights) == weights[:3]
    big = torch.randn(20, 20)   # over the bound alone: still timed
    assert cpu_rewrites.measured_weights([big, *weights]) == [big]
    assert cpu_rewrites.measured_weights([]) == []


def _linear_graph(x, weight, bias):
    """A graph of one aten.linear, its nodes carrying FakeTensor values as the step graph's do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph, mode = fx.Graph(), FakeTensorMode()
    inputs = [graph.placeholder(name) for name in ("x", "weight", "bias")[:2 + (bias is not None)]]
    for node, value in zip(inputs, (x, weight, bias)):
        node.meta["val"] = mode.from_tensor(value)
    out = graph.call_function(torch.ops.aten.linear.default, tuple(inputs))
    out.meta["val"] = torch.ops.aten.linear.default(*(n.meta["val"] for n in inputs))
    graph.output(out)
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("x_shape, with_bias", [((1, 1, 423), False), ((1, 37, 423), True), ((5, 423), True)])
@pytest.mark.parametrize("layout", ["row_major", "column_major"])
def test_onednn_linear_rewrite_within_float_rounding(x_shape, with_bias, layout):
    from fusegen.runtime.cpu_rewrites import onednn_linear

    gen = torch.Generator().manual_seed(11)
    x, weight = torch.randn(x_shape, generator=gen), torch.randn(213, 423, generator=gen) / 423 ** 0.5
    weight = weight.t().contiguous().t() if layout == "column_major" else weight
    bias = torch.randn(213, generator=gen) if with_bias else None
    gm = _linear_graph(x, weight, bias)
    inputs = [t for t in (x, weight, bias) if t is not None]
    want = gm(*inputs)
    assert onednn_linear(gm.graph) == 1
    gm.recompile()
    assert _targets(gm) == [torch.ops.mkldnn._linear_pointwise.default]
    assert_close_report(gm(*inputs), want, atol=1e-5, rtol=1e-5)


def test_onednn_linear_rewrite_leaves_other_dtypes():
    from fusegen.runtime.cpu_rewrites import onednn_linear

    gm = _linear_graph(torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), None)
    assert onednn_linear(gm.graph) == 0 and _targets(gm) == [torch.ops.aten.linear.default]


def test_leaving_out_a_rewrite_that_does_not_exist_names_the_rewrites(paged):
    with pytest.raises(ValueError, match=r"no rewrite named \['fuse_everything'\].*'rms_norm'"):
        cpu_step_graph(paged.graph_module, leave_out=["fuse_everything"])
