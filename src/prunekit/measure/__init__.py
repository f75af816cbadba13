"""Measurement shared by all of prunekit: accuracy, perplexity, sparsity, parameters, resources, protocol card."""

from prunekit.measure.accuracy import accuracy
from prunekit.measure.perplexity import perplexity
from prunekit.measure.protocol import environment, result_record, tensor_sha256, weights_sha256
from prunekit.measure.resources import ResourceMonitor
from prunekit.measure.sparsity import layer_sparsity, nm_violations, parameter_counts, sparsity_summary

__all__ = [
    "ResourceMonitor",
    "accuracy",
    "environment",
    "layer_sparsity",
    "nm_violations",
    "parameter_counts",
    "perplexity",
    "result_record",
    "sparsity_summary",
    "tensor_sha256",
    "weights_sha256",
]
