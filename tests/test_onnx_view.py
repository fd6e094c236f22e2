"""to_onnx: compiled graphs as ONNX models for graph viewers.

- Mini models (paged llama and mistral, dense-cache llama, stateless gpt2): the checker with
  full shape inference accepts the file; every fx call node has its ONNX node(s), named after
  it; fusegen-domain nodes are exactly the fusegen ops and FusedGroups; attention attributes
  equal the fx args; cache writes feed the reads after them; weights round-trip through the
  external data file; ``weights=False`` writes none.
- Semantics: onnx's reference evaluator (numpy; fusegen ops supplied from their PyTorch
  references) runs the exported graph and must give the fx graph's logits, stateless and for
  one paged step; a module touching most of the standard-domain table must give eager's values.
- Ops without an exact standard spelling land in the "aten" domain with their arguments.

Every compile is module-scoped and shared: capturing is the slow part (a few seconds each).
"""

from __future__ import annotations

import functools
import operator
from collections import Counter

import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from torch import nn
from torch.export import Dim
from torch.nn import functional as F

import fusegen
from families import left_padded, mini_model
from fusegen.codegen.pointwise import source_key
from fusegen.fused_group import FusedGroup
from fusegen.onnx_view import to_onnx
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.infra import PassContext
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
from helpers import assert_close_report

ops = torch.ops.fusegen

MODELS = {
    "llama-paged": ("llama", None),
    "mistral-paged": ("mistral", None),     # sliding window 5
    "llama-dense": ("llama", "preset=dense_kv"),
    "llama-stateless": ("llama", "preset=stateless"),
    "gpt2-stateless": ("gpt2", "preset=stateless"),
}
CAMEL = {"attention": "Attention", "dense_kv_write": "DenseKVWrite",
         "dense_kv_attention": "DenseKVAttention", "paged_kv_write": "PagedKVWrite",
         "paged_attention": "PagedAttention", "rotate_half": "RotateHalf"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """key -> (CompiledModel, path of its model.onnx), compiled and exported on first use."""
    cache = {}

    def get(key):
        if key not in cache:
            family, config = MODELS[key]
            compiled = fusegen.compile(mini_model(family), config)
            path = tmp_path_factory.mktemp(key) / "model.onnx"
            to_onnx(compiled.graph_module, path, facts=compiled.facts)
            cache[key] = compiled, path
        return cache[key]
    return get


def _fx_calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]


def _fusegen_label(gm, n) -> str | None:
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FusedGroup):
        return "FusedKernel"
    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fusegen":
        return CAMEL[n.target._schema.name.split("::")[1]]
    return None


def _fetch(gm, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# --- structure ----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["llama-paged", "mistral-paged", "llama-dense", "gpt2-stateless"])
def test_checker_accepts_the_model(exported, key):
    _, path = exported(key)
    onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("key", ["llama-paged", "gpt2-stateless", "llama-dense"])
def test_every_call_node_has_an_onnx_node(exported, key):
    compiled, path = exported(key)
    model = onnx.load(str(path), load_external_data=False)
    by_owner = Counter(node.name.split("/")[0] for node in model.graph.node)
    producers = {node.name: list(node.output) for node in model.graph.node}
    calls = _fx_calls(compiled.graph_module)
    getitems = [n for n in calls if n.target is operator.getitem]
    missing = [n.name for n in calls if n not in getitems and by_owner[n.name] == 0]
    assert not missing, f"fx nodes without an ONNX node: {missing}"
    for n in getitems:  # no node of its own: an output of its producer's node, under its name
        producer, index = n.args
        assert producers[producer.name][index] == n.name
    assert len(getitems) > 0 and len(calls) - len(getitems) <= len(by_owner)
    fx_names = {n.name for n in compiled.graph_module.graph.nodes}
    strays = {o for o in by_owner if o not in fx_names and not o.startswith("const")}
    assert not strays, "every ONNX node belongs to an fx node or is a shared constant"


@pytest.mark.parametrize("key,per_layer", [
    ("llama-paged", ["PagedKVWrite", "PagedAttention"]),
    ("llama-dense", ["DenseKVWrite", "DenseKVAttention"]),
    ("gpt2-stateless", ["Attention"]),
])
def test_fusegen_nodes_are_the_fusegen_ops_and_groups(exported, key, per_layer):
    compiled, path = exported(key)
    gm = compiled.graph_module
    model = onnx.load(str(path), load_external_data=False)
    fx_count = Counter(label for n in gm.graph.nodes if (label := _fusegen_label(gm, n)))
    onnx_count = Counter(node.op_type for node in model.graph.node if node.domain == "fusegen")
    assert onnx_count == fx_count
    assert [onnx_count[op] for op in per_layer] == [2] * len(per_layer)  # 2 layers
    assert onnx_count["FusedKernel"] > 0


@pytest.mark.parametrize("key", ["llama-paged", "gpt2-stateless", "llama-dense"])
def test_these_models_need_no_aten_domain(exported, key):
    """Every aten op of the three mini models has a standard spelling in the table (a failure
    names an op a pass now leaves in the graph that the table does not cover)."""
    _, path = exported(key)
    model = onnx.load(str(path), load_external_data=False)
    assert [n.doc_string for n in model.graph.node if n.domain == "aten"] == []


@pytest.mark.parametrize("key", ["llama-paged", "mistral-paged", "llama-dense", "gpt2-stateless"])
def test_attention_attributes_are_the_fx_args(exported, key):
    compiled, path = exported(key)
    model = onnx.load(str(path), load_external_data=False)
    nodes = {node.name: node for node in model.graph.node}
    sites = [n for n in compiled.graph_module.graph.nodes if n.target in (
        ops.attention.default, ops.dense_kv_attention.default, ops.paged_attention.default)]
    assert len(sites) == 2
    for n in sites:
        args = dict(zip([a.name for a in n.target._schema.arguments], n.args))
        attrs = _attrs(nodes[n.name])
        assert attrs["scale"] == pytest.approx(args["scale"], rel=1e-7)
        assert attrs["causal"] == int(args["causal"])
        assert (attrs["window"], attrs["softcap"]) == (args["window"], args["softcap"])
        assert attrs.get("layer") == args.get("layer")
        assert [s.decode() for s in attrs["input_names"]] == [
            a.name for a in n.target._schema.arguments if "Tensor" in str(a.type)]
    if key == "mistral-paged":
        assert {_attrs(nodes[n.name])["window"] for n in sites} == {5}


def test_cache_writes_feed_the_reads_after_them(exported):
    _, path = exported("llama-paged")
    model = onnx.load(str(path), load_external_data=False)
    writes = [n for n in model.graph.node if n.op_type == "PagedKVWrite"]
    reads = [n for n in model.graph.node if n.op_type == "PagedAttention"]
    layer = lambda node: _attrs(node)["layer"]  # noqa: E731
    assert [layer(n) for n in writes] == [layer(n) for n in reads] == [0, 1]
    assert writes[0].input[0] == "kv_pool"
    assert _attrs(writes[0])["mutates"] == [b"kv_pool"]
    for w, r in zip(writes, reads):
        assert len(w.output) == 1 and r.input[1] == w.output[0]
    assert writes[1].input[0] == writes[0].output[0]


def test_fused_kernels_carry_their_group(exported):
    compiled, path = exported("llama-paged")
    gm = compiled.graph_module
    model = onnx.load(str(path), load_external_data=False)
    kernels = {n.name: n for n in model.graph.node if n.op_type == "FusedKernel"}
    groups = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert set(kernels) == set(groups)
    for name, group in groups.items():
        attrs = _attrs(kernels[name])
        fx_ops = [n for n in group.reference.graph.nodes if n.op == "call_function"]
        assert attrs["schedule"].decode() == group.schedule
        assert [s.decode() for s in attrs["ops"]] == [str(n.target).replace("aten.", "") for n in fx_ops]
        assert attrs["source_hash"].decode() == source_key(group.source)
        reference_outputs = group.reference.graph.output_node().args[0]
        assert attrs["num_outputs"] == len(kernels[name].output) == len(reference_outputs)
        body = attrs["body"]
        assert len(body.input) == len(kernels[name].input) and len(body.output) == attrs["num_outputs"]
        assert len(body.node) >= len(fx_ops)
    # the first group applying rotary (q's in layer 0; the rotary tables come before it)
    first = next(name for name, group in groups.items()
                 if any("rotate_half" in str(n.target) for n in group.reference.graph.nodes))
    rotary = _attrs(kernels[first])["body"]
    assert [n.op_type for n in rotary.node if n.domain == "fusegen"] == ["RotateHalf"]


def test_weights_round_trip_through_external_data(exported):
    compiled, path = exported("llama-paged")
    gm = compiled.graph_module
    tensors = {n.target: _fetch(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    data = path.with_name("model.onnx.data")
    assert data.stat().st_size >= sum(t.numel() * t.element_size() for t in tensors.values())
    assert path.stat().st_size < 64 * 1024, "the model file holds no weights"
    bare = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].shape == tuple(t.shape), name
        assert torch.equal(torch.from_numpy(loaded[name].copy()), t.detach()), name


def test_without_weights_the_tensors_are_inputs(exported, tmp_path):
    compiled, _ = exported("gpt2-stateless")
    gm = compiled.graph_module
    path = tmp_path / "model.onnx"
    path.with_name("model.onnx.data").write_bytes(b"stale")
    model = to_onnx(gm, path, weights=False)
    onnx.checker.check_model(str(path), full_check=True)
    assert len(model.graph.initializer) == 0 and not path.with_name("model.onnx.data").exists()
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            assert shapes[n.target] == list(_fetch(gm, n.target).shape)


def test_inputs_outputs_and_value_info(exported):
    compiled, path = exported("llama-paged")
    gm = compiled.graph_module
    model = onnx.load(str(path), load_external_data=False)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [i.name for i in model.graph.input] == [n.name for n in placeholders]
    for i, n in zip(model.graph.input, placeholders):
        v = n.meta["val"]
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert dims == [str(d) if isinstance(d, torch.SymInt) else d for d in v.shape], n.name
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["input_ids"] == onnx.TensorProto.INT64 and types["slot_mapping"] == onnx.TensorProto.INT32
    logits = gm.graph.output_node().args[0]
    assert [o.name for o in model.graph.output] == [logits.name]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [
        str(d) if isinstance(d, torch.SymInt) else d for d in logits.meta["val"].shape]
    described = {v.name for v in model.graph.value_info} | {o.name for o in model.graph.output}
    valued = [n.name for n in _fx_calls(gm) if isinstance(n.meta.get("val"), (torch.Tensor, torch.SymInt))]
    assert set(valued) <= described


def test_metadata_and_opsets(exported):
    compiled, path = exported("llama-paged")
    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] >= 18 and opsets["fusegen"] == 1 and opsets["aten"] == 1
    props = {p.key: p.value for p in model.metadata_props}
    assert props["producer"] == "fusegen" and props["producer_version"] == fusegen.__version__
    assert model.producer_name == "fusegen" and props["model_class"] == "LlamaForCausalLM"
    assert '"block_size": 16' in props["kv"]


# --- semantics: the reference evaluator against the fx graph --------------------------------

def _t(x):
    return torch.from_numpy(x.copy())


def _maybe(x):
    """An optional input: None where the node leaves it empty (kv_scales of a float pool)."""
    return None if x is None else _t(x)


class Attention(OpRun):
    op_domain = "fusegen"

    def _run(self, q, k, v, key_mask, scale=None, causal=None, window=None, softcap=None, **_):
        out = ops.attention(_t(q), _t(k), _t(v), _t(key_mask), scale, bool(causal), window, softcap)
        return (out.numpy(),)


class PagedKVWrite(OpRun):
    op_domain = "fusegen"

    def _run(self, kv_pool, k, v, slot_mapping, kv_scales=None, layer=None, **_):
        pool = _t(kv_pool)
        ops.paged_kv_write(pool, layer, _t(k), _t(v), _t(slot_mapping), _maybe(kv_scales))
        return (pool.numpy(),)


class PagedAttention(OpRun):
    op_domain = "fusegen"

    def _run(self, q, kv_pool, block_tables, seq_lens, query_start_loc, kv_scales=None, layer=None,
             scale=None, causal=None, window=None, softcap=None, **_):
        out = ops.paged_attention(_t(q), _t(kv_pool), layer, _t(block_tables), _t(seq_lens),
                                  _t(query_start_loc), scale, bool(causal), window, softcap, _maybe(kv_scales))
        return (out.numpy(),)


class RotateHalf(OpRun):
    op_domain = "fusegen"

    def _run(self, x, **_):
        return (ops.rotate_half(_t(x)).numpy(),)


class FusedKernel(OpRun):
    """Runs the node's ``body`` graph: checks the bodies as well as the outer graph."""
    op_domain = "fusegen"

    def _run(self, *inputs, **_):
        return tuple(self.body.run(None, dict(zip(self.body.input_names, inputs))))


FUSEGEN_OPS = [Attention, PagedKVWrite, PagedAttention, RotateHalf, FusedKernel]


@pytest.mark.parametrize("key", ["gpt2-stateless", "llama-stateless"])
def test_stateless_model_runs_like_the_fx_graph(exported, key):
    compiled, path = exported(key)
    ids, mask = left_padded([5, 3], 6)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = compiled.graph_module(ids, mask, pos)
    session = ReferenceEvaluator(onnx.load(str(path)), new_ops=FUSEGEN_OPS)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    got, = session.run(None, feeds)
    assert_close_report(_t(got), want, atol=1e-5, rtol=1e-5)


def test_paged_step_runs_like_the_fx_graph(exported):
    """One packed prefill of two sequences: attention sees K/V only if it reads the written pool."""
    compiled, path = exported("llama-paged")
    runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], num_blocks=4, device="cpu")
    chunks = [Chunk([5, 9, 17, 3, 8], [0, 1, 2, 3, 4], 0, [2]), Chunk([7, 2, 11], [0, 1, 2], 0, [0])]
    inputs = packed_inputs(runner, chunks)
    feeds = {k: v.clone().numpy() for k, v in inputs.items()}
    with torch.no_grad():
        want = compiled.graph_module(**inputs)
    session = ReferenceEvaluator(onnx.load(str(path)), new_ops=FUSEGEN_OPS)
    got, = session.run(None, feeds)
    assert_close_report(_t(got), want, atol=1e-5, rtol=1e-5)


class StandardOps(nn.Module):
    """Most of the standard-domain table in one forward; every op here has an exact ONNX form."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 6)
        self.conv_w = nn.Parameter(torch.randn(8, 6))   # GPT-2's Conv1D: addmm(b, x, w)
        self.conv_b = nn.Parameter(torch.randn(6))

    def forward(self, ids, x, keep):  # ids [B, S] int64, x [B, S, 8], keep [B, S] int64 (0/1)
        h = self.norm(x + self.emb(ids))
        conv = torch.addmm(self.conv_b, h.view(-1, 8), self.conv_w).view(h.shape[0], h.shape[1], 6)
        p = self.proj(h)
        first = self.proj(h[:, 0])
        gated = F.silu(p) * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-6)
        masked = p.masked_fill(keep[..., None] == 0, -1.0)
        chosen = torch.where(p > 0, p, F.gelu(p, approximate="tanh")) + F.gelu(p).erf()
        a, b = p.split([2, 4], dim=-1)
        c, _ = conv.chunk(2, dim=-1)
        joined = torch.cat([a, ids[..., None] / 3, c], dim=-1)
        moved = p.transpose(1, 2).permute(0, 2, 1).unsqueeze(1).squeeze(1)
        spread = first.unsqueeze(1).expand(-1, x.shape[1], -1)
        gram = torch.bmm(p, p.transpose(1, 2)) + torch.mm(first, first.t()).sum()
        pooled = (p.exp() - p.abs()).sum(-1) + p.amax(-1) - p.amin(-1)
        pooled = pooled + p.tanh().sigmoid().neg().relu().sum(-1)
        rounded = p.floor() + p.ceil() + p.abs().sqrt() + (p.abs() + 1).log() + (p.abs() + 1).reciprocal()
        probs = torch.softmax(p, dim=-1) + torch.log_softmax(p, dim=-1) + torch.maximum(p, conv)
        positions = torch.arange(x.shape[1]) + torch.arange(1, 7, 2).sum()
        flags = ((ids > 2) & (keep == 1)) | ~(ids > 5)
        return (conv, gated, masked, chosen, joined, moved, spread, gram, pooled, rounded, probs, b,
                ids.ne(3), ids[:, -2:], keep.to(torch.float32).sum(), positions, flags)


def test_standard_ops_match_eager(tmp_path):
    torch.manual_seed(0)
    module = StandardOps().eval()
    ids = torch.randint(0, 10, (3, 5))
    x, keep = torch.randn(3, 5, 8), torch.randint(0, 2, (3, 5))
    batch, seq = Dim("batch", min=2), Dim("seq", min=3)
    program = torch.export.export(module, (ids, x, keep), dynamic_shapes=(
        {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}))
    gm = cleanup_graph(program.module(), PassContext()).gm
    path = tmp_path / "model.onnx"
    model = to_onnx(gm, path)
    onnx.checker.check_model(str(path), full_check=True)
    assert [n.op_type for n in model.graph.node if n.domain] == []
    with torch.no_grad():
        want = module(ids, x, keep)
    got = ReferenceEvaluator(onnx.load(str(path))).run(
        None, dict(zip([i.name for i in model.graph.input], (ids.numpy(), x.numpy(), keep.numpy()))))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_report(_t(g), w, atol=1e-5, rtol=1e-5, msg=f"output {i}")


class Unmapped(nn.Module):
    def forward(self, x, idx):
        counts = torch.cumsum(x, 1) + torch.full((x.shape[1],), 2.0)
        scaled = torch.add(x, x, alpha=2)
        filled = x.clone()
        filled[idx] = 0.0
        return counts, scaled, filled, x.max(dim=1), x.to(torch.bfloat16).cos()  # ONNX Cos: no bfloat16


def test_ops_without_a_standard_spelling_go_to_the_aten_domain(tmp_path):
    program = torch.export.export(Unmapped(), (torch.randn(3, 4), torch.tensor([0, 2])),
                                  dynamic_shapes=({0: Dim("rows"), 1: Dim("cols")}, None))
    gm = cleanup_graph(program.module(), PassContext()).gm
    path = tmp_path / "model.onnx"
    model = to_onnx(gm, path)
    onnx.checker.check_model(str(path), full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    aten_nodes = {n.op_type: n for n in model.graph.node if n.domain == "aten"}
    assert set(aten_nodes) == {"cumsum", "full", "add", "index_put_", "max", "cos"}
    assert _attrs(aten_nodes["cumsum"])["dim"] == 1
    (size,) = aten_nodes["full"].input  # a size list with a symbolic int is a 1-D input
    assert producers[size].op_type == "Shape" and producers[size].name.startswith("sym_size")
    assert _attrs(aten_nodes["full"])["fill_value"] == 2.0
    assert _attrs(aten_nodes["add"])["alpha"] == 2 and _attrs(aten_nodes["add"])["overload"] == b"Tensor"
    put = _attrs(aten_nodes["index_put_"])
    assert put["mutates"] == [b"self"] and put["input_names"] == [b"self", b"indices[0]", b"values"]
    assert list(aten_nodes["max"].output) == ["getitem", "getitem_1"]
    assert [o.name for o in model.graph.output][-4:] == ["index_put_", "getitem", "getitem_1", "cos"]
