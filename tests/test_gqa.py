"""Merging key/value heads: the arithmetic of gqa_merge.py, the convert_mha_to_gqa pass on a
mini Llama, and an exactness check (merging heads that are already identical is lossless)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

import fusegen
from fusegen import CompileConfig, PassError
from fusegen.passes import gqa_merge
from fusegen.passes.convert_mha_to_gqa import convert_mha_to_gqa
from fusegen.passes.infra import PassContext, call_nodes, getattr_path, node_counts, val
from helpers import assert_close_report

ops = torch.ops.fusegen

LAYERS = 2
HEADS, HEAD_DIM = 4, 16
HIDDEN = HEADS * HEAD_DIM
VOCAB = 256


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- gqa_merge: the arithmetic ---------------------------------------------------------------

def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[H*D, ...] -> [H, D, ...]"""
    return t.reshape(H, -1, *t.shape[1:])


@pytest.mark.parametrize("H, group", [(4, 2), (4, 4), (6, 3), (8, 1)])
def test_merge_weight_with_mean_matrices_is_the_mean_of_the_heads(H, group):
    D, inputs = 8, 12
    W = torch.randn(H * D, inputs, generator=_gen(H + group))
    b = torch.randn(H * D, generator=_gen(1))
    B = gqa_merge.mean_matrices(H, D, group)

    merged = gqa_merge.merge_weight(W, B, group)
    assert merged.shape == (H // group * D, inputs)
    want = _heads(W, H).reshape(H // group, group, D, inputs).mean(1).reshape(-1, inputs)
    assert_close_report(merged, want)

    merged_bias = gqa_merge.merge_bias(b, B, group)
    assert_close_report(merged_bias, _heads(b, H).reshape(H // group, group, D).mean(1).reshape(-1))


def test_merged_projection_computes_the_merged_heads():
    """k' = sum_g k_g B_g for every token, with k_g = x W_g^T + b_g (the module docstring)."""
    H, D, inputs, group = 4, 8, 12, 2
    W = torch.randn(H * D, inputs, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(H * D, generator=_gen(1), dtype=torch.float64)
    B = torch.randn(H, D, D, generator=_gen(2), dtype=torch.float64)
    x = torch.randn(5, inputs, generator=_gen(3), dtype=torch.float64)

    k = _heads((x @ W.T + b).T, H).permute(2, 0, 1)  # [tokens, H, D]
    want = torch.einsum("thd,hde->the", k, B).reshape(5, H // group, group, D).sum(2)

    W2, b2 = gqa_merge.merge_weight(W, B, group), gqa_merge.merge_bias(b, B, group)
    got = (x @ W2.T + b2).reshape(5, H // group, D)
    assert_close_report(got, want, atol=1e-10, rtol=1e-10)


def _rotary_matrix(D: int, angles: torch.Tensor) -> torch.Tensor:
    """R with x @ R == x * cos + rotate_half(x) * sin, the rotate_half rotary layout."""
    cos = torch.cat([angles.cos(), angles.cos()]).double()
    sin = torch.cat([angles.sin(), angles.sin()]).double()
    eye = torch.eye(D, dtype=torch.float64)
    rotate_half = torch.cat([-eye[:, D // 2:], eye[:, :D // 2]], dim=-1)
    return eye * cos + rotate_half * sin


def test_rotary_matrix_is_rotate_half():
    D = 8
    angles = torch.rand(D // 2, generator=_gen(0), dtype=torch.float64) * 6.3
    x = torch.randn(3, D, generator=_gen(1), dtype=torch.float64)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    assert_close_report(x @ _rotary_matrix(D, angles), x * cos + torch.cat([-x2, x1], -1) * sin)


@pytest.mark.parametrize("D", [2, 8, 16])
def test_rotary_commutant_commutes_with_every_rotation(D):
    C = torch.randn(3, D, D, generator=_gen(D), dtype=torch.float64)
    A = gqa_merge.rotary_commutant(C)
    for seed in range(4):
        R = _rotary_matrix(D, torch.rand(D // 2, generator=_gen(100 + seed), dtype=torch.float64) * 6.3)
        assert_close_report(A @ R, R @ A, atol=1e-12, rtol=1e-12)
        assert not torch.allclose(C @ R, R @ C)  # the test would notice a no-op
    # a projection: idempotent, and the residual is orthogonal to the commutant
    assert_close_report(gqa_merge.rotary_commutant(A), A, atol=1e-12, rtol=1e-12)
    inner = ((C - A) * A).sum((-1, -2))
    assert_close_report(inner, torch.zeros_like(inner), atol=1e-10, rtol=0)


def _spd(D: int, seed: int) -> torch.Tensor:
    X = torch.randn(D, 3 * D, generator=_gen(seed))
    return X @ X.T / (3 * D) + 0.1 * torch.eye(D)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_merge_matrices_of_identical_metrics_is_identity_over_r(group):
    D, H = 8, 4
    M = _spd(D, 0).expand(H, D, D).contiguous()
    B = gqa_merge.merge_matrices(M, group)
    assert_close_report(B, torch.eye(D).expand(H, D, D) / group, atol=1e-5, rtol=1e-5)


def test_merge_matrices_of_a_group_sum_to_identity():
    """sum_g B_g = I: a token whose heads all agree keeps its key."""
    D, H, group = 8, 6, 3
    M = torch.stack([_spd(D, seed) for seed in range(H)])
    B = gqa_merge.merge_matrices(M, group).reshape(H // group, group, D, D).sum(1)
    assert_close_report(B, torch.eye(D).expand(H // group, D, D), atol=1e-5, rtol=1e-5)


def test_output_metrics_sum_over_the_query_heads_of_a_group():
    Hq, Hkv, D, hidden = 4, 2, 8, 12
    W_o = torch.randn(hidden, Hq * D, generator=_gen(0))
    M = gqa_merge.output_metrics(W_o, Hq, Hkv)
    for g in range(Hkv):
        want = sum(W_o[:, h * D:(h + 1) * D].T.double() @ W_o[:, h * D:(h + 1) * D].double()
                   for h in range(g * Hq // Hkv, (g + 1) * Hq // Hkv))
        assert_close_report(M[g], want.float(), atol=1e-4, rtol=1e-5)


# --- the pass on a mini Llama ----------------------------------------------------------------

def _llama(kv_heads: int = HEADS, attention_bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,  # 32000
        hidden_size=HIDDEN,  # 4096
        intermediate_size=128,  # 11008
        num_hidden_layers=LAYERS,  # 32
        num_attention_heads=HEADS,  # 32
        num_key_value_heads=kv_heads,  # 32: Llama-2-7B is MHA
        max_position_embeddings=128,  # 4096
        attention_bias=attention_bias,  # False (Qwen2 has K/V biases)
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def calibration_ids():
    return torch.randint(0, VOCAB, (2, 32), generator=_gen(7))


@pytest.fixture(scope="module")
def mha():
    return _llama()


@pytest.fixture(scope="module")
def stateless(mha):
    return fusegen.compile(mha, "stateless,fuse_projections=0,fuse_pointwise=0")  # the GQA pass runs on it next


def _copy(gm):
    with warnings.catch_warnings():  # copying export's pytree specs warns about a deprecated API
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def _context(target: int, method: str = "lsq", calibration_ids=None) -> PassContext:
    config = CompileConfig.preset("stateless").replace(gqa_kv_heads=target, gqa_method=method)
    return PassContext(config=config, calibration_ids=calibration_ids)


TARGETS = [(2, "mean"), (2, "lsq"), (1, "mean"), (1, "lsq")]


@pytest.mark.parametrize("target, method", TARGETS)
def test_pass_rewrites_the_kv_projections(stateless, calibration_ids, target, method):
    gm = _copy(stateless.graph_module)
    result = convert_mha_to_gqa(gm, _context(target, method, calibration_ids))
    result.gm.recompile()

    assert result.changed
    stats = result.stats
    assert stats["layers_converted"] == LAYERS
    assert (stats["kv_heads_before"], stats["kv_heads_after"]) == (HEADS, target)
    assert stats["kv_bytes_per_token_before"] == 2 * LAYERS * HEADS * HEAD_DIM * 4
    assert stats["kv_bytes_per_token_after"] == stats["kv_bytes_per_token_before"] * target // HEADS
    assert stats["calibration_ppl_before"] > 1 and stats["calibration_ppl_after"] > 1

    sites = call_nodes(result.gm, ops.attention.default)
    assert len(sites) == LAYERS
    for site in sites:
        q, k, v = (val(a) for a in site.args[:3])
        assert q.shape[1] == HEADS
        assert k.shape[1] == target and v.shape[1] == target
        assert k.shape[3] == HEAD_DIM
    merged = [name for name, _ in result.gm.named_buffers() if name.startswith("fusegen_gqa_")]
    assert sorted(merged) == sorted(f"fusegen_gqa_{kv}{layer}_weight"
                                    for kv in "kv" for layer in range(LAYERS))
    for name in merged:
        assert getattr(result.gm, name).shape == (target * HEAD_DIM, HIDDEN)

    ids = torch.randint(0, VOCAB, (2, 7), generator=_gen(1))
    with torch.no_grad():
        logits = result.gm(ids, torch.ones_like(ids), torch.arange(7).expand(2, 7))
    assert logits.shape == (2, 7, VOCAB) and torch.isfinite(logits).all()


def test_pass_refuses_a_target_that_does_not_divide_the_heads(stateless, calibration_ids):
    gm = _copy(stateless.graph_module)
    before = node_counts(gm)
    with pytest.raises(PassError) as info:
        convert_mha_to_gqa(gm, _context(3, calibration_ids=calibration_ids))
    assert info.value.pass_name == "convert_mha_to_gqa"
    message = str(info.value)
    assert message.startswith("[convert_mha_to_gqa] LlamaForCausalLM: cannot merge 4 KV heads into 3: "
                              "3 does not divide 4 (at module 'model.layers.0.self_attn' (LlamaAttention))")
    assert message.endswith("; compile with gqa_kv_heads=1 or 2 instead")
    assert node_counts(gm) == before


def test_pass_needs_calibration_ids(stateless):
    gm = _copy(stateless.graph_module)
    with pytest.raises(PassError, match=r"^\[convert_mha_to_gqa\] needs calibration_ids"):
        convert_mha_to_gqa(gm, _context(2, calibration_ids=None))


def test_pass_keeps_a_target_at_or_above_the_head_count(stateless):
    gm = _copy(stateless.graph_module)
    before = node_counts(gm)
    result = convert_mha_to_gqa(gm, _context(HEADS))
    assert not result.changed
    assert result.stats == {"kv_heads_before": HEADS, "kv_heads_after": HEADS}
    assert node_counts(result.gm) == before


@pytest.fixture(scope="module", params=TARGETS, ids=[f"{t}-{m}" for t, m in TARGETS])
def converted(request, mha, calibration_ids):
    target, method = request.param
    config = CompileConfig(gqa_kv_heads=target, gqa_method=method)
    return target, fusegen.compile(mha, config, calibration_ids=calibration_ids)


def test_compiled_gqa_model_caches_fewer_heads_and_generates(converted):
    target, compiled = converted
    counters = compiled.report.counters
    assert counters["convert_mha_to_gqa.kv_heads_before"] == HEADS
    assert counters["convert_mha_to_gqa.kv_heads_after"] == target
    assert (counters["convert_mha_to_gqa.kv_bytes_per_token_after"] * HEADS
            == counters["convert_mha_to_gqa.kv_bytes_per_token_before"] * target)
    assert compiled.kind == "paged"
    assert compiled.facts["kv"].kv_heads == target
    assert compiled.facts["kv"].query_heads == HEADS
    gm = compiled.graph_module
    pool = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "kv_pool")
    assert val(pool).shape[4] == target
    for write in call_nodes(gm, ops.paged_kv_write.default):
        assert val(write.args[2]).shape[1] == target

    prompt = torch.randint(3, VOCAB, (2, 5), generator=_gen(2))
    out = compiled.generate(prompt, max_new_tokens=4)
    assert out.shape == (2, 9)
    assert torch.equal(out[:, :5], prompt)


# --- exactness -------------------------------------------------------------------------------

def _identical_heads_llama(kv_heads: int, group: int):
    """Every group of ``group`` consecutive KV heads has one set of K and V weights and biases,
    so merging each group into one head changes nothing."""
    model = _llama(kv_heads=kv_heads, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                weight, bias = _heads(proj.weight, kv_heads), _heads(proj.bias, kv_heads)
                for head in range(kv_heads):
                    first = head - head % group
                    weight[head] = weight[first]
                    bias[head] = bias[first]
    return model


@pytest.fixture(scope="module")
def identical_heads():
    return _identical_heads_llama(kv_heads=HEADS, group=2)


@pytest.mark.parametrize("method", ["mean", "lsq"])
def test_merging_identical_heads_is_lossless(identical_heads, calibration_ids, method):
    model = identical_heads
    compiled = fusegen.compile(model, f"stateless,gqa_kv_heads={HEADS // 2},gqa_method={method}",
                               calibration_ids=calibration_ids)
    counters = compiled.report.counters
    assert counters["convert_mha_to_gqa.kv_heads_after"] == HEADS // 2
    assert (counters["convert_mha_to_gqa.calibration_ppl_after"]
            == pytest.approx(counters["convert_mha_to_gqa.calibration_ppl_before"], rel=1e-5))
    for site in call_nodes(compiled.graph_module, ops.attention.default):
        assert val(site.args[1]).shape[1] == HEADS // 2
    ids = torch.randint(0, VOCAB, (2, 11), generator=_gen(3))
    with torch.no_grad():
        want = model(ids).logits
    assert_close_report(compiled(ids), want, atol=1e-5, rtol=1e-5, msg=method)


def test_merging_identical_heads_of_a_gqa_model_is_lossless(calibration_ids):
    """Already grouped (4 query heads over 2 KV heads) down to one KV head: query head h reads
    merged head h // 4 where it read head h // 2, so the head order must survive the merge."""
    model = _identical_heads_llama(kv_heads=2, group=2)
    stateless = fusegen.compile(model, "stateless,fuse_projections=0,fuse_pointwise=0")  # the GQA pass runs on it next
    ids = torch.randint(0, VOCAB, (2, 11), generator=_gen(4))
    with torch.no_grad():
        want = model(ids).logits
    for method in ("mean", "lsq"):
        result = convert_mha_to_gqa(_copy(stateless.graph_module),
                                    _context(1, method, calibration_ids))
        result.gm.recompile()
        assert (result.stats["kv_heads_before"], result.stats["kv_heads_after"]) == (2, 1)
        with torch.no_grad():
            got = result.gm(ids, torch.ones_like(ids), torch.arange(11).expand(2, 11))
        assert_close_report(got, want, atol=1e-5, rtol=1e-5, msg=method)


def test_gpt2_fused_c_attn_identical_heads_merge_losslessly():
    """GPT-2's Conv1D c_attn holds [q | k | v] columns; merging identical K/V heads must not
    change the logits, and the split after the projection follows the new sizes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from families import mini_model

    model = mini_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            for part in (1, 2):  # keys, values: 4 heads of 16 columns each
                cols = slice(part * 64, (part + 1) * 64)
                w = W[:, cols].reshape(64, 4, 16).clone()
                w[:, 1], w[:, 3] = w[:, 0], w[:, 2]
                W[:, cols] = w.reshape(64, 64)
                bb = b[cols].reshape(4, 16).clone()
                bb[1], bb[3] = bb[0], bb[2]
                b[cols] = bb.reshape(64)
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    for method in ("mean", "lsq"):
        compiled = fusegen.compile(model, f"stateless,gqa_kv_heads=2,gqa_method={method}",
                                   calibration_ids=calib)
        stats = next(r.stats for r in compiled.report.records if r.name == "convert_mha_to_gqa")
        assert stats["kv_heads_after"] == 2 and stats["kv_bytes_per_token_after"] == 512
        assert (compiled(ids) - want).abs().max().item() < 1e-5


# --- refit: grouping, permutation, the calibrated refit --------------------------------------

from fusegen.passes import gqa_refit  # noqa: E402
from fusegen.passes.gqa_layers import permute_heads  # noqa: E402

REFIT_STEPS = 60


def test_group_heads_puts_the_most_similar_heads_together():
    # 0~2 and 1~3 are alike, 0~1 a little: contiguous groups would pair 0 with 1
    sim = torch.full((4, 4), 0.1, dtype=torch.float64)
    sim.fill_diagonal_(2.0)
    sim[0, 2] = sim[2, 0] = 1.9
    sim[1, 3] = sim[3, 1] = 1.7
    sim[0, 1] = sim[1, 0] = 0.5
    assert gqa_refit.group_heads(sim, 2) == [[0, 2], [1, 3]]
    assert gqa_refit.group_heads(sim, 1) == [[0, 1, 2, 3]]
    assert gqa_refit.group_heads(sim, 4) == [[0], [1], [2], [3]]


def test_head_order_moves_the_query_heads_with_their_kv_head():
    kv, q = gqa_refit.head_order([[0, 2], [1, 3]], q_heads=8, kv_heads=4)
    assert kv == [0, 2, 1, 3]
    assert q == [0, 1, 4, 5, 2, 3, 6, 7]


def test_linear_cka_is_invariant_to_rotation_and_scale():
    a = torch.randn(200, 8, generator=_gen(0), dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=_gen(1), dtype=torch.float64))
    assert gqa_refit.linear_cka(a, 3 * a @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert gqa_refit.linear_cka(a, torch.randn(200, 8, generator=_gen(2), dtype=torch.float64)) < 0.3


def _refit_layers(gm):
    from fusegen.passes.gqa_calibrated_refit import attention_layer

    return [attention_layer(i, site, HEAD_DIM) for i, site in enumerate(call_nodes(gm, ops.attention.default))]


def test_permuted_heads_compute_the_same_logits(stateless):
    gm = _copy(stateless.graph_module)
    ids = torch.randint(0, VOCAB, (2, 9), generator=_gen(5))
    args = (ids, torch.ones_like(ids), torch.arange(9).expand(2, 9))
    with torch.no_grad():
        want = gm(*args)
    kv_order = [2, 0, 3, 1]
    _, q_order = gqa_refit.head_order([[2, 0], [3, 1]], HEADS, HEADS)
    weights_before = {layer.q: getattr_path(gm, layer.q.args[1].target).clone() for layer in _refit_layers(gm)}
    for layer in _refit_layers(gm):
        permute_heads(gm, layer, kv_order, q_order)
    gm.recompile()
    for q, before in weights_before.items():  # the permutation really moved rows
        assert not torch.equal(getattr_path(gm, q.args[1].target), before)
    with torch.no_grad():
        got = gm(*args)
    assert_close_report(got, want, atol=1e-5, rtol=1e-5)


def _scattered_duplicate_heads_llama():
    """KV head 2 is a copy of head 0 and head 3 of head 1 (weights and biases): grouping by
    similarity must pair them, which contiguous groups (0+1, 2+3) would not."""
    model = _llama(kv_heads=HEADS, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                weight, bias = _heads(proj.weight, HEADS), _heads(proj.bias, HEADS)
                weight[2], bias[2] = weight[0], bias[0]
                weight[3], bias[3] = weight[1], bias[1]
    return model


def test_refit_groups_duplicate_heads_and_converts_them_losslessly(calibration_ids):
    model = _scattered_duplicate_heads_llama()
    ids = torch.randint(0, VOCAB, (2, 11), generator=_gen(6))
    with torch.no_grad():
        want = model(ids).logits
    errors = {}
    for method in ("lsq", "refit"):
        compiled = fusegen.compile(model, f"stateless,gqa_kv_heads=2,gqa_method={method},"
                                          f"gqa_refit_steps={REFIT_STEPS}", calibration_ids=calibration_ids)
        errors[method] = (compiled(ids) - want).abs().max().item()
        stats = next(r.stats for r in compiled.report.records if r.name == "convert_mha_to_gqa")
        if method == "refit":
            assert stats["heads_regrouped"] == LAYERS
            assert stats["calibration_ppl_after"] == pytest.approx(stats["calibration_ppl_before"], rel=1e-5)
            assert stats["attention_error_after"] < 1e-8
    assert errors["refit"] < 1e-4
    assert errors["lsq"] > 100 * errors["refit"]  # contiguous groups merge heads that differ


def _pass_stats(model, config: str, calibration_ids):
    compiled = fusegen.compile(model, config, calibration_ids=calibration_ids)
    return compiled, next(r.stats for r in compiled.report.records if r.name == "convert_mha_to_gqa")


@pytest.mark.parametrize("target", [2, 1])
def test_refit_lowers_the_attention_error_below_lsq(mha, calibration_ids, target):
    _, lsq = _pass_stats(mha, f"stateless,gqa_kv_heads={target},gqa_method=lsq", calibration_ids)
    _, refit = _pass_stats(mha, f"stateless,gqa_kv_heads={target},gqa_method=refit,"
                                f"gqa_refit_steps={REFIT_STEPS}", calibration_ids)
    for key in ("refit_error_before", "refit_error_after", "heads_regrouped", "attention_error_after",
                "calibration_ppl_before", "calibration_ppl_after", "kv_bytes_per_token_after"):
        assert key in refit, key
    assert refit["kv_bytes_per_token_after"] == lsq["kv_bytes_per_token_after"]
    assert refit["refit_error_after"] < refit["refit_error_before"]
    assert refit["attention_error_after"] < 0.5 * lsq["attention_error_after"]
    # the layers compose: the refit model is closer to the original on the calibration text
    assert (abs(math.log(refit["calibration_ppl_after"] / refit["calibration_ppl_before"]))
            < abs(math.log(lsq["calibration_ppl_after"] / lsq["calibration_ppl_before"])))


def test_refit_with_zero_steps_is_the_lsq_merge(mha, calibration_ids):
    _, lsq = _pass_stats(mha, "stateless,gqa_kv_heads=1,gqa_method=lsq", calibration_ids)
    _, zero = _pass_stats(mha, "stateless,gqa_kv_heads=1,gqa_method=refit,gqa_refit_steps=0", calibration_ids)
    assert zero["refit_error_after"] == zero["refit_error_before"]
    assert zero["calibration_ppl_after"] == pytest.approx(lsq["calibration_ppl_after"], rel=1e-4)


def test_refit_is_deterministic(mha, calibration_ids):
    config = f"stateless,gqa_kv_heads=1,gqa_method=refit,gqa_refit_steps={REFIT_STEPS // 2}"
    first, second = (fusegen.compile(mha, config, calibration_ids=calibration_ids) for _ in range(2))
    buffers = dict(second.graph_module.named_buffers())
    refit = [name for name, _ in first.graph_module.named_buffers() if name.startswith("fusegen_gqa_")]
    assert len(refit) == 4 * LAYERS  # q, k, v and o of every layer
    for name, value in first.graph_module.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_refit_compiles_paged_and_generates(mha, calibration_ids):
    compiled = fusegen.compile(mha, f"gqa_kv_heads=1,gqa_method=refit,gqa_refit_steps={REFIT_STEPS // 2}",
                               calibration_ids=calibration_ids)
    assert compiled.kind == "paged" and compiled.facts["kv"].kv_heads == 1
    prompt = torch.randint(3, VOCAB, (2, 5), generator=_gen(2))
    out = compiled.generate(prompt, max_new_tokens=3)
    assert out.shape == (2, 8) and torch.equal(out[:, :5], prompt)


def test_refit_refuses_a_fused_qkv_projection():
    from families import mini_model

    calib = torch.randint(0, 128, (2, 16), generator=_gen(0))
    with pytest.raises(PassError, match="gqa_method=refit needs separate q, k, v and o linear projections"):
        fusegen.compile(mini_model("gpt2"), "stateless,gqa_kv_heads=2,gqa_method=refit", calibration_ids=calib)


# --- fusegen-cli quality ---------------------------------------------------------------------

def test_cli_quality_compares_the_base_and_the_converted_model(tiny_chat_dir, tmp_path, capsys):
    from fusegen.cli import main

    out = tmp_path / "quality.json"
    config = f"preset=stateless,gqa_kv_heads=1,gqa_method=refit,gqa_refit_steps={REFIT_STEPS // 2}"
    assert main(["quality", str(tiny_chat_dir), "--config", config, "--length", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    base, converted = result["rows"]
    assert base["name"] == "base" and converted["name"] == CompileConfig.from_string(config).to_string()
    assert base["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers, K and V, heads, head_dim, fp32
    assert converted["kv_bytes_per_token"] == base["kv_bytes_per_token"] // 2
    assert converted["stats"]["convert_mha_to_gqa.kv_heads_after"] == 1
    assert 1 < base["heldout_ppl"] < 1e4 and 1 < converted["heldout_ppl"] < 1e4
    assert converted["heldout_ppl"] != base["heldout_ppl"]
    assert result["heldout_tokens"] % 64 == 0 and result["calibration_sequences"] > result["calibration_tokens"] // 64
    # the table shows both rows with the figures of the JSON file
    lines = [line for line in printed.splitlines() if line.startswith(("base ", converted["name"][:30]))]
    assert len(lines) == 2
    assert f"{base['heldout_ppl']:.3f}" in lines[0] and f"{converted['heldout_ppl']:.3f}" in lines[1]
    assert f"{converted['kv_bytes_per_token']:,}" in lines[1]


@pytest.mark.parametrize("argv, message", [
    (["quality", "no-such-model-anywhere"], "no-such-model-anywhere"),
    (["quality", "--config", "gqa_kv_heads=-1"], "gqa_kv_heads must be >= 0"),
    (["quality", "--config", "gqa_methd=refit"], "unknown config field 'gqa_methd'"),
    (["quality", "--calibration", "/no/such/text.txt"], "--calibration /no/such/text.txt: no such file"),
])
def test_cli_quality_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from fusegen.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusegen-cli: error: ") and message in err[0], err


def test_quality_measures_quantized_weights_too(tiny_chat_dir):
    from fusegen.quality import measure

    result = measure(str(tiny_chat_dir), ["preset=stateless,weights=int8"], length=64)
    base, int8 = result.rows
    assert int8.kv_bytes_per_token == base.kv_bytes_per_token  # no conversion of the heads
    assert int8.weight_bytes < base.weight_bytes
    assert int8.heldout_ppl == pytest.approx(base.heldout_ppl, rel=0.05)  # int8: a small change
    assert int8.stats and all(key.startswith("quantize_weights.") for key in int8.stats)


def test_quality_calibrates_on_the_given_text(tiny_chat_dir):
    from fusegen.models import load_tokenizer
    from fusegen.quality import measure

    text = "The quick brown fox jumps over the lazy dog. " * 40
    result = measure(str(tiny_chat_dir), ["preset=stateless,weights=int4"], length=64, calibration=text)
    assert result.calibration_tokens <= len(load_tokenizer(str(tiny_chat_dir))(text).input_ids)
    stats = result.rows[1].stats
    assert stats["quantize_weights.awq_linears"] == stats["quantize_weights.linears_quantized"] > 0


# --- distillation after the conversion (passes/gqa_distill.py) ---------------------------------

from fusegen.passes import gqa_distill  # noqa: E402


def _distilled(stateless, ids, steps: int, method: str = "lsq", target: int = 1):
    gm = _copy(stateless.graph_module)
    config = CompileConfig.preset("stateless").replace(gqa_kv_heads=target, gqa_method=method,
                                                       gqa_refit_steps=20, gqa_distill_steps=steps)
    return convert_mha_to_gqa(gm, PassContext(config=config, calibration_ids=ids))


def test_the_differentiable_graph_computes_the_graphs_logits(stateless, calibration_ids):
    """The interpreter autograd runs through (references for fusegen's ops) gives the
    graph's own logits, so what distillation differentiates is what the graph computes."""
    gm = stateless.graph_module
    args = gqa_distill.graph_args(calibration_ids)
    assert_close_report(gqa_distill._Differentiable(gm).run(*args), gm(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lsq", "refit"])
def test_distillation_brings_the_converted_logits_closer_and_moves_only_attention(stateless, method,
                                                                                 monkeypatch):
    """KL to the original logits falls over the calibration windows; only the q/k/v/o
    tensors differ from the same conversion without distillation, and the KV heads stay
    merged. (A random-weight model's KL is small: a larger step shows the fall in 30 steps.)"""
    monkeypatch.setattr(gqa_distill, "LEARNING_RATE", 1e-3)
    ids = torch.randint(0, VOCAB, (4, 32), generator=_gen(11))
    plain, distilled = _distilled(stateless, ids, 0, method), _distilled(stateless, ids, 30, method)
    stats = distilled.stats
    assert stats["distill_steps"] == 30 and stats["distill_tensors"] == 4 * LAYERS
    assert stats["distill_kl_after"] < 0.8 * stats["distill_kl_before"], stats
    assert "distill_steps" not in plain.stats and stats["kv_heads_after"] == 1
    sites = call_nodes(distilled.gm, ops.attention.default)
    moved = {id(t) for t in gqa_distill.attention_weights(distilled.gm, sites)}
    before = dict(plain.gm.named_buffers()) | dict(plain.gm.named_parameters())
    changed = [name for name, t in list(distilled.gm.named_buffers()) + list(distilled.gm.named_parameters())
               if not torch.equal(t, before[name])]
    assert changed and all(id(getattr_path(distilled.gm, name)) in moved for name in changed)
    assert all(t.grad is None for t in distilled.gm.parameters())
    args = gqa_distill.graph_args(ids)
    assert distilled.gm(*args).shape == plain.gm(*args).shape


def test_distillation_is_deterministic(stateless):
    ids = torch.randint(0, VOCAB, (4, 32), generator=_gen(12))
    a, b = (_distilled(stateless, ids, 5).gm for _ in range(2))
    args = gqa_distill.graph_args(ids)
    assert torch.equal(a(*args), b(*args))


def test_negative_distillation_steps_are_refused():
    with pytest.raises(fusegen.ConfigError, match="gqa_distill_steps must be >= 0"):
        CompileConfig.from_string("gqa_kv_heads=1,gqa_distill_steps=-1")
