"""BERT-style encoders (BertModel, BertForMaskedLM, sentence-transformers' all-MiniLM-L6-v2): post-norm blocks,
separate q/k/v projections with biases, a GELU MLP intermediate.dense/output.dense, no grouped-query attention.

BERT's attention builds its head width as hidden_size // num_attention_heads from the config, so a config cannot
state fewer heads of the same width: blocks with heads removed reload through the manifest's per-block widths.
"""

from prunekit.adapters.base import Adapter

ADAPTER = Adapter(
    family="bert",
    model_types=("bert",),
    blocks="bert.encoder.layer",
    attention=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    mlp=("intermediate.dense", "output.dense"),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    kv_heads=None,
    shared_inputs=(("attention.self.query", "attention.self.key", "attention.self.value"),),
    intermediate="intermediate_size",
    head_dim_in_config=False,
    causal=False,
)
