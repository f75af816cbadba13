"""GPT-2: fused q/k/v in `c_attn`, weights stored as Conv1D ([in, out]); the projection helpers transpose."""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    attention=("attn.c_attn", "attn.c_proj"),
    mlp=("mlp.c_fc", "mlp.c_proj"),
    norms=("ln_1", "ln_2"),
    heads="n_head",
    kv_heads=None,
)
