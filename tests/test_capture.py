"""Capture + the stateless pipeline against HF eager logits (fp32, CPU, 1e-4)."""

import pytest
import torch
from torch import nn

import fusegen
from families import FAMILIES, left_padded, mini_model
from helpers import assert_close_report

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request):
    model = mini_model(request.param)
    return request.param, model, fusegen.compile(model, "stateless")


def test_one_capture_serves_several_lengths_and_batches(family_pair):
    family, model, compiled = family_pair
    counters = compiled.report.counters
    assert counters["fuse_attention.fused"] == 2, family
    for batch, seq in ((1, 1), (1, 7), (3, 19), (2, 64)):
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            want = model(ids).logits
        assert_close_report(compiled(ids), want, atol=TOL, rtol=0, msg=f"{family} B{batch} S{seq}")


def test_left_padded_batch(family_pair):
    family, model, compiled = family_pair
    ids, mask = left_padded([11, 4, 8], 11)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = compiled(ids, mask)
    real = mask.bool()
    assert_close_report(got[real], want[real], atol=TOL, rtol=0, msg=family)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_form(family):
    model = mini_model(family, attn="eager")
    compiled = fusegen.compile(model, "stateless")
    assert compiled.report.counters["fuse_attention.fused_eager"] == 2
    ids, mask = left_padded([9, 5], 9)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], want[real], atol=TOL, rtol=0)


def test_capture_leaves_the_model_as_it_was():
    model = mini_model("llama", attn="eager")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fusegen.capture(model, attn_implementation="sdpa")
    assert model.training
    assert model.config._attn_implementation == "eager"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_capture_graph_has_symbolic_batch_and_sequence():
    gm = fusegen.capture(mini_model("qwen2"))
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    batch, seq = ids.meta["val"].shape
    assert not isinstance(batch, int) and not isinstance(seq, int)


class DataDependentDecoder(nn.Module):
    """A decoder whose block branches on token values: not capturable ahead of time."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = BranchingBlock()
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        return self.head(self.block(self.embed(input_ids), input_ids))


class BranchingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x, input_ids):
        if int(input_ids.max()) > 16:     # data-dependent Python control flow
            return self.proj(x)
        return x


def test_unsupported_architecture_names_class_and_module():
    with pytest.raises(fusegen.UnsupportedModelError) as info:
        fusegen.capture(DataDependentDecoder())
    err = info.value
    assert err.model_class == "DataDependentDecoder"
    assert "DataDependentDecoder" in str(err)
    assert "'block'" in err.where and "BranchingBlock.forward" in err.where


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64,
                                                num_layers=1, num_heads=2))
    with pytest.raises(fusegen.UnsupportedModelError, match="T5ForConditionalGeneration"):
        fusegen.compile(model)


def test_bad_inputs_raise_value_errors(family_pair):
    _, _, compiled = family_pair
    with pytest.raises(ValueError, match="batch, seq"):
        compiled(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        compiled(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


class LengthSpecific(torch.nn.Module):
    """Runs at any length eagerly, but its code branches on the length, so a capture fixes it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if input_ids.shape[1] == 8:
            h = h * 2
        return self.head(h)


def test_a_model_the_capture_specialises_is_refused_with_its_class():
    from fusegen.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"LengthSpecific is not supported: the capture fixed the "
                                                    r"sequence length of input_ids to 8 "):
        fusegen.compile(LengthSpecific().eval())


class PaddingLostInExport(nn.Module):
    """Masks out padding in eager mode only: a code path taken while exporting drops the mask
    (as tracing-only branches in model code can), so only a left-padded batch shows it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None and not torch.compiler.is_exporting():
            h = h * attention_mask[..., None]
        return self.head(h.cumsum(1))   # every token sees the ones before it, padding included


def test_capture_checks_left_padded_batches_not_only_dense_ones():
    model = PaddingLostInExport().eval()
    ids = torch.randint(0, 50, (2, 6))
    gm = fusegen.capture(model, verify=False)
    dense = gm(ids, torch.ones_like(ids), torch.arange(6).expand(2, 6))
    torch.testing.assert_close(dense, model(ids, torch.ones_like(ids)))   # dense batches agree
    with pytest.raises(fusegen.UnsupportedModelError,
                       match=r"^PaddingLostInExport is not supported: captured graph disagrees with eager "
                             r"forward at batch 3, sequence 6, left-padded \(max abs error"):
        fusegen.capture(model)
