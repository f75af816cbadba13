"""Llama-style decoders: Llama, Mistral, Qwen2/3, Gemma 1-3, SmolLM, OLMo (pre-norm, GQA, gated MLP)."""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo", "olmo2"),
    blocks="model.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
)
