"""The compile pipeline as a whole: the typed config and its string form, the pass order,
the per-step dumps, verification after every pass, and the user's model left untouched."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch

import fusegen
from fusegen import CompileConfig, ConfigError, VerificationError
from fusegen.codegen import cache
from fusegen.codegen.pointwise import source_key
from fusegen.passes import PassResult, build_pipeline, graph_pass
from fusegen.passes.dump import resolve_dump_dir
from fusegen.passes.infra import PassContext, placeholders, val, verify
from helpers import assert_close_report

aten = torch.ops.aten

LAYERS = 2
VOCAB = 256
# fuse_pointwise on the Llama below: per layer the RMSNorm before attention (with the residual
# add in front of it, except layer 0's, which reads the embedding), rotary on q and rotary on k
# (x * cos + rotate_half(x) * sin, the cos/sin tables [B, 1, S, D] broadcast over the heads),
# the RMSNorm before the MLP with its residual add, and silu(gate) * up; then the final norm
# with the last residual add. Before the layers, once: the rotary tables, cos(angles) and
# sin(angles) each times the attention scaling.
TABLE_GROUPS = 2
GROUPS = TABLE_GROUPS + 5 * LAYERS + 1
ROW_GROUPS = 2 * LAYERS + 1  # the norms: a mean over the last dim
ROTARY_GROUPS = 2 * LAYERS  # q and k
POINTWISE_GROUPS = TABLE_GROUPS + ROTARY_GROUPS + LAYERS  # and silu * up
ROTARY_OPS = ["mul.Tensor", "fusegen.rotate_half.default", "mul.Tensor", "add.Tensor"]
# An fp32 RMSNorm is pow, mean, add eps, rsqrt, mul, mul weight (cleanup drops its no-op
# casts); a residual add in front makes 7; rotary is 4; silu * up is 2; a table is 2.
NODES_FUSED = 6 + 7 * (2 * LAYERS) + len(ROTARY_OPS) * ROTARY_GROUPS + 2 * LAYERS + 2 * TABLE_GROUPS
# normalize_graph: rotate_half's cat([neg(x[..., D/2:]), x[..., :D/2]], -1) on q and on k of
# every layer becomes one fusegen.rotate_half(x); the one cat left builds the cos/sin tables.
ROTATIONS = 2 * LAYERS


def _llama(kv_heads: int = 2, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,  # 32000
        hidden_size=64,  # 4096
        intermediate_size=128,  # 11008
        num_hidden_layers=LAYERS,  # 32
        num_attention_heads=4,  # 32
        num_key_value_heads=kv_heads,  # 32 (Llama-2-7B), 8 (Llama-3-8B)
        max_position_embeddings=128,  # 4096
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _ids(B: int = 2, S: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- CompileConfig ---------------------------------------------------------------------------

def test_presets():
    assert CompileConfig.preset("default") == CompileConfig()
    assert CompileConfig.preset("stateless") == CompileConfig(insert_kv_cache=False, paged_kv=False)
    assert CompileConfig.preset("dense_kv") == CompileConfig(paged_kv=False)
    assert CompileConfig.preset("strict") == CompileConfig(strict=True)
    assert CompileConfig.preset("capture_only") == CompileConfig(
        fuse_attention=False, insert_kv_cache=False, paged_kv=False,
        fuse_projections=False, fuse_pointwise=False)
    with pytest.raises(ConfigError, match=r"unknown preset 'fast'; presets: default, capture_only"):
        CompileConfig.preset("fast")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CompileConfig().strict = True  # type: ignore[misc]
    assert CompileConfig().replace(block_size=32).block_size == 32


@pytest.mark.parametrize("config, text", [
    (CompileConfig(), "default"),
    (CompileConfig.preset("stateless"), "insert_kv_cache=0,paged_kv=0"),
    (CompileConfig.preset("dense_kv"), "paged_kv=0"),
    (CompileConfig.preset("capture_only"),
     "fuse_attention=0,insert_kv_cache=0,paged_kv=0,fuse_projections=0,fuse_pointwise=0"),
    (CompileConfig(fuse_projections=False), "fuse_projections=0"),
    (CompileConfig(kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=512),
     "kv_blocks=64,max_num_seqs=8,max_num_batched_tokens=512"),
    (CompileConfig(gqa_kv_heads=1, gqa_method="mean", block_size=32),
     "gqa_kv_heads=1,gqa_method=mean,block_size=32"),
    (CompileConfig(strict=True, verify_shapes=True, max_seq_len=512),
     "strict=1,verify_shapes=1,max_seq_len=512"),
])
def test_to_string_and_back(config, text):
    assert config.to_string() == text
    assert str(config) == text
    assert CompileConfig.from_string(text) == config


@pytest.mark.parametrize("text, want", [
    ("", CompileConfig()),
    ("stateless", CompileConfig.preset("stateless")),
    ("preset=stateless", CompileConfig.preset("stateless")),
    (" preset = dense_kv , block_size = 64 ", CompileConfig(paged_kv=False, block_size=64)),
    ("preset=stateless,strict=true", CompileConfig(insert_kv_cache=False, paged_kv=False, strict=True)),
    ("gqa_kv_heads=2,gqa_method=mean", CompileConfig(gqa_kv_heads=2, gqa_method="mean")),
    ("verify_shapes=on,cleanup=yes", CompileConfig(verify_shapes=True)),
    ("capture_only,fuse_pointwise=1", CompileConfig(fuse_attention=False, insert_kv_cache=False,
                                                    paged_kv=False, fuse_projections=False)),
    ("fuse_pointwise=off,kv_blocks=32", CompileConfig(fuse_pointwise=False, kv_blocks=32)),
])
def test_from_string(text, want):
    assert CompileConfig.from_string(text) == want


@pytest.mark.parametrize("text, field", [
    ("bogus=1", "bogus"),
    ("block_size=abc", "block_size"),
    ("strict=maybe", "strict"),
    ("block_size=24", "block_size"),
    ("block_size=0", "block_size"),
    ("gqa_method=svd", "gqa_method"),
    ("gqa_kv_heads=-1", "gqa_kv_heads"),
    ("max_seq_len=0", "max_seq_len"),
    ("kv_blocks=many", "kv_blocks"),
    ("fuse_projections=maybe", "fuse_projections"),
    ("preset=fast", "fast"),
    ("paged_kv=1,insert_kv_cache=0", "paged_kv"),
    ("preset=stateless,paged_kv=1", "paged_kv"),
    ("insert_kv_cache=1,fuse_attention=0", "insert_kv_cache"),
    ("nokeyvalue", "nokeyvalue"),
])
def test_bad_config_names_the_field(text, field):
    with pytest.raises(ConfigError, match=field):
        CompileConfig.from_string(text)


def test_bad_config_messages():
    with pytest.raises(ConfigError) as info:
        CompileConfig.from_string("block_size=abc")
    assert str(info.value) == "config field 'block_size' expects int, got 'abc'"
    with pytest.raises(ConfigError) as info:
        CompileConfig.from_string("bogus=1")
    assert str(info.value).startswith("unknown config field 'bogus'; fields: capture_by_layer, cleanup, fuse_attention")
    with pytest.raises(ConfigError, match=r"^block_size must be a power of two >= 1, got 24$"):
        CompileConfig(block_size=24)
    assert isinstance(info.value, ValueError)  # callers may catch the builtin


# --- pass order ------------------------------------------------------------------------------

def _names(config) -> list[str]:
    if isinstance(config, str):
        config = CompileConfig.from_string(config)
    return [p.name for p in build_pipeline(config)]


def test_pipeline_order():
    assert _names("default") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                 "fuse_projections", "insert_kv_cache", "insert_paged_blocks",
                                 "fuse_pointwise"]
    assert _names("stateless") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                   "fuse_projections", "fuse_pointwise"]
    assert _names("dense_kv") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                  "fuse_projections", "insert_kv_cache", "fuse_pointwise"]
    assert _names("capture_only") == ["cleanup_graph", "normalize_graph"]
    # GQA conversion needs K and V as separate linears: it runs before fuse_projections
    assert _names("gqa_kv_heads=1") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                        "convert_mha_to_gqa", "fuse_projections",
                                        "insert_kv_cache", "insert_paged_blocks", "fuse_pointwise"]
    assert _names("stateless,gqa_kv_heads=1") == ["cleanup_graph", "normalize_graph",
                                                  "fuse_attention", "convert_mha_to_gqa",
                                                  "fuse_projections", "fuse_pointwise"]
    assert _names("fuse_projections=0") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                            "insert_kv_cache", "insert_paged_blocks",
                                            "fuse_pointwise"]
    assert _names("fuse_pointwise=0") == ["cleanup_graph", "normalize_graph", "fuse_attention",
                                          "fuse_projections", "insert_kv_cache",
                                          "insert_paged_blocks"]
    assert _names("capture_only,fuse_projections=1,fuse_pointwise=1") == [
        "cleanup_graph", "normalize_graph", "fuse_projections", "fuse_pointwise"]


# --- dumps -----------------------------------------------------------------------------------

DUMP_FILES = ["00_capture.py", "01_cleanup_graph.py", "02_normalize_graph.py",
              "03_fuse_attention.py", "04_fuse_projections.py", "05_insert_kv_cache.py",
              "06_insert_paged_blocks.py", "07_fuse_pointwise.py", "kernels/",
              "summary.json", "summary.txt"]
# compile writes the generated source of every FusedGroup to kernels/<group>.py
KERNEL_FILES = sorted(f"fused_{i}.py" for i in range(GROUPS))


@pytest.fixture(scope="module")
def llama():
    return _llama().eval()


@pytest.fixture(scope="module")
def dumped(llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dumps")
    return fusegen.compile(llama, dump_dir=directory), directory


def _files(directory) -> list[str]:
    """Entries of ``directory``; a folder's name ends in "/"."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())


def _kernel_files(directory) -> list[str]:
    return _files(directory / "kernels")


def test_dump_writes_one_file_per_step_and_a_summary(dumped):
    compiled, directory = dumped
    assert _files(directory) == DUMP_FILES
    assert _kernel_files(directory) == KERNEL_FILES
    assert compiled.report.dump_dir == str(directory)


def kernel_name(source: str) -> str:
    return source.split("@triton.jit\ndef ", 1)[1].split("(", 1)[0]


def test_dump_kernels_hold_the_source_of_each_fused_group(dumped):
    compiled, directory = dumped
    gm = compiled.graph_module
    groups = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert groups == [f"fused_{i}" for i in range(GROUPS)]
    assert sorted(f"{g}.py" for g in groups) == _kernel_files(directory)
    kernels = {k["group"]: k for k in compiled.facts["kernels"]}
    assert sorted(kernels) == sorted(groups)
    schedules = [kernels[g]["schedule"] for g in groups]
    assert schedules.count("row") == ROW_GROUPS and schedules.count("pointwise") == POINTWISE_GROUPS
    rotary = []
    for name in groups:
        module = gm.get_submodule(name)
        source = (directory / "kernels" / f"{name}.py").read_text()
        assert source == module.source, name
        assert module.kernel is not None, name
        assert module.schedule == kernels[name]["schedule"], name
        ops = [n for n in module.reference.graph.nodes if n.op == "call_function"]
        assert f"Generated from {len(ops)} graph nodes ({module.schedule} schedule)" in source, name
        # every input is read in place through its strides broadcast to the frame [*lead, N]:
        # one stride per lead dim and a column stride each; every full-frame output is
        # written through its own strides the same way; then the lead sizes after the first
        inputs = [n for n in module.reference.graph.nodes if n.op == "placeholder"]
        (outputs,) = next(n for n in module.reference.graph.nodes if n.op == "output").args
        lead = len(module.frame[0])
        full = [i for i, kind in enumerate(module.output_layouts) if kind == "row"]
        args = ([f"in{i}" for i in range(len(inputs))] + [f"out{i}" for i in range(len(outputs))]
                + [f"s{i}_{d}" for i in range(len(inputs)) for d in range(lead)]
                + [f"c{i}" for i in range(len(inputs))]
                + [f"o{i}_{d}" for i in full for d in range(lead)] + [f"oc{i}" for i in full]
                + [f"L{d}" for d in range(1, lead)])
        # named by its content, so groups with the same code share one compiled kernel
        kernel = f"_fused_{source_key(source.replace(kernel_name(source), cache.PLACEHOLDER))}_kernel"
        assert kernel_name(source) == kernel, name
        assert (f"@triton.jit\ndef {kernel}({', '.join(args)}, M, N: tl.constexpr, "
                f"BLOCK: tl.constexpr, ROWS: tl.constexpr, USE_GDC: tl.constexpr):") in source, name
        for i in range(len(inputs)):
            assert f"a{i} = tl.load(in{i} + off{i} + cols * c{i}, mask=mask, other=0.0)" in source, name
        assert "contiguous" not in source and "input_strides(x, frame)" in source, name
        names = [str(n.target).replace("aten.", "") for n in ops]
        if "fusegen.rotate_half.default" in names:
            rotary.append(name)
            assert names == ROTARY_OPS, name
            assert module.schedule == "pointwise" and lead == 3, name  # [B, H, S] x D
            assert module.input_layouts == ["row", "broadcast", "broadcast"], name
            # rotate_half of input 0: the same load at permuted columns, the first half negated
            assert ("tl.where(cols < N // 2, -1.0, 1.0) * tl.load(in0 + off0 + ((cols + N // 2) % N) * c0, "
                    "mask=mask, other=0.0)") in source, name
        else:
            assert lead == 2 and "(cols + N // 2)" not in source, name  # [B, S] x N
    # per layer: q's rotary right after the input norm, then k's
    assert rotary == [f"fused_{TABLE_GROUPS + i}" for layer in range(LAYERS) for i in (5 * layer + 1, 5 * layer + 2)]


def test_dump_summary_json_matches_the_report(dumped):
    compiled, directory = dumped
    summary = json.loads((directory / "summary.json").read_text())
    records = compiled.report.records
    assert [step["name"] for step in summary] == [r.name for r in records]
    for step, record in zip(summary, records):
        assert step["node_counts"] == dict(record.node_counts), record.name
        assert step["stats"] == record.stats, record.name
        assert step["changed"] == record.changed and step["nodes_made"] == record.nodes_made
        assert sum(step["node_counts"].values()) == record.total_nodes


def test_dump_files_read_as_the_graph_after_each_step(dumped):
    compiled, directory = dumped
    capture = (directory / "00_capture.py").read_text()
    assert capture.startswith("# fusegen graph after step 00: capture\n")
    assert "scaled_dot_product_attention" in capture and "fusegen." not in capture

    normalized = (directory / "02_normalize_graph.py").read_text().splitlines()
    assert normalized[0] == "# fusegen graph after step 02: normalize_graph"
    assert normalized[1].startswith("# changed: True ") and "   made by this step: 0   " in normalized[1]
    assert normalized[2] == f"# counters: rotate_half={ROTATIONS}"
    assert not any(line.startswith("# nodes made by this step: ") for line in normalized)
    body = "\n".join(normalized)
    assert body.count(" = torch.ops.fusegen.rotate_half.default(") == ROTATIONS
    assert body.count(" = torch.ops.aten.cat.default(") == 1

    fused = (directory / "03_fuse_attention.py").read_text().splitlines()
    assert fused[0] == "# fusegen graph after step 03: fuse_attention"
    counters = next(line for line in fused if line.startswith("# counters: "))
    assert counters == (f"# counters: causal={LAYERS}, fused={LAYERS}, fused_sdpa={LAYERS}, "
                        f"gqa={LAYERS}, key_padding={LAYERS}")
    assert any(line.startswith("# nodes made by this step: ") for line in fused)
    body = "\n".join(fused)
    assert body.count("fusegen.attention.default(") == LAYERS
    assert "scaled_dot_product_attention" not in body

    projections = (directory / "04_fuse_projections.py").read_text().splitlines()
    assert projections[0] == "# fusegen graph after step 04: fuse_projections"
    counters = next(line for line in projections if line.startswith("# counters: "))
    # per layer: q/k/v (3 linears) and gate/up (2 linears) of one input each
    assert counters == f"# counters: groups_fused={2 * LAYERS}, linears_fused={5 * LAYERS}"
    body = "\n".join(projections)
    assert body.count("torch.ops.aten.split_with_sizes.default(") == 2 * LAYERS
    for layer in range(LAYERS):
        # q 64 + k 32 + v 32 rows (2 KV heads of 16), then gate 128 + up 128 rows
        assert f'"f32[128, 64]" = self.fusegen_fused_proj_{2 * layer}_weight' in body
        assert f'"f32[256, 64]" = self.fusegen_fused_proj_{2 * layer + 1}_weight' in body

    paged = (directory / "06_insert_paged_blocks.py").read_text()
    assert paged.startswith("# fusegen graph after step 06: insert_paged_blocks\n")
    assert paged.count("fusegen.paged_attention.default(") == LAYERS
    assert "fusegen.attention.default(" not in paged
    assert paged.count("torch.ops.aten.index_select.default(") == 1
    assert 'logits_indices: "i32[' in paged

    pointwise = (directory / "07_fuse_pointwise.py").read_text().splitlines()
    assert pointwise[0] == "# fusegen graph after step 07: fuse_pointwise"
    counters = next(line for line in pointwise if line.startswith("# counters: "))
    assert counters == (f"# counters: groups={GROUPS}, nodes_fused={NODES_FUSED}, "
                        f"pointwise_groups={POINTWISE_GROUPS}, row_groups={ROW_GROUPS}")
    body = "\n".join(pointwise)
    for i in range(GROUPS):
        assert body.count(f" = self.fused_{i}(") == 1, i
    for gone in ("aten.pow", "aten.mean", "aten.rsqrt", "aten.silu", "fusegen.rotate_half"):
        assert gone not in body, gone

    summary = (directory / "summary.txt").read_text()
    for record in compiled.report.records:
        assert record.name in summary
    assert "fusegen.paged_attention" in summary
    op_rows = {line.split()[0]: line.split()[1:] for line in summary.splitlines() if line.strip()}
    # node counts after steps 00..07: capture's one call_module is export's input guard (cleanup
    # removes it); then fuse_pointwise's groups are the only ones
    assert op_rows["call_module"] == ["1"] + ["0"] * 6 + [str(GROUPS)]
    # 5 parts of the fused projections per layer; then one output of every group, and a second
    # (the residual sum) of each group whose sum the next residual add reads: all but the last
    assert op_rows["getitem"] == ["0"] * 4 + [str(5 * LAYERS)] * 3 + [
        str(5 * LAYERS + GROUPS + 2 * LAYERS - 1)]
    # rotate_half from normalize_graph (step 02) until fuse_pointwise moves it into the groups;
    # of capture's cats only the cos/sin tables' is left from step 02 on
    assert op_rows["fusegen.rotate_half"] == ["0"] * 2 + [str(ROTATIONS)] * 5 + ["0"]
    assert op_rows["aten.cat"] == [str(ROTATIONS + 1)] * 2 + ["1"] * 6
    # the summary rows: step, pass, changed, nodes, made, ms, counters
    assert op_rows["02"][:2] == ["normalize_graph", "yes"] and op_rows["02"][3] == "0"
    assert op_rows["02"][5:] == [f"rotate_half={ROTATIONS}"]
    assert op_rows["07"][:2] == ["fuse_pointwise", "yes"]
    assert op_rows["07"][3] == str(GROUPS + GROUPS + 2 * LAYERS - 1)  # call_modules and getitems


def test_dump_rotate_half_rewrite_leaves_nothing_of_the_cat_at_step_02(dumped):
    """The rewrite drops the neg and the two slices the cat read (3 nodes per rotation) in the
    step that made it: the op table and node totals show them gone from step 02 on."""
    compiled, directory = dumped
    summary = (directory / "summary.txt").read_text()
    rows = {line.split()[0]: line.split()[1:] for line in summary.splitlines() if line.strip()}
    assert rows["aten.neg"] == [str(ROTATIONS)] * 2 + ["0"] * 6
    assert rows["aten.slice"] == [str(2 * ROTATIONS)] * 2 + ["0"] * 6
    totals = [r.total_nodes for r in compiled.report.records]
    assert totals[2] == totals[1] - 3 * ROTATIONS


def test_dump_dir_from_the_environment(llama, tmp_path, monkeypatch):
    (tmp_path / "09_stale_pass.py").write_text("# from an older run\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "fused_9.py").write_text("# a kernel of an older run\n")
    monkeypatch.setenv("FUSEGEN_DUMP_DIR", str(tmp_path))
    compiled = fusegen.compile(llama)
    assert _files(tmp_path) == DUMP_FILES  # the stale numbered file is gone
    assert _kernel_files(tmp_path) == KERNEL_FILES  # and so is the stale kernel
    assert compiled.report.dump_dir == str(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary] == [r.name for r in compiled.report.records]


def test_dump_dir_argument_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEGEN_DUMP_DIR", raising=False)
    assert resolve_dump_dir(None) is None
    monkeypatch.setenv("FUSEGEN_DUMP_DIR", "")
    assert resolve_dump_dir(None) is None
    monkeypatch.setenv("FUSEGEN_DUMP_DIR", str(tmp_path / "env"))
    assert resolve_dump_dir(None) == tmp_path / "env"
    assert resolve_dump_dir(tmp_path / "arg") == tmp_path / "arg"


# --- verification ----------------------------------------------------------------------------

def test_verify_shapes_compiles(llama):
    compiled = fusegen.compile(llama, "verify_shapes=1")
    assert compiled.config.verify_shapes
    assert [r.name for r in compiled.report.records] == ["capture", *_names("default")]
    ids = _ids()
    assert_close_report(compiled(ids), _logits(llama, ids), atol=1e-4, rtol=1e-4)


@pytest.fixture
def graph(dumped):
    """A private copy of a compiled graph that a test may break."""
    compiled, _ = dumped
    with warnings.catch_warnings():  # copying export's pytree specs warns about a deprecated API
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(compiled.graph_module)


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]


@graph_pass("break_it")
def break_it(gm, ctx):
    """Feed the lm_head the 128-wide fused q/k/v projection instead of the 64-wide hidden state."""
    linears = _linears(gm)
    lm_head = linears[-1]
    wide = next(n for n in linears if val(n).shape[-1] == 128)
    assert wide.args[1].target == "fusegen_fused_proj_0_weight"
    lm_head.args = (wide, *lm_head.args[1:])
    return PassResult(gm, True, {"rewired": 1})


def test_verify_shapes_catches_a_wrong_shaped_input(graph):
    result = break_it(graph, PassContext())
    result.gm.recompile()
    ctx = PassContext(config=CompileConfig(verify_shapes=True))
    with pytest.raises(VerificationError) as info:
        verify(result.gm, break_it, ctx)
    assert info.value.pass_name == "break_it"
    assert str(info.value).startswith("[break_it] shape propagation failed:")
    assert isinstance(info.value, fusegen.PassError)


def test_verify_runs_the_pass_ensures(graph):
    @graph_pass("lose_a_layer", ensures=lambda gm, ctx: ["layer 1 has no cache write"])
    def lose_a_layer(gm, ctx):
        return PassResult(gm, False)

    with pytest.raises(VerificationError, match=r"^\[lose_a_layer\] layer 1 has no cache write$"):
        verify(graph, lose_a_layer, PassContext())


def test_verify_lints_the_graph(graph):
    @graph_pass("use_before_def")
    def use_before_def(gm, ctx):
        first, last = _linears(gm)[0], _linears(gm)[-1]
        first.args = (last, *first.args[1:])
        return PassResult(gm, True)

    use_before_def(graph, PassContext())
    with pytest.raises(VerificationError, match=r"^\[use_before_def\] graph lint failed"):
        verify(graph, use_before_def, PassContext())


def test_verify_wants_shape_metadata_on_new_nodes(graph):
    @graph_pass("no_meta")
    def no_meta(gm, ctx):
        ids = placeholders(gm)["input_ids"]
        first = next(n for n in gm.graph.nodes if n.op == "call_function" and ids in n.args)
        with gm.graph.inserting_before(first):
            absolute = gm.graph.call_function(aten.abs.default, (ids,))
        first.replace_input_with(ids, absolute)
        return PassResult(gm, True)

    no_meta(graph, PassContext())
    with pytest.raises(VerificationError, match=r"^\[no_meta\] nodes without shape metadata: \['abs\w*'\]$"):
        verify(graph, no_meta, PassContext())


# --- the user's model is left as it was ------------------------------------------------------

def test_compile_leaves_the_model_as_it_was():
    model = _llama(kv_heads=4, attn_implementation="eager").train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = _ids(S=32)

    compiled = fusegen.compile(model, "gqa_kv_heads=2", calibration_ids=ids)

    assert compiled.report.counters["convert_mha_to_gqa.kv_heads_after"] == 2
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "eager"
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert model.config.num_key_value_heads == 4
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 64)

    # and calling the compiled model does not reach back into it either
    compiled.generate(_ids(S=5), max_new_tokens=3)
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name
