"""Depth pruning: score whole transformer blocks on calibration data, choose some under a budget, remove them."""

from prunekit.depth.api import DEPTH_METHODS, block_count, check_depth_options, prune_depth
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

__all__ = ["DEPTH_METHODS", "PER_LAYER_LISTS", "angular_distance", "block_count", "block_influence",
           "check_depth_options", "check_removal", "choose_lowest", "choose_run", "prune_depth", "random_blocks",
           "remove_blocks", "reverse_order", "skipped_blocks", "sleb_greedy"]
