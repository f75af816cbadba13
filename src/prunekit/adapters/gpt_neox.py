"""GPT-NeoX and Pythia: fused `query_key_value`, parallel attention and MLP residuals."""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attention=("attention.query_key_value", "attention.dense"),
    mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    norms=("input_layernorm", "post_attention_layernorm"),
    kv_heads=None,
)
