"""Pruned-model artifacts: the Hugging Face layout (or, for other networks, safetensors and module geometry) plus
the `prunekit.json` record, written atomically.

`prunekit.artifacts.files` (path safety, safetensors checks) is standard library only; the savers and loaders of
`prunekit.artifacts.io` import torch and transformers, so they are loaded on first use.
"""

from prunekit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    "prunekit.artifacts",
    {"prunekit.artifacts.io": "MANIFEST atomic_directory load_masks load_pruned save_masks save_pruned",
     "prunekit.artifacts.modules": "load_module save_module"})
