"""Tiny randomly initialised causal LMs of every supported family, for fast tests.

Families that mix layer types get them here too, with windows shorter than the test sequences, so that a block
replayed with another block's arguments gives a different result: Gemma 2 alternates sliding and full attention,
Gemma 3 has one full-attention layer in six with its own (global) rotary embedding, Qwen2/Qwen3 slide from layer 2
on, SmolLM3 drops the rotary embedding (and slides) on every fourth layer, Mistral slides everywhere.
"""

import torch
import transformers

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo", "olmo2",
            "opt", "gpt2", "gpt_neox", "phi"]

WINDOW = 8  # sliding window, in tokens: tests that need windowed layers to matter use longer sequences


def tiny_causal_lm(family: str = "llama", *, vocab: int = 128, layers: int = 3, seed: int = 0,
                   tie: bool = False) -> transformers.PreTrainedModel:
    """A 64-wide model of `family` in eval mode; equal arguments give equal weights."""
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                  tie_word_embeddings=tie)
    gqa = dict(common, intermediate_size=128, num_key_value_heads=2)
    sliding = dict(use_sliding_window=True, sliding_window=WINDOW)
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the defaults lie outside a tiny vocabulary
    configs = {
        "llama": lambda: transformers.LlamaConfig(**gqa),
        "mistral": lambda: transformers.MistralConfig(**gqa, sliding_window=WINDOW),
        "qwen2": lambda: transformers.Qwen2Config(**gqa, **sliding, max_window_layers=2),
        "qwen3": lambda: transformers.Qwen3Config(**gqa, **sliding, max_window_layers=2, head_dim=16),
        "gemma": lambda: transformers.GemmaConfig(**dict(gqa, num_key_value_heads=1), head_dim=16),
        "gemma2": lambda: transformers.Gemma2Config(**gqa, head_dim=16, sliding_window=WINDOW),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=WINDOW),
        "smollm3": lambda: transformers.SmolLM3Config(**gqa, **sliding, **tokens),
        "olmo": lambda: transformers.OlmoConfig(**gqa, **tokens),
        "olmo2": lambda: transformers.Olmo2Config(**gqa, **tokens),
        "opt": lambda: transformers.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64,
                                              max_position_embeddings=64),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab, n_layer=layers, n_head=4, n_embd=64, n_positions=64,
                                                tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, intermediate_size=128),
        "phi": lambda: transformers.PhiConfig(**common, intermediate_size=128),
    }
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_moe_lm(family: str = "mixtral", *, experts: int = 6, top_k: int = 2, layers: int = 2, vocab: int = 128,
                seed: int = 0, norm_topk_prob: bool = False, **overrides) -> transformers.PreTrainedModel:
    """A 32-wide mixture-of-experts model of `family` in eval mode, `experts` experts of width 16 routing `top_k`
    per token; equal arguments give equal weights. Qwen2-MoE also has its gated shared expert. `norm_topk_prob`
    (Qwen-MoE, OLMoE; Mixtral always renormalises) makes the top-k gate weights sum to one. `overrides` are further
    config fields (Qwen's `mlp_only_layers`, say)."""
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  **overrides)
    qwen = dict(common, num_experts=experts, moe_intermediate_size=16, intermediate_size=48,
                norm_topk_prob=norm_topk_prob)
    configs = {
        "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=experts, intermediate_size=16),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=24),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**qwen, head_dim=8),
        "olmoe": lambda: transformers.OlmoeConfig(**common, num_experts=experts, intermediate_size=16,
                                                  norm_topk_prob=norm_topk_prob),
    }
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


def tiny_bert(cls=transformers.BertModel, *, layers: int = 3, vocab: int = 128, seed: int = 0):
    """A 64-wide BERT encoder with 4 heads of 16 and 128 FFN neurons, in eval mode; equal arguments give equal
    weights. Every call builds its own config, which pruning rewrites."""
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # BERT initialises biases to zero: random ones make bias handling matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model
