"""Pruned-model artifacts: the Hugging Face layout plus the `prunekit.json` record, written atomically."""

from prunekit.artifacts.io import MANIFEST, atomic_directory, load_pruned, save_pruned

__all__ = ["MANIFEST", "atomic_directory", "load_pruned", "save_pruned"]
