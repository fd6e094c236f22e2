"""Weight-only quantization: the formats (fusegen/quant.py) on odd shapes, and the
quantize_weights pass end to end on CPU in fp32: counters, logits equal to the model with
dequantized linear weights (its exact reference) within 1e-4, greedy tokens identical
through the engine, the artifact round trip, and bad settings refused."""

import pytest
import torch

import fusegen
from families import mini_model
from fusegen.errors import ConfigError
from fusegen.quant import GROUP, dequantize, dequantized_linears, quantize, stored_bytes
from helpers import assert_close_report

FORMATS = ("int8", "fp8", "int4")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[3] = 0.0                       # an all-zero row keeps a positive scale
    w[5, 7] = 40.0                   # an outlier sets its row's (or group's) scale
    return w


@pytest.mark.parametrize("n, k", [(37, 256), (9, 384), (64, 128)])
def test_int8_and_int4_round_to_the_nearest_step(n, k):
    w = _weight(n, k)
    for fmt, levels in (("int8", 127), ("int4", 7)):
        data, scale = quantize(w, fmt)
        back = dequantize(data, scale, fmt, torch.float32)
        assert back.shape == w.shape and not back.isnan().any()
        step = scale if fmt == "int8" else scale.repeat_interleave(GROUP, dim=1)
        assert ((back - w).abs() <= step / 2 + 1e-6).all(), fmt
        assert torch.equal(back[3], torch.zeros(k))
        # the outlier is represented exactly at the top level
        assert back[5, 7] == pytest.approx(40.0, rel=1e-6)
        assert step.min() > 0 and levels * step[5].max() == pytest.approx(40.0, rel=1e-6)


def test_int4_packs_two_values_per_byte_and_fp8_keeps_relative_precision():
    w = _weight(11, 256)
    data, scale = quantize(w, "int4")
    assert data.dtype == torch.uint8 and data.shape == (11, 128) and scale.shape == (11, 256 // GROUP)
    assert stored_bytes(data, scale) == 11 * 128 + 11 * 2 * 4
    data, scale = quantize(w, "fp8")
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (11, 1)
    back = dequantize(data, scale, "fp8", torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above its subnormal range
    big = w.abs() > scale * 2 ** -6
    assert ((back - w).abs()[big] <= w.abs()[big] * 2 ** -4 + 1e-7).all()


def test_formats_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize(torch.randn(4, 100), "int4")
    with pytest.raises(ValueError, match="weight format"):
        quantize(torch.randn(4, 128), "int3")
    with pytest.raises(ConfigError, match="weights must be one of"):
        fusegen.CompileConfig.from_string("weights=int3")


@pytest.fixture(scope="module")
def int4_model():
    """A Llama-like mini model whose projections all have K divisible by 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def _reference_logits(model, ids, fmt, lm_head=False):
    with dequantized_linears(model, fmt, lm_head), torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_graph_computes_the_dequantized_model(int4_model, fmt):
    model = int4_model
    layers = model.config.num_hidden_layers
    compiled = fusegen.compile(model, f"weights={fmt}")
    counters = compiled.report.counters
    # per layer: fused q/k/v, o, fused gate/up, down; the LM head kept
    assert counters["quantize_weights.linears_quantized"] == 4 * layers
    assert counters["quantize_weights.lm_head_kept"] == 1
    before, after = counters["quantize_weights.weight_bytes_before"], counters["quantize_weights.weight_bytes_after"]
    assert after < before * (0.3 if fmt != "int4" else 0.15)
    quantized = [n for n in compiled.graph_module.graph.nodes
                 if n.target is torch.ops.fusegen.quantized_linear.default]
    assert len(quantized) == 4 * layers and all(n.args[4] == fmt for n in quantized)

    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    want = _reference_logits(model, ids, fmt)
    assert_close_report(compiled(ids), want, atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = model(ids).logits
    assert (compiled(ids) - plain).abs().max() > 1e-4      # it is quantized: not the model itself

    prompt = ids[0, :6].tolist()
    engine = compiled.engine(num_blocks=16)
    tokens = engine.generate_batch([prompt], 10, eos_token_ids=[])[0]
    with dequantized_linears(model, fmt, False), torch.no_grad():
        hf = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 6:].tolist()
    assert tokens == hf


def test_lm_head_on_request_and_the_model_left_alone(int4_model):
    model = int4_model
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    compiled = fusegen.compile(model, "weights=int8,quantize_lm_head=1")
    counters = compiled.report.counters
    assert counters["quantize_weights.linears_quantized"] == 4 * model.config.num_hidden_layers + 1
    assert "quantize_weights.lm_head_kept" not in counters
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    assert_close_report(compiled(ids), _reference_logits(model, ids, "int8", lm_head=True), atol=1e-4, rtol=0)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_int4_leaves_linears_whose_width_is_not_a_multiple_of_the_group():
    model = mini_model("llama")          # hidden 64: q/k/v, o and gate/up have K = 64
    compiled = fusegen.compile(model, "weights=int4")
    counters = compiled.report.counters
    layers = model.config.num_hidden_layers
    assert counters["quantize_weights.linears_skipped_group"] == 3 * layers
    assert counters["quantize_weights.linears_quantized"] == layers          # down: K = 128
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    assert_close_report(compiled(ids), _reference_logits(model, ids, "int4"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_artifact_round_trip(int4_model, fmt, tmp_path):
    compiled = fusegen.compile(int4_model, f"weights={fmt}")
    compiled.save(tmp_path / "artifact")
    loaded = fusegen.load(tmp_path / "artifact")
    stored = {n.args[1].target: n for n in loaded.graph_module.graph.nodes
              if n.target is torch.ops.fusegen.quantized_linear.default}
    assert len(stored) == 4 * int4_model.config.num_hidden_layers
    for target in stored:
        data = loaded.graph_module.get_buffer(target)
        assert data.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.uint8)
        assert torch.equal(data.view(torch.uint8), compiled.graph_module.get_buffer(target).view(torch.uint8))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded(ids), compiled(ids))


def test_int4_packing_round_trips_exactly():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, 0.0] * 16])   # one group, scale 1
    data, scale = quantize(w, "int4")
    assert scale.tolist() == [[1.0]]
    assert data[0, :4].tolist() == [(1 + 8) | (-2 + 8) << 4, (3 + 8) | (-4 + 8) << 4,
                                     (5 + 8) | (-6 + 8) << 4, (7 + 8) | (0 + 8) << 4]
    assert torch.equal(dequantize(data, scale, "int4", torch.float32), w)
    for fmt in FORMATS:   # what dequantize gives back is stored as the same codes
        data, scale = quantize(_weight(9, 256), fmt)
        again = quantize(dequantize(data, scale, fmt, torch.float32), fmt)
        assert torch.equal(again[0].view(torch.uint8), data.view(torch.uint8)), fmt
        torch.testing.assert_close(again[1], scale, rtol=1e-6, atol=0)


# --- AWQ ------------------------------------------------------------------------------------------

def _outlier_inputs(T: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, :4] *= 30.0          # a few input channels carry most of the activation
    return x


def test_awq_search_protects_the_salient_channels():
    from fusegen.quant import awq_search

    x, w = _outlier_inputs(256, 256), torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    fit = awq_search(w, x)
    assert fit.scale.shape == (256,) and fit.alpha > 0
    assert fit.error < 0.7 * fit.plain_error
    assert fit.scale[:4].min() > fit.scale[4:].max()   # the outlier channels are scaled up
    assert awq_search(w, x, grid=0).alpha == 0.0 and awq_search(w, x, grid=0).error == fit.plain_error


@pytest.fixture(scope="module")
def outlier_model():
    """The int4 mini model with outlier channels: a few hidden channels of every norm's weight
    scaled up, as in real LLMs' activations."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128,   # 4096
                                         intermediate_size=256,             # 11008
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 25.0
            layer.post_attention_layernorm.weight[5:8] = 25.0
    return model


CALIBRATION = torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(7))
HELDOUT = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(8))


def _coarse_grid(monkeypatch):
    """alpha searched in steps of 0.2 (not 0.05): the same code, a quarter of the CPU time."""
    import functools

    from fusegen.passes import quantize_weights
    from fusegen.quant import awq_search

    monkeypatch.setattr(quantize_weights, "awq_search", functools.partial(awq_search, grid=5))


@pytest.fixture(scope="module")
def awq_compiled(outlier_model):
    """int4 with AWQ (the compile-time check passed) and without."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _coarse_grid(monkeypatch)
        return (fusegen.compile(outlier_model, "weights=int4", calibration_ids=CALIBRATION),
                fusegen.compile(outlier_model, "weights=int4,int4_awq=0", calibration_ids=CALIBRATION))


def test_awq_lowers_the_output_error_of_int4(outlier_model, awq_compiled):
    model = outlier_model
    layers = model.config.num_hidden_layers
    awq, plain = awq_compiled
    counters = awq.report.counters
    assert counters["quantize_weights.awq_linears"] == 4 * layers
    assert counters["quantize_weights.awq_folded"] == 2 * layers        # q/k/v and gate/up: into the norm
    assert counters["quantize_weights.awq_act_scales"] == 2 * layers    # o and down: applied by the linear
    assert counters["quantize_weights.awq_output_error"] < counters["quantize_weights.plain_output_error"]
    assert "quantize_weights.awq_linears" not in plain.report.counters
    act = [n for n in awq.graph_module.graph.nodes
           if n.target is torch.ops.fusegen.quantized_linear.default and len(n.args) > 5]
    assert len(act) == 2 * layers
    with torch.no_grad():
        want = model(HELDOUT).logits
    err_awq = (awq(HELDOUT) - want).pow(2).mean().item()
    err_plain = (plain(HELDOUT) - want).pow(2).mean().item()
    assert err_awq < 0.8 * err_plain, (err_awq, err_plain)


def test_awq_graph_computes_its_effective_weights(outlier_model, monkeypatch):
    """The AWQ graph against the model with each linear's weight replaced by
    effective_weight(Q(W / r), r) for the r the pass chose: the exact reference, 1e-4."""
    from fusegen.capture import capture
    from fusegen.compiler import _model_facts
    from fusegen.passes.infra import PassContext
    from fusegen.passes.pipeline import run_pipeline

    model = outlier_model
    _coarse_grid(monkeypatch)
    config = fusegen.CompileConfig.from_string("preset=stateless,weights=int4,fuse_pointwise=0")
    ctx = PassContext(config=config, calibration_ids=CALIBRATION, facts=_model_facts(model))
    gm, _ = run_pipeline(capture(model), ctx)
    assert len(ctx.reference_changes) == 7 * model.config.num_hidden_layers   # q, k, v, o, gate, up, down
    B, S = HELDOUT.shape
    got = gm(HELDOUT, torch.ones_like(HELDOUT), torch.arange(S).expand(B, S))
    got = got[0] if isinstance(got, (tuple, list)) else got
    with dequantized_linears(model, "int4", False, act_scales=ctx.reference_changes), torch.no_grad():
        want = model(HELDOUT).logits
    assert_close_report(got, want, atol=1e-4, rtol=0)
    assert (got - _reference_logits(model, HELDOUT, "int4")).abs().max() > 1e-3   # not plain int4


def test_awq_artifact_round_trip(outlier_model, awq_compiled, tmp_path):
    compiled = awq_compiled[0]
    compiled.save(tmp_path / "artifact")
    loaded = fusegen.load(tmp_path / "artifact")
    assert torch.equal(loaded(HELDOUT), compiled(HELDOUT))
    act = [n for n in loaded.graph_module.graph.nodes
           if n.target is torch.ops.fusegen.quantized_linear.default and len(n.args) > 5]
    assert len(act) == 2 * outlier_model.config.num_hidden_layers
