"""Shared fixtures.

- ``fusegen_cache`` (session, autouse): the converted bundled model lives in one cache per
  test session. ``FUSEGEN_CACHE`` is pointed under pytest's basetemp unless it is already
  set (set it yourself to keep the conversion, about half a minute, across sessions).
- ``tiny_llama_dir``: a saved random-weight LlamaForCausalLM (config.json + safetensors, no
  tokenizer), small enough that capturing it takes a few seconds.
- ``tiny_t5_dir``: a saved random-weight T5 (encoder-decoder, which fusegen refuses).
- ``tiny_chat_dir``: a random-weight Llama with a byte-level tokenizer and a ChatML chat
  template, the shape of the bundled model at a size that compiles in seconds (for the CLI's
  text commands and the examples).
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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer():
    """Byte-level BPE with no merges: one token per UTF-8 byte (ids 0-255), then the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 49152 (SmolLM2)
        hidden_size=64,  # 576
        intermediate_size=128,  # 1536
        num_hidden_layers=2,  # 30
        num_attention_heads=4,  # 9
        num_key_value_heads=2,  # 3
        max_position_embeddings=512,  # 8192
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # 0.02: larger weights make greedy output depend on the prompt
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
