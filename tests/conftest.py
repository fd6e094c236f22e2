"""Shared fixtures.

- ``fusegen_cache`` (session, autouse): the converted bundled model lives in one cache per
  test session. ``FUSEGEN_CACHE`` is pointed under pytest's basetemp unless it is already
  set (set it yourself to keep the conversion, about half a minute, across sessions).
- ``tiny_llama_dir``: a saved random-weight LlamaForCausalLM (config.json + safetensors, no
  tokenizer), small enough that capturing it takes a few seconds.
- ``tiny_t5_dir``: a saved random-weight T5 (encoder-decoder, which fusegen refuses).
"""

import os
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's interpreter (set before triton is imported).
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def fusegen_cache(tmp_path_factory):
    if os.environ.get("FUSEGEN_CACHE"):
        yield Path(os.environ["FUSEGEN_CACHE"])
        return
    path = tmp_path_factory.getbasetemp() / "fusegen-cache"
    os.environ["FUSEGEN_CACHE"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("FUSEGEN_CACHE", None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,  # 32000
        hidden_size=64,  # 4096
        intermediate_size=128,  # 11008
        num_hidden_layers=2,  # 32
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 32 (Llama-2-7B), 8 (Llama-3.2-1B)
        max_position_embeddings=128,  # 4096
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64,  # 32128
        d_model=32,  # 512
        d_kv=16,  # 64
        d_ff=64,  # 2048
        num_layers=1,  # 6
        num_heads=2,  # 8
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path
