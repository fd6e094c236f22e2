"""Capture by layer (fusegen/capture_layers.py): the first decoder layers exported, the rest
stamped from them. The whole-model capture is the oracle: the stamped graph prints the same
code, the compiled models give the same logits and counters, and every pass's dump has the
same graph."""

import importlib
from pathlib import Path

import pytest
import torch
import transformers as hf
from torch import nn

import fusegen
from fusegen.capture_layers import LayerStack, find_layer_stack

VOCAB = 128
LAYERS = 5     # 16 .. 42 in the real models: enough to stamp 2 or 3 of them here


def _llama_like(**overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256) | overrides


MODELS = {
    "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**_llama_like())),
    "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(**_llama_like(sliding_window=5))),
    "qwen2": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**_llama_like())),
    "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                                                     n_positions=256)),
    # two layer kinds, not alternating: full attention in the first max_window_layers, then
    # sliding windows (Qwen2's use_sliding_window; window 5 here)
    "qwen2_sliding": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**_llama_like(
        use_sliding_window=True, sliding_window=5, max_window_layers=2))),
    # two layer kinds: sliding-window (window 5; 4096 in Gemma-2-9B) and global, alternating
    "gemma2": lambda: hf.Gemma2ForCausalLM(hf.Gemma2Config(**_llama_like(
        head_dim=16, sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))),
}
EXPECTED = {  # (layers exported, layers stamped, kinds)
    "llama": (2, 3, 1), "mistral": (2, 3, 1), "qwen2": (2, 3, 1), "gpt2": (2, 3, 1), "qwen2_sliding": (3, 2, 2),
    "gemma2": (3, 2, 2),
}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[family]().eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("family", list(MODELS))
def test_stamped_capture_prints_the_whole_models_graph(family):
    model = _model(family)
    stamped = fusegen.capture(model)
    whole = fusegen.capture(model, by_layer=False)
    exported, stamped_layers, kinds = EXPECTED[family]
    assert stamped.meta["fusegen_capture"] == {"layers_exported": exported, "layers_stamped": stamped_layers,
                                               "layer_kinds": kinds}
    assert whole.meta["fusegen_capture"]["layers_stamped"] == 0
    assert stamped.code == whole.code
    stacks = [[n.meta.get("nn_module_stack") for n in gm.graph.nodes] for gm in (stamped, whole)]
    assert stacks[0] == stacks[1]   # each stamped node names its own layer's modules
    assert dict(stamped.named_parameters()).keys() == dict(whole.named_parameters()).keys()
    ids, mask = _inputs()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(stamped(ids, mask, pos), whole(ids, mask, pos), rtol=0, atol=0)
    # the model is as it was: all its layers, its config
    assert len(find_layer_stack(model).layers) == LAYERS and model.config.num_hidden_layers == LAYERS


def _graph_bodies(directory: Path) -> dict[str, str]:
    """Each pass dump without its header (which has the seconds and the capture's counts)."""
    return {p.name: p.read_text().split("\n\n", 1)[1] for p in sorted(directory.glob("[0-9][0-9]_*.py"))}


@pytest.mark.parametrize("family", list(MODELS))
def test_stamped_compile_equals_the_whole_model_compile(family, tmp_path):
    model = _model(family)
    stamped = fusegen.compile(model, dump_dir=tmp_path / "stamped")
    whole = fusegen.compile(model, "capture_by_layer=0", dump_dir=tmp_path / "whole")
    ids, mask = _inputs()
    torch.testing.assert_close(stamped(ids, attention_mask=mask), whole(ids, attention_mask=mask), rtol=0, atol=0)
    counters = {k: v for k, v in stamped.report.counters.items() if not k.startswith("capture.")}
    assert counters == {k: v for k, v in whole.report.counters.items() if not k.startswith("capture.")}
    assert stamped.report.counters["capture.layers_stamped"] == EXPECTED[family][1]
    if family == "qwen2_sliding":   # the stamped layers 3 and 4 keep their template's window
        assert stamped.report.counters["fuse_attention.sliding_window"] == 3
    assert _graph_bodies(tmp_path / "stamped") == _graph_bodies(tmp_path / "whole")
    assert len(_graph_bodies(tmp_path / "whole")) == len(stamped.report.records)
    torch.testing.assert_close(stamped.generate(ids[:1], max_new_tokens=6), whole.generate(ids[:1], max_new_tokens=6))


@pytest.mark.parametrize("kinds, length", [
    ((0, 0, 0), 2),
    ((0, 0, 0, 0, 0), 2),
    ((0, 1, 0, 1, 0, 1), 3),
    ((0, 0, 1, 1), 3),
    ((0, 1, 1, 1), None),     # kind 0 only at index 0: no template reads a previous layer
    ((0, 0), None),           # everything is exported anyway
    ((0, 1, 2), None),
])
def test_export_length_gives_every_kind_a_template(kinds, length):
    stack = LayerStack(nn.Module(), "layers", "layers", kinds)
    assert stack.export_length() == length
    if length is not None:
        for layer in range(length, len(kinds)):
            template = stack.template(layer, length)
            assert 1 <= template < length and kinds[template] == kinds[layer]


class _Block(nn.Module):
    def __init__(self, width: int, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * torch.tanh(self.proj(x))


class _SkipDecoder(nn.Module):
    """Each layer also reads the input of the layer before (a skip over one layer), which a
    stamped chain cannot express: the whole model is exported."""

    def __init__(self, vocab=VOCAB, width=32, layers=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        h = prev = self.embed(input_ids)
        for block in self.blocks:
            h, prev = block(h) + 0.5 * prev, h
        return self.head(h)


class _PlainDecoder(_SkipDecoder):
    """The same without the skip; its blocks differ in a plain attribute at layer 3."""

    def __init__(self):
        super().__init__()
        self.blocks[3].scale = 0.5

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_a_layer_that_reads_two_layers_back_is_exported_whole():
    torch.manual_seed(0)
    model = _SkipDecoder().eval()
    gm = fusegen.capture(model)
    assert gm.meta["fusegen_capture"]["layers_stamped"] == 0
    assert "reads" in gm.meta["fusegen_capture"]["whole_model"]
    ids = torch.randint(0, VOCAB, (2, 7))
    mask, pos = torch.ones_like(ids), torch.arange(7).expand(2, 7)
    torch.testing.assert_close(gm(ids, mask, pos), model(ids), rtol=1e-5, atol=1e-5)


def test_a_layer_with_another_attribute_is_its_own_kind():
    torch.manual_seed(0)
    model = _PlainDecoder().eval()
    stack = find_layer_stack(model)
    assert stack.kinds == (0, 0, 0, 1, 0)
    # kind 1 appears only at index 3, so the first 4 layers are exported and 1 is stamped
    gm = fusegen.capture(model)
    assert gm.meta["fusegen_capture"] == {"layers_exported": 4, "layers_stamped": 1, "layer_kinds": 2}
    ids = torch.randint(0, VOCAB, (2, 7))
    mask, pos = torch.ones_like(ids), torch.arange(7).expand(2, 7)
    torch.testing.assert_close(gm(ids, mask, pos), model(ids), rtol=1e-5, atol=1e-5)
    assert gm.code == fusegen.capture(model, by_layer=False).code


class _LengthBlock(_Block):
    def forward(self, x):
        return super().forward(x * 2 if x.shape[1] == 8 else x)   # a capture fixes the length


class _LengthSpecificDecoder(_PlainDecoder):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_LengthBlock(32) for _ in range(5))


class _ExportOnlyBlock(_Block):
    def forward(self, x):   # differs from eager only while exporting (as tracing-only branches can)
        return super().forward(x) + (1.0 if torch.compiler.is_exporting() else 0.0)


class _ExportOnlyDecoder(_PlainDecoder):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_ExportOnlyBlock(32) for _ in range(5))


@pytest.mark.parametrize("model, message", [
    (_LengthSpecificDecoder, "the capture fixed the sequence length"),
    (_ExportOnlyDecoder, "captured graph disagrees with eager forward"),
])
def test_what_the_cut_model_fails_is_refused_without_exporting_it_whole(model, message, monkeypatch):
    capture_module = importlib.import_module("fusegen.capture")   # fusegen.capture is the function
    exports = []
    real = capture_module._export_graph
    monkeypatch.setattr(capture_module, "_export_graph", lambda *a: exports.append(1) or real(*a))
    with pytest.raises(fusegen.UnsupportedModelError, match=message):
        fusegen.capture(model().eval())
    assert len(exports) == 1   # the whole model runs the same code: it is not traced again
