"""Llama-style decoders: Llama, Mistral, Qwen2/3, Gemma 1-3, SmolLM, OLMo (pre-norm, GQA, gated MLP).

They share blocks and projections and differ in their norms: Gemma 2 and 3 also normalise the output of attention
and of the MLP, OLMo 2 normalises only outputs, and Qwen 3, Gemma 3 and OLMo 2 normalise queries and keys.
"""

from dataclasses import replace

from prunekit.adapters.base import Adapter

LLAMA = Adapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "gemma", "smollm3", "olmo"),
    blocks="model.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    intermediate="intermediate_size",
    # Llama and SmolLM3 honour both flags, Gemma, Qwen3 and OLMo only attention_bias, Mistral and Qwen2 neither;
    # each config class has exactly the attributes its model honours.
    bias_flags=(("attention", "attention_bias"), ("mlp", "mlp_bias")),
)
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
QWEN3 = replace(LLAMA, family="qwen3", model_types=("qwen3",), norms=LLAMA.norms + QK_NORMS)
GEMMA2 = replace(LLAMA, family="gemma2", model_types=("gemma2",),
                 norms=LLAMA.norms + ("pre_feedforward_layernorm", "post_feedforward_layernorm"))
GEMMA3 = replace(GEMMA2, family="gemma3", model_types=("gemma3_text",), norms=GEMMA2.norms + QK_NORMS)
OLMO2 = replace(LLAMA, family="olmo2", model_types=("olmo2",),
                norms=("post_attention_layernorm", "post_feedforward_layernorm") + QK_NORMS)

ADAPTERS = (LLAMA, QWEN3, GEMMA2, GEMMA3, OLMO2)
