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
