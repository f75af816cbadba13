"""BatchNorm recalibration after channel removal: exact statistics, nothing else changes, errors leave the model
as it was, and it repairs a one-shot pruned network's outputs."""

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.nets import build_net
from prunekit.structure import prune_structure, recalibrate_batchnorm

X = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def test_running_statistics_equal_those_of_the_calibration_inputs():
    model = ConvBN().eval()
    conv_out = model.conv(X).detach()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    info = recalibrate_batchnorm(model, list(X.split(16)))
    assert info == {"layers": 1, "batches": 3, "examples": 48}
    torch.testing.assert_close(model.bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    # the cumulative average of the three batches' unbiased variances
    per_batch = [b.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for b in conv_out.split(16)]
    torch.testing.assert_close(model.bn.running_var, torch.stack(per_batch).mean(0), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert not model.training and not model.bn.training and model.bn.momentum == 0.1


def test_train_mode_and_dict_batches_are_kept():
    model = ConvBN().train()
    recalibrate_batchnorm(model, [{"inputs": X[:24], "labels": torch.zeros(24, dtype=torch.long)}, X[24:]])
    assert all(m.training for m in model.modules())


def test_errors_are_one_line_and_leave_the_statistics():
    model = ConvBN().eval()
    recalibrate_batchnorm(model, X)
    before = copy.deepcopy(model.state_dict())
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="non-finite") as info:
        recalibrate_batchnorm(model, bad)
    assert "\n" not in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(PrunekitError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(3, 3), torch.zeros(2, 3))
    with pytest.raises(PrunekitError, match="calibration"):
        recalibrate_batchnorm(model, [])


def test_recalibration_brings_a_pruned_network_back_towards_the_dense_one():
    torch.manual_seed(0)
    dense = build_net("resnet-small", seed=0)
    # give the dense network running statistics of its own inputs, as training would
    recalibrate_batchnorm(dense, list(X.split(16)))
    dense.eval()
    pruned = copy.deepcopy(dense)
    prune_structure(pruned, X[:1], method="l2", remove=0.3, ignore=[pruned.fc], progress=False)
    pruned.eval()
    with torch.no_grad():
        target = dense(X)
        error_before = (pruned(X) - target).pow(2).mean()
        recalibrate_batchnorm(pruned, list(X.split(16)))
        error_after = (pruned(X) - target).pow(2).mean()
    assert error_after < error_before
