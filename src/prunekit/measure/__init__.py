"""Measurement shared by all of prunekit: accuracy, perplexity, sparsity, parameters, resources, protocol card,
MACs and measured speed."""

from prunekit.measure.accuracy import accuracy
from prunekit.measure.perplexity import perplexity
from prunekit.measure.protocol import environment, result_record, tensor_sha256, weights_sha256
from prunekit.measure.resources import ResourceMonitor
from prunekit.measure.sparsity import layer_sparsity, nm_violations, parameter_counts, sparsity_summary
from prunekit.measure.speed import count_macs, generation_speed, in_turns, latency, prefill_speed, speed_record

__all__ = [
    "ResourceMonitor",
    "accuracy",
    "count_macs",
    "environment",
    "generation_speed",
    "in_turns",
    "latency",
    "layer_sparsity",
    "nm_violations",
    "parameter_counts",
    "perplexity",
    "prefill_speed",
    "result_record",
    "sparsity_summary",
    "speed_record",
    "tensor_sha256",
    "weights_sha256",
]
