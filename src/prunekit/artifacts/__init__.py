"""Pruned-model artifacts: the Hugging Face layout plus the `prunekit.json` record, written atomically.

`prunekit.artifacts.files` (path safety, safetensors checks) is standard library only; the savers and loaders of
`prunekit.artifacts.io` import torch and transformers, so they are loaded on first use.
"""

_IO = ("MANIFEST", "atomic_directory", "load_pruned", "save_pruned")

__all__ = list(_IO)


def __getattr__(name: str):
    if name in _IO:
        from prunekit.artifacts import io

        return getattr(io, name)
    raise AttributeError(f"module 'prunekit.artifacts' has no attribute '{name}'")
