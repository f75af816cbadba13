"""Depth pruning: score whole transformer blocks (or their attention or MLP sublayers) on calibration data, choose
some under a budget, remove them or merge them into their neighbours."""

from prunekit.depth.api import (
    DEPTH_METHODS,
    TAYLOR_SPARED,
    UNITS,
    block_count,
    check_depth_options,
    prune_depth,
    sublayer_influences,
    taylor_importance,
)
from prunekit.depth.merge import contiguous_runs, merge_blocks, merge_targets
from prunekit.depth.remove import PER_LAYER_LISTS, check_removal, remove_blocks, skipped_blocks
from prunekit.depth.scores import (
    angular_distance,
    block_influence,
    choose_lowest,
    choose_run,
    random_blocks,
    reverse_order,
    sleb_greedy,
)
from prunekit.depth.sublayers import (
    SUBLAYER_FAMILIES,
    SUBLAYERS,
    RemovedAttention,
    RemovedMLP,
    check_sublayer_removal,
    remove_sublayers,
    removed_sublayers,
    skipped_sublayers,
)

__all__ = ["DEPTH_METHODS", "PER_LAYER_LISTS", "SUBLAYERS", "SUBLAYER_FAMILIES", "TAYLOR_SPARED", "UNITS",
           "RemovedAttention", "RemovedMLP", "angular_distance", "block_count", "block_influence",
           "check_depth_options", "check_removal", "check_sublayer_removal", "choose_lowest", "choose_run",
           "contiguous_runs", "merge_blocks", "merge_targets", "prune_depth", "random_blocks", "remove_blocks",
           "remove_sublayers", "removed_sublayers", "reverse_order", "skipped_blocks", "skipped_sublayers",
           "sleb_greedy", "sublayer_influences", "taylor_importance"]
