"""prunekit: prune neural networks, datasets and tokens, and measure what it did.

Score -> select under a budget and a pattern -> apply -> measure. See README.md for a tour. The public functions
live in `prunekit.api` and are re-exported here lazily, so that `import prunekit.budget` stays light.
"""

from prunekit.errors import PrunekitError

__version__ = "0.1.0"

_API = ("ALLOCATIONS", "METHODS", "evaluate", "load", "load_masks", "load_offloaded", "prune", "prune_depth",
        "prune_structure", "save", "save_masks", "target_weights")

__all__ = ["PrunekitError", "__version__", *_API, "heal"]


def __getattr__(name: str):
    if name in _API:
        from prunekit import api

        return getattr(api, name)
    if name == "heal":
        from prunekit.recovery import heal

        return heal
    raise AttributeError(f"module 'prunekit' has no attribute '{name}'")
