"""The CPU step graph (runtime/cpu_graph.py): its rewrite counts, bitwise the same logits as
the step graph it was made from on prefill, mixed and decode steps, and the engine running
it on the CPU (and not when $FUSEGEN_KERNELS=1 asks for kernels)."""

import operator

import pytest
import torch

import fusegen
from fusegen.fused_group import KERNELS_ENV, FusedGroup
from fusegen.runtime.cpu_graph import cpu_step_graph
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs

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
    # paged_kv_write per layer and rotate_half (q and k) per layer, called directly
    assert stats["direct_ops"] == LAYERS * 3
    calls = [n for n in flat.graph.nodes if n.op in ("call_function", "call_module")]
    assert not [n for n in calls if n.op == "call_module"]
    assert not [n for n in calls if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fusegen"]
    assert not [n for n in calls if n.target is operator.getitem and n.args[0].op == "call_module"]
    assert any(isinstance(m, FusedGroup) for m in gm.children())   # the caller's graph is untouched


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_same_logits_as_the_step_graph_bitwise(paged):
    geometry = paged.facts["kv"]
    kv = KVCacheManager(8, geometry.block_size, enable_prefix_caching=False)
    runner = PagedRunner(paged.graph_module, geometry, 8, device="cpu")
    flat, _ = cpu_step_graph(paged.graph_module)
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
        assert torch.equal(got, want), counts

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

    from fusegen.runtime.cpu_graph import LINEAR, column_major_weights

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
