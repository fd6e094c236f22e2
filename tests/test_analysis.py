"""The roofline cost model (fusegen.analysis): hand-computed costs of one linear and one
attention node of a mini model, the published operand-intensity figures reproduced from a
compiled graph with Llama-2-7B's widths, the report formats and the plot."""

import json

import pytest
import sympy
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusegen
from families import mini_model
from fusegen.analysis import (B, GPU, GPUS, T, Phase, Product, analyze, analyze_graph,
                              graph_costs, keys_attended, parse_dtype, run_cli)
from fusegen.ops import causal_keep

# mini_model("llama"): hidden 64, 4 query heads, 2 KV heads, head dim 16, MLP 128, vocab 128.
H, HQ, HKV, D = 64, 4, 2, 16
F32 = 4


@pytest.fixture(scope="module")
def mini():
    return fusegen.compile(mini_model("llama"))


@pytest.fixture(scope="module")
def wide():
    """One Llama layer with Llama-2-7B's attention widths, in bf16 to keep it small."""
    config = LlamaConfig(vocab_size=128,            # 32000
                         hidden_size=4096,          # 4096
                         intermediate_size=128,     # 11008
                         num_hidden_layers=1,       # 32
                         num_attention_heads=32,    # 32
                         num_key_value_heads=32,    # 32
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    return fusegen.compile(LlamaForCausalLM(config).to(torch.bfloat16).eval())


def _weight_node(compiled, suffix: str) -> str:
    """The name of the linear node whose weight's qualified name ends with ``suffix``."""
    for node in compiled.graph_module.graph.nodes:
        if node.target is torch.ops.aten.linear.default and str(node.args[1].target).endswith(suffix):
            return node.name
    raise AssertionError(f"no linear reads a weight named *{suffix}")


def _node(analysis, phase: str, name: str):
    return next(c for c in analysis.phases[phase].nodes if c.name == name)


def _first(analysis, phase: str, kind: str):
    return next(c for c in analysis.phases[phase].nodes if c.kind == kind)


# --- the published convention -----------------------------------------------------------------

def test_operand_intensity_is_the_gemm_formula():
    m, k, n = sympy.symbols("M K N", positive=True)
    assert sympy.simplify(Product(m, k, n).intensity - m * k * n / (m * k + k * n)) == 0
    assert Product(sympy.Integer(8192), sympy.Integer(4096), sympy.Integer(4096)).intensity == sympy.Rational(8192 * 4096, 8192 + 4096)


def test_published_figures_from_a_compiled_graph(wide):
    """B=8, T=1024, H=4096, D=128: linear 2730.7 (prefill) / 7.98 (decode); attention PV
    113.8 / 1.0, QK^T 512 / 1.0."""
    a = analyze(wide, batch=8, seq=1024, gpu="h100", dtype=torch.bfloat16)
    o_proj = _weight_node(wide, "o_proj.weight")
    pre, dec = a.phases["prefill"], a.phases["decode"]
    assert pre.value(_node(a, "prefill", o_proj).operand_intensity["gemm"]) == pytest.approx(2730.7, rel=5e-3)
    assert dec.value(_node(a, "decode", o_proj).operand_intensity["gemm"]) == pytest.approx(7.98, rel=5e-3)
    attn_pre = {k: pre.value(e) for k, e in _first(a, "prefill", "attention").operand_intensity.items()}
    attn_dec = {k: dec.value(e) for k, e in _first(a, "decode", "attention").operand_intensity.items()}
    assert attn_pre["pv"] == pytest.approx(113.8, rel=5e-3)
    assert attn_pre["qk"] == pytest.approx(512, rel=5e-3)
    assert attn_dec["qk"] == pytest.approx(1.0, rel=5e-3)
    assert round(attn_dec["pv"], 1) == 1.0  # D / (D + 1) = 0.992


def test_published_figures_symbolically(wide):
    a = analyze(wide, batch=8, seq=1024, dtype=torch.bfloat16)
    o_proj = _weight_node(wide, "o_proj.weight")
    expect = {
        ("prefill", "gemm"): (B * T) * 4096 * 4096 / (B * T * 4096 + 4096 * 4096),
        ("decode", "gemm"): B * 4096 * 4096 / (B * 4096 + 4096 * 4096),
        ("prefill", "qk"): T * 128 * T / (T * 128 + 128 * T),
        ("prefill", "pv"): T * T * 128 / (T * T + T * 128),
        ("decode", "qk"): 1 * 128 * T / (1 * 128 + 128 * T),
        ("decode", "pv"): 1 * T * 128 / (1 * T + T * 128),
    }
    for (phase, product), formula in expect.items():
        node = _node(a, phase, o_proj) if product == "gemm" else _first(a, phase, "attention")
        assert sympy.simplify(node.operand_intensity[product] - formula) == 0, (phase, product)


def test_wide_linear_is_compute_bound_in_prefill_only(wide):
    a = analyze(wide, batch=8, seq=1024, gpu="h100", dtype=torch.bfloat16)
    rows = {(r["phase"], r["kind"]): r for r in a.summary_rows()}
    assert rows["prefill", "linear"]["bound"] == "compute"
    assert rows["decode", "linear"]["bound"] == "memory"
    assert rows["decode", "attention"]["bound"] == "memory"


# --- hand-computed costs of a mini model ------------------------------------------------------

def test_linear_costs_by_hand(mini):
    a = analyze(mini, batch=2, seq=32)
    o_proj = _weight_node(mini, "layers.0.self_attn.o_proj.weight")
    for phase, tokens in (("prefill", 2 * 32), ("decode", 2)):
        v = _node(a, phase, o_proj).values
        assert v["flops"] == 2 * tokens * H * H
        assert v["bytes_read"] == (tokens * H + H * H) * F32
        assert v["bytes_written"] == tokens * H * F32


def test_attention_costs_by_hand(mini):
    a = analyze(mini, batch=2, seq=32)
    prefill = _first(a, "prefill", "attention").values
    pairs = 2 * (32 * 33 // 2)  # 2 sequences, query i sees i + 1 keys
    assert prefill["flops"] == 2 * 2 * D * HQ * pairs
    assert prefill["bytes_read"] == (64 * HQ * D + 2 * 2 * 32 * HKV * D) * F32
    assert prefill["bytes_written"] == 64 * HQ * D * F32
    decode = _first(a, "decode", "attention").values
    assert decode["flops"] == 2 * 2 * D * HQ * (2 * 32)
    assert decode["bytes_read"] == (2 * HQ * D + 2 * 2 * 32 * HKV * D) * F32
    assert decode["bytes_written"] == 2 * HQ * D * F32


def test_dtype_override_halves_float_traffic(mini):
    f32 = analyze(mini, batch=2, seq=32)
    bf16 = analyze(mini, batch=2, seq=32, dtype=torch.bfloat16)
    o_proj = _weight_node(mini, "layers.0.self_attn.o_proj.weight")
    assert _node(bf16, "prefill", o_proj).values["bytes"] * 2 == _node(f32, "prefill", o_proj).values["bytes"]
    ids = lambda a: _first(a, "prefill", "embedding").values["bytes_read"] - 64 * H * a.dtype.itemsize
    assert ids(f32) == ids(bf16) == 64 * 8  # int64 token ids keep their size


def test_bound_follows_the_ridge(mini):
    """o_proj at B=2, T=32 in fp32: prefill 2*64^3 / ((64*64*2 + 64*64) * 4) = 10.7 FLOP/B,
    decode 2*2*64^2 / ((2*64 + 64*64 + 2*64) * 4) = 0.94 FLOP/B."""
    o_proj = _weight_node(mini, "layers.0.self_attn.o_proj.weight")
    toy = GPU("ridge 4", 4e12, 1e12)
    a = analyze(mini, batch=2, seq=32, gpu=toy)
    pre, dec = _node(a, "prefill", o_proj), _node(a, "decode", o_proj)
    assert pre.values["intensity"] == pytest.approx(2 * 64**3 / ((64 * 64 * 3) * 4))
    assert a.phases["prefill"].bound(pre) == "compute"
    assert a.phases["decode"].bound(dec) == "memory"
    h100 = analyze(mini, batch=2, seq=32, gpu="h100")  # ridge 295: a 64-wide linear never reaches it
    assert h100.phases["prefill"].bound(_node(h100, "prefill", o_proj)) == "memory"
    assert pre.values["floor_s"] == pytest.approx(pre.values["flops"] / 4e12)
    assert dec.values["floor_s"] == pytest.approx(dec.values["bytes"] / 1e12)


def test_totals_are_sums_of_nodes(mini):
    a = analyze_graph(mini.graph_module, mini.facts, batch=3, seq=40, gpu="a100", dtype=torch.float16)
    for pc in a.phases.values():
        total, kinds = pc.total(), pc.by_kind()
        for key in ("flops", "bytes_read", "bytes_written", "floor_s"):
            assert getattr(total, key) == pytest.approx(sum(c.values[key] for c in pc.nodes))
            assert getattr(total, key) == pytest.approx(sum(getattr(r, key) for r in kinds))
        assert total.count == len(pc.nodes) == sum(r.count for r in kinds)
    decode = a.phases["decode"]
    assert decode.generated == 3


def test_keys_attended_matches_the_mask():
    for q, l, window in [(7, 7, 0), (1, 9, 0), (3, 10, 0), (7, 7, 3), (1, 9, 4), (5, 12, 4), (4, 4, 9)]:
        keep = causal_keep(q, l, True, window, "cpu")
        assert keys_attended(sympy.Integer(q), sympy.Integer(l), True, window) == int(keep.sum()), (q, l, window)
    assert sympy.simplify(keys_attended(T, T, True, 0) - T * (T + 1) / 2) == 0


# --- other graph kinds, errors ----------------------------------------------------------------

@pytest.mark.parametrize("preset", ["dense_kv", "stateless"])
def test_other_graph_kinds(mini, preset):
    config = mini_model("llama").config
    config.num_hidden_layers = 1  # one layer captures faster; attention costs are per layer
    other = fusegen.compile(LlamaForCausalLM(config).eval(), f"preset={preset}")
    a, paged = analyze(other, batch=2, seq=32), analyze(mini, batch=2, seq=32)
    attention = lambda x, phase: _first(x, phase, "attention").values
    for key in ("flops", "bytes_read", "bytes_written"):
        assert attention(a, "prefill")[key] == attention(paged, "prefill")[key]
    if preset == "dense_kv":
        assert attention(a, "decode")["flops"] == attention(paged, "decode")["flops"]
    else:  # no cache: a decode step recomputes the whole sequence
        assert a.phases["decode"].total().flops == a.phases["prefill"].total().flops


def test_unbound_sizes_are_refused():
    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = torch.ones(4, 8)
    ep = torch.export.export(Scale(), (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    with pytest.raises(ValueError, match="no graph input"):
        graph_costs(ep.graph_module, Phase("prefill", B, T, T))


def test_unknown_gpu_and_dtype(mini):
    with pytest.raises(ValueError, match="h100, h200, a100"):
        analyze(mini, batch=1, seq=8, gpu="v100")
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype("fp8")
    assert GPUS["h100"].ridge == pytest.approx(989 / 3.35)


# --- reports ----------------------------------------------------------------------------------

def test_reports(mini):
    a = analyze(mini, batch=2, seq=32, dtype=torch.bfloat16)
    text = a.table()
    for needle in ("prefill:", "decode:", "ridge 295.2", "attention QK^T", "per generated token"):
        assert needle in text
    data = json.loads(json.dumps(a.to_dict()))
    assert data["phases"]["decode"]["total"]["flops"] == pytest.approx(a.phases["decode"].total().flops)
    rows = a.summary_rows()
    assert all(set(r) == {"phase", "kind", "count", "gflop", "mb", "intensity",
                          "operand_intensity", "bound", "floor_us"} for r in rows)
    kinds = {(r["phase"], r["kind"]) for r in rows}
    assert {("prefill", "linear"), ("decode", "attention"), ("decode", "total")} <= kinds
    assert next(r for r in rows if r["kind"] == "fused")["operand_intensity"] is None


def test_plot_writes_a_png(mini, tmp_path):
    path = tmp_path / "roofline.png"
    analyze(mini, batch=2, seq=32, dtype=torch.bfloat16).plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_run_cli(mini, monkeypatch, tmp_path, capsys):
    """The command's wiring; loading and compiling are stubbed (the mini model stands in)."""
    seen = {}
    monkeypatch.setattr("fusegen.models.load_model", lambda name: seen.setdefault("model", name))
    monkeypatch.setattr(fusegen, "compile", lambda model, config, progress, calibration_ids: seen.update(
        config=config, progress=progress, calibration_ids=calibration_ids) or mini)
    png, out = tmp_path / "r.png", tmp_path / "r.json"
    assert run_cli("some/dir", 2, 16, "h200", "bf16", str(png), str(out), "block_size=8") == 0
    assert seen["model"] == "some/dir" and seen["config"].block_size == 8 and seen["progress"]
    assert seen["calibration_ids"] is None   # the config fits nothing on calibration text
    assert "ridge 206.0" in capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert json.loads(out.read_text())["dtype"] == "bfloat16"
