"""Mini configs of the supported HF families (real sizes in comments) and HF references."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 128


def mini_model(family: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,           # 32000 (Llama-2), 151936 (Qwen2), 50257 (GPT-2)
        attn_implementation=attn,
    )
    if family == "gpt2":
        config = GPT2Config(n_embd=64,      # 768
                            n_layer=2,      # 12
                            n_head=4,       # 12
                            n_positions=256,  # 1024
                            **common)
        return GPT2LMHeadModel(config).eval()
    llama_like = dict(hidden_size=64,            # 4096
                      intermediate_size=128,     # 11008 / 14336 (Mistral)
                      num_hidden_layers=2,       # 32
                      num_attention_heads=4,     # 32
                      num_key_value_heads=2,     # 8 (GQA); 32 for Llama-2-7B
                      max_position_embeddings=256,  # 4096 / 32768
                      **common)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**llama_like)).eval()
    if family == "mistral":
        # sliding_window 4096 in Mistral-7B; 5 here so that it is shorter than the sequences
        return MistralForCausalLM(MistralConfig(sliding_window=5, **llama_like)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**llama_like)).eval()
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def left_padded(batch_lengths, width, seed=0):
    """input_ids [B, width] and attention_mask with each row left-padded to ``width``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(batch_lengths), width), generator=g)
    mask = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    for b, n in enumerate(batch_lengths):
        mask[b, width - n:] = 1
    ids[mask == 0] = 0
    return ids, mask
