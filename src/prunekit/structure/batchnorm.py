"""Re-estimate BatchNorm statistics after channels were removed.

Removing channels changes what every later layer receives, but a BatchNorm layer keeps normalising with the running
mean and variance it learnt on the dense network's activations, so a one-shot pruned CNN can collapse to one class
even when its weights are still good. Re-estimating the running statistics on a few unlabelled batches, with no
weight changing, is the standard cheap repair (e.g. Li et al. 2020, "EagleEye", adaptive BN). prunekit offers it as
a separate step so that results can be reported with and without it.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError


def recalibrate_batchnorm(model: nn.Module, calibration, *, progress: bool = False) -> dict:
    """Replace every BatchNorm layer's running mean and variance by their values over `calibration`, in place.

    calibration: a tensor, or a list of batches (tensors, tuples of positional inputs, or {'inputs': ...} dicts, as
        `prune_structure` takes them). The statistics are the cumulative average over the batches (momentum None),
        so with equal batch sizes the running mean is exactly the mean over all calibration inputs.

    Only the BatchNorm layers run in training mode (dropout and the like stay off); weights do not change; the
    model's modes and the layers' momenta are restored. Returns `{"layers", "batches", "examples"}`.
    """
    from prunekit.structure.graph_prune import _batches

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise PrunekitError(f"{type(model).__name__} has no BatchNorm layers whose statistics could be re-estimated")
    if any(not m.track_running_stats for m in norms):
        raise PrunekitError("a BatchNorm layer does not track running statistics (track_running_stats=False); it "
                            "normalises with each batch's own statistics and has nothing to re-estimate")
    batches = _batches(calibration, None) if calibration is not None else []
    if not batches:
        raise PrunekitError("BatchNorm recalibration needs calibration inputs; pass a tensor or a list of batches")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms}
    examples, done = 0, False
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts alike
            m.train()
        with torch.no_grad():
            for inputs, _ in tqdm(batches, desc="BatchNorm statistics", disable=not progress):
                model(*inputs)
                examples += len(inputs[0])
        broken = next((m for m in norms if not (torch.isfinite(m.running_mean).all()
                                                 and torch.isfinite(m.running_var).all())), None)
        if broken is not None:
            raise PrunekitError(f"BatchNorm statistics became non-finite on the calibration inputs (a layer of "
                                f"{broken.num_features} channels): the inputs hold NaN or inf; statistics unchanged")
        done = True
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
        if not done:  # an error leaves the model as it was
            for m, (mean, var, count) in saved.items():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return {"layers": len(norms), "batches": len(batches), "examples": examples}
