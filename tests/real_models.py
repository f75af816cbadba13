"""Shared pieces of the quality tests on real LLMs (SmolLM2-135M, Gemma-3-270M): one protocol, one pruning loop."""

import copy
from collections.abc import Callable

import prunekit
from prunekit.assets import LoadedModel
from prunekit.measure import nm_violations, perplexity

CALIB = dict(calibration="wiki-summaries", calibration_samples=16, calibration_seq_len=256, progress=False)


def pruned_perplexity_runner(loaded: LoadedModel, eval_ids) -> Callable[[str, str], float]:
    """`run(method, budget)`: perplexity on `eval_ids` after pruning a fresh copy of the model, computed once each.

    `budget` is a sparsity ("0.5") or an N:M pattern ("2:4"); N:M results are checked group by group.
    """
    cache: dict[tuple[str, str], float] = {}

    def run(method: str, budget: str) -> float:
        if (method, budget) not in cache:
            model = copy.deepcopy(loaded.model)
            pattern = budget if ":" in budget else None
            sparsity = None if pattern else float(budget)
            prunekit.prune(model, loaded.tokenizer, method=method, sparsity=sparsity, pattern=pattern, **CALIB)
            if pattern:
                n, m = map(int, pattern.split(":"))
                assert all(nm_violations(w, n, m) == 0 for w in prunekit.target_weights(model).values())
            cache[method, budget] = perplexity(model, eval_ids, progress=False)["perplexity"]
        return cache[method, budget]

    return run
