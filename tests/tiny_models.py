"""Tiny randomly initialised causal LMs of every supported family, for fast tests."""

import torch
import transformers

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "opt", "gpt2", "gpt_neox", "phi"]


def tiny_causal_lm(family: str = "llama", *, vocab: int = 128, layers: int = 3, seed: int = 0,
                   tie: bool = False) -> transformers.PreTrainedModel:
    """A 64-wide model of `family` in eval mode; equal arguments give equal weights."""
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                  tie_word_embeddings=tie)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2),
        "mistral": lambda: transformers.MistralConfig(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen2": lambda: transformers.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2),
        "gemma": lambda: transformers.GemmaConfig(**common, intermediate_size=128, num_key_value_heads=1,
                                                  head_dim=16),
        "opt": lambda: transformers.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64,
                                              max_position_embeddings=64),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab, n_layer=layers, n_head=4, n_embd=64, n_positions=64,
                                                tie_word_embeddings=tie),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, intermediate_size=128),
        "phi": lambda: transformers.PhiConfig(**common, intermediate_size=128),
    }
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()
