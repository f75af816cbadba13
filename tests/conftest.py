"""Shared fixtures. Tests run offline: model and text assets come from installed packages."""

import os

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from prunekit.assets import LoadedModel, load_causal_lm  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M in float32 on the CPU, loaded once per session.

    Uses the user's prunekit cache (`$PRUNEKIT_CACHE` or ~/.cache/prunekit): the first run on a machine
    converts the GGUF file (~20-30 s), later runs load in under a second. Tests that change the model
    must work on a `copy.deepcopy` of it.
    """
    return load_causal_lm("smollm2-135m")


@pytest.fixture(scope="session")
def eval_ids(smollm2) -> torch.Tensor:
    """The evaluation windows of the SmolLM2 quality tests: the first 8 held-out 256-token windows of
    wiki-summaries (tests/real_models.py has the matching calibration settings)."""
    from prunekit.corpus import evaluation_windows

    return evaluation_windows(smollm2.tokenizer, "wiki-summaries", seq_len=256, max_windows=8).ids


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (small tensors, where threads only add overhead), then restore the
    session's thread count, so that the real-model tests elsewhere keep all cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
