"""Token pruning and merging at inference: fewer tokens through a transformer's blocks.

`apply(model, method="tome", r=8)` installs ToMe, CLS-attention pruning or random dropping on one BERT-style
encoder instance and returns a `TokenHandle`; `handle.remove()` restores the model exactly. The kernels
(matching, size-weighted merging, compaction) are pure functions in `prunekit.tokens.merge`.
"""

from prunekit.tokens.install import METHODS, TokenHandle, apply

__all__ = ["METHODS", "TokenHandle", "apply"]
