"""A loaded graph's shape values (fusegen/artifact/shapes.py): the compiled graph's, so that
engine set-up plans the same fused GEMMs (codegen/fused_gemm.py) on either."""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusegen  # noqa: E402
from families import mini_model  # noqa: E402
from fusegen import artifact  # noqa: E402
from fusegen.codegen import fused_gemm, skinny_gemm  # noqa: E402
from fusegen.errors import ArtifactFormatError  # noqa: E402
from fusegen.fused_group import FusedGroup  # noqa: E402
from fusegen.ir import shape_record  # noqa: E402
from fusegen.passes.infra import fake_mode_of  # noqa: E402
from fusegen.runtime.paged import PagedRunner  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return fusegen.compile(mini_model("llama"))


@pytest.fixture(scope="module")
def loaded(llama, tmp_path_factory):
    return fusegen.load(llama.save(tmp_path_factory.mktemp("shapes") / "artifact"))


def _records(gm, prefix=""):
    """Every node's value as the IR prints it (shape text and dtype), FusedGroups' graphs too."""
    out = {}
    for node in gm.graph.nodes:
        if "val" in node.meta:
            out[prefix + node.name] = shape_record(node.meta["val"])
        if node.op == "call_module" and isinstance(getattr(gm, node.target), FusedGroup):
            out.update(_records(getattr(gm, node.target).reference, f"{prefix}{node.target}."))
    return out


def _rewrite_graph(directory, edit):
    """Edit graph.json and record its new hash (a consistent rewrite, not a damaged file)."""
    path = directory / "graph.json"
    graph = json.loads(path.read_text())
    edit(graph)
    path.write_text(json.dumps(graph))
    manifest = json.loads((directory / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["files"]["graph.json"] = {"bytes": len(data), "sha256": artifact.chunk_digests(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _node(graph, name):
    return next(n for n in graph["nodes"] if n["name"] == name)


@pytest.mark.parametrize("family,config", [("llama", None), ("gpt2", None), ("llama", "preset=dense_kv"),
                                           ("llama", "preset=stateless")])
def test_every_value_of_the_compiled_graph_is_in_the_loaded_graph(family, config, tmp_path):
    compiled = fusegen.compile(mini_model(family), config)
    loaded = fusegen.load(compiled.save(tmp_path / "artifact"))
    want, got = _records(compiled.graph_module), _records(loaded.graph_module)
    assert want and {k: got.get(k) for k in want} == want
    assert "shapes" in loaded.load_seconds


def test_loaded_inputs_have_the_recorded_symbols(loaded):
    """Placeholders are symbolic under the recorded names (s.. backed, u.. unbacked), in one
    ShapeEnv; a size symbol made later is named after every recorded one."""
    inputs = {n.name: n.meta["val"] for n in loaded.graph_module.graph.nodes if n.op == "placeholder"}
    assert all(isinstance(d, torch.SymInt) for d in inputs["input_ids"].shape)
    assert str(inputs["input_ids"].shape[1]) == str(inputs["slot_mapping"].shape[0])
    mode = fake_mode_of(loaded.graph_module)
    assert all(t.fake_mode is mode for t in inputs.values())
    recorded = {str(s) for t in inputs.values() for d in t.shape if isinstance(d, torch.SymInt)
                for s in d.node.expr.free_symbols}
    assert str(mode.shape_env.create_unbacked_symint()) not in recorded


def test_fuse_gemms_plans_the_loaded_graph_like_the_compiled_one(llama, loaded):
    _, _, want = skinny_gemm.route_linears(llama.graph_module, [], "cpu")
    _, _, got = skinny_gemm.route_linears(loaded.graph_module, [], "cpu")
    assert "skipped_no_shapes" not in got
    assert got == want and got["gemm_qkv_epilogues"] == 2 and got["gemm_prologues"] == 4


@pytest.mark.parametrize("M", [1, 3])
def test_fused_calls_of_the_loaded_graph_are_sampled_packed(loaded, M):
    """measure_fused's arguments, drawn from the loaded graph's symbolic sizes, have the
    runtime's packed shapes (batch 1, sequence M)."""
    routed, _, _ = skinny_gemm.route_linears(loaded.graph_module, [], "cpu")
    runner = PagedRunner(loaded.graph_module, loaded.facts["kv"], 8, "cpu")
    sites = [n for n in routed.graph.nodes if isinstance(n.target, fused_gemm.FusedGemm)]
    assert sites
    for node in sites:
        args = fused_gemm._sample(node, routed, M, "cpu", runner.kv_pool, torch.Generator().manual_seed(0))
        ins, _, _, _ = node.target._split(args)
        assert all(t.shape[:-1] == (1, M) for t in ins if isinstance(t, torch.Tensor) and t.dim() == 3)


def test_a_shape_record_the_ops_do_not_compute_is_refused(llama, tmp_path):
    saved = llama.save(tmp_path / "artifact")

    def edit(graph):
        _node(graph, "linear_default")["shape"]["shape"][-1] += 1
    _rewrite_graph(saved, edit)
    with pytest.raises(ArtifactFormatError, match="linear_default.*its op computes"):
        fusegen.load(saved)


def test_a_group_graphs_record_is_checked_too(llama, tmp_path):
    saved = llama.save(tmp_path / "artifact")

    def edit(graph):
        inner = next(iter(graph["modules"].values()))["graph"]["nodes"]
        node = next(n for n in inner if n["op"] == "call_function" and "dtype" in n.get("shape", {}))
        node["shape"]["dtype"] = "float16" if node["shape"]["dtype"] != "float16" else "float32"
    _rewrite_graph(saved, edit)
    with pytest.raises(ArtifactFormatError, match="its op computes"):
        fusegen.load(saved)


@pytest.mark.parametrize("dim", ["__import__('os').getpid()", "s1.real", "s53 ** 2", "x7", "s53 +", "u99999999", -3,
                                 [], True])
def test_an_input_dim_is_parsed_never_evaluated(llama, tmp_path, dim):
    saved = llama.save(tmp_path / "artifact")

    def edit(graph):
        _node(graph, "input_ids")["shape"]["shape"][1] = dim
    _rewrite_graph(saved, edit)
    with pytest.raises(ArtifactFormatError, match="input_ids"):
        fusegen.load(saved)


def test_inputs_whose_shapes_the_graph_cannot_take_are_refused(llama, tmp_path):
    saved = llama.save(tmp_path / "artifact")

    def edit(graph):
        _node(graph, "input_ids")["shape"]["shape"] = ["s43", "s53", 3]
    _rewrite_graph(saved, edit)
    with pytest.raises(ArtifactFormatError, match="do not propagate|its op computes"):
        fusegen.load(saved)


def test_a_graph_without_shape_values_runs_unfused(llama):
    """The defensive path that loaded graphs no longer take: fuse_gemms leaves a graph whose
    linears carry no values as it is, and counts it."""
    routed, _, _ = skinny_gemm.route_linears(llama.graph_module, [], "cpu", epilogues=False)
    for node in routed.graph.nodes:
        node.meta.pop("val", None)   # the routed copy's own meta dicts
    before = len(routed.graph.nodes)
    assert fused_gemm.fuse_gemms(routed) == {"skipped_no_shapes": 1}
    assert len(routed.graph.nodes) == before
    assert all("val" in n.meta for n in llama.graph_module.graph.nodes if n.op == "placeholder")


_STRUCTURE = ("gemm_prologues", "gemm_epilogues", "gemm_qkv_epilogues", "linears_unfused", "skipped_no_shapes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_a_loaded_bf16_model_fuses_and_generates_like_the_compiled_one(monkeypatch, tmp_path):
    """Engine set-up on CUDA plans the loaded graph's fused GEMMs and skinny-GEMM shapes as
    the compiled graph's; with the template and every fused call forced on (whatever the
    measurements say), both run the same kernels and give the same greedy tokens in bf16."""
    import functools

    monkeypatch.setattr(skinny_gemm.GemmTable, "lookup", skinny_gemm.GemmTable.best_template)
    monkeypatch.setattr(fused_gemm, "measure_fused", functools.partial(fused_gemm.measure_fused, margin=1e9))
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())
    compiled = fusegen.compile(mini_model("llama").to("cuda", torch.bfloat16))
    loaded = fusegen.load(compiled.save(tmp_path / "artifact"))
    engines = [m.engine(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4) for m in (compiled, loaded)]
    want, got = (e.setup for e in engines)
    assert {k: got["gemm_fusion"].get(k) for k in _STRUCTURE} == {k: want["gemm_fusion"].get(k) for k in _STRUCTURE}
    assert got["gemm_fusion"]["gemm_qkv_epilogues"] == 2 and "skipped_no_shapes" not in got["gemm_fusion"]
    assert all(c["chosen"] == "fused" for c in got["gemm_fusion"]["calls"])
    assert sorted((g["M"], g["N"], g["K"]) for g in got["gemm"]) == sorted((g["M"], g["N"], g["K"]) for g in want["gemm"])
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [64] * 5]
    assert engines[1].generate_batch(prompts, 10, eos_token_ids=[]) == engines[0].generate_batch(prompts, 10, eos_token_ids=[])


def test_a_graph_torch_cannot_follow_symbolically_loads_without_values(llama, tmp_path, monkeypatch, caplog):
    """Where the symbolic propagation fails although the ops take the graph at one size (a
    torch release whose guards cannot evaluate the loaded symbols), the model loads without
    shape values, says so, and generates what the compiled model does, its linears unfused."""
    from fusegen.artifact import shapes

    saved = llama.save(tmp_path / "artifact")

    def fails(gm):
        raise RuntimeError("s44")
    monkeypatch.setattr(shapes, "_propagate_symbolically", fails)
    with caplog.at_level("WARNING", logger="fusegen.artifact"):
        loaded = fusegen.load(saved)
    assert "propagate at one size but not symbolically" in caplog.text and "RuntimeError: s44" in caplog.text
    assert not _records(loaded.graph_module)
    _, _, stats = skinny_gemm.route_linears(loaded.graph_module, [], "cpu")
    assert stats == {"skipped_no_shapes": 1}
    ids = torch.tensor([[5, 9, 3, 77, 12]])
    assert torch.equal(loaded.generate(ids, 6), llama.generate(ids, 6))


def test_a_graph_that_fails_at_one_size_too_is_refused(llama, tmp_path, monkeypatch):
    from fusegen.artifact import shapes

    saved = llama.save(tmp_path / "artifact")

    def edit(graph):
        _node(graph, "input_ids")["shape"]["shape"] = ["s43", "s53", 3]
    _rewrite_graph(saved, edit)
    monkeypatch.setattr(shapes, "_propagate_symbolically", lambda gm: (_ for _ in ()).throw(RuntimeError("s44")))
    with pytest.raises(ArtifactFormatError, match=r"do not propagate \(RuntimeError: s44\)"):
        fusegen.load(saved)
