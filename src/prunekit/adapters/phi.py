"""Phi-1/1.5/2 (Microsoft): parallel attention and MLP sharing one input norm, dense output projection."""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="phi",
    model_types=("phi",),
    blocks="model.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    mlp=("mlp.fc1", "mlp.fc2"),
    norms=("input_layernorm",),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),),
)
