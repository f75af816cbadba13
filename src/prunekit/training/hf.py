"""Hugging Face `Trainer` integration: a callback that drives any prunekit pruner."""

from __future__ import annotations

from transformers import TrainerCallback


class PruningCallback(TrainerCallback):
    """Call `pruner.step()` after every optimizer step of a `Trainer` (its `on_step_end`, once per accumulated
    step), and `pruner.finalize()` when training ends if `finalize=True`.

    Gradient-based pruners (RigL, Movement) read gradients inside the backward pass, so they work although the
    Trainer clears gradients before `on_step_end`. Install it explicitly:
    `Trainer(..., callbacks=[PruningCallback(pruner)])`.
    """

    def __init__(self, pruner, finalize: bool = False):
        self.pruner = pruner
        self.finalize = finalize

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize:
            self.pruner.finalize()
        return control
