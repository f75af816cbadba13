"""Token pruning and merging at inference: fewer tokens through a transformer's blocks.

`apply(model, method="tome", r=8)` installs ToMe, Zero-TPrune, CLS-attention pruning or random dropping on one
BERT-style encoder (or prunekit ViT) instance and returns a `TokenHandle`; `apply(model, method="fastv", layer=2,
keep=0.5)` prunes the prompt of a decoder LLM (`prunekit.tokens.fastv`). `handle.remove()` restores the model exactly.
`parse_token_spec` and `evaluate_tokens` (`prunekit.tokens.evaluate`) serve `prunekit eval --tokens SPEC`. The kernels
(matching, size-weighted merging, compaction) are pure functions in `prunekit.tokens.merge`.
"""

from prunekit.tokens.evaluate import evaluate_tokens, parse_token_spec
from prunekit.tokens.fastv import DECODER_METHODS, DecoderTokenHandle
from prunekit.tokens.install import ENCODER_METHODS, METHODS, TokenHandle, apply, check_options

__all__ = ["DECODER_METHODS", "DecoderTokenHandle", "ENCODER_METHODS", "METHODS", "TokenHandle", "apply",
           "check_options", "evaluate_tokens", "parse_token_spec"]
