"""OPT decoders (Meta): separate q/k/v projections, ReLU MLP fc1/fc2, learned positions."""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    mlp=("fc1", "fc2"),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    kv_heads=None,
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
)
