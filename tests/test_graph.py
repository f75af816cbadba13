"""The dependency graph and `prune_graph` on small synthetic networks, one per coupling the graph must handle."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.nets import ResNetSmall, TinyCNN
from prunekit.structure.graph import DependencyGraph
from prunekit.structure.graph_prune import prune_graph
from prunekit.training import Masks

pytestmark = pytest.mark.usefixtures("one_thread")

def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class CatNet(nn.Module):
    """Two branches concatenated, then concatenated again with a third (a cascade), then a consumer."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a, self.b, self.c = conv_bn(8, 6), conv_bn(8, 10), conv_bn(8, 4)
        self.mix = conv_bn(20, 12, k=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([torch.cat([self.a(x), self.b(x)], dim=1), self.c(x)], 1)
        return self.fc(self.mix(y).mean((2, 3)))


class SplitNet(nn.Module):
    """chunk into a gated pair (GLU), and a split with literal sizes (whose sizes cannot follow a removal)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.up = nn.Conv2d(8, 16, 1)
        self.side = nn.Conv2d(8, 12, 1)
        self.down = nn.Conv2d(8 + 8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.up(x).chunk(2, dim=1)
        p, q = torch.split(self.side(x), [4, 8], dim=1)
        y = torch.cat([a * torch.sigmoid(b), q], dim=1) + p.mean(1, keepdim=True)
        return self.fc(self.down(y).mean((2, 3)))


class DepthwiseNet(nn.Module):
    """An inverted residual: expand, depthwise, project, residual sum."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.expand = conv_bn(8, 24, k=1)
        self.dw = conv_bn(24, 24, groups=24)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.grouped = conv_bn(16, 32, groups=4)
        self.head = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.head(self.grouped(self.stem(x))).mean((2, 3)))


class TransposeNet(nn.Module):
    """Transposed convolutions (weight [in, out / groups, k, k]), plain and grouped, with a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.norm = nn.GroupNorm(4, 12)
        self.up2 = nn.ConvTranspose2d(12, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up2(torch.relu(self.norm(self.up(self.stem(x)))))))


class LayerNormNet(nn.Module):
    """Channels-last LayerNorm as in ConvNeXt: permute, LayerNorm, Linear, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.mlp1, self.mlp2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.mlp2(torch.relu(self.mlp1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.fc((x + y).mean((2, 3)))


class ParameterNet(nn.Module):
    """Parameters used directly in forward: a per-channel scale and shift."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x) * self.scale + self.shift)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class SENet(nn.Module):
    """A squeeze-and-excitation gate: the expand conv's outputs gate the block's channels."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.reduce, self.expand = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.conv = conv_bn(12, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.fc(self.conv(x * gate).mean((2, 3)))


class TwoHeads(nn.Module):
    """Two inputs summed after their own convs; two outputs (a map and logits)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(2, 8)
        self.trunk = conv_bn(8, 16)
        self.map_head = nn.Conv2d(16, 2, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, a, b):
        x = self.trunk(self.a(a) + self.b(b))
        return self.map_head(x), self.fc(x.flatten(2).mean(-1))


class UNet(nn.Module):
    """An encoder-decoder: max-pool down, interpolate up, the skip connection concatenated with the decoder."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, 8), conv_bn(8, 16)
        self.dec = conv_bn(8 + 16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        skip = self.enc1(x)
        deep = nn.functional.interpolate(self.enc2(nn.functional.max_pool2d(skip, 2)), scale_factor=2.0)
        return self.head(self.dec(torch.cat([skip, deep], dim=1)))


def _inputs(net: nn.Module, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(net, TwoHeads):
        return torch.randn(batch, 3, 8, 8, generator=g), torch.randn(batch, 2, 8, 8, generator=g)
    if isinstance(net, ResNetSmall | TinyCNN):
        return torch.randn(batch, 1, 28, 28, generator=g)
    return torch.randn(batch, 3, 8, 8, generator=g)


def _build(cls) -> nn.Module:
    torch.manual_seed(0)
    net = cls()
    for m in net.modules():  # BatchNorm statistics away from the identity, so that they matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval()


def _run(net: nn.Module, inputs):
    with torch.no_grad():
        out = net(*inputs) if isinstance(inputs, tuple) else net(inputs)
    return out if isinstance(out, tuple) else (out,)


def _assert_close(a, b, atol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def _check_attributes(net: nn.Module) -> None:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        elif isinstance(m, nn.ConvTranspose2d):
            assert m.weight.shape[:2] == (m.in_channels, m.out_channels // m.groups), name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,), name
        elif isinstance(m, nn.GroupNorm):
            assert m.weight.shape == (m.num_channels,) and m.num_channels % m.num_groups == 0, name
        elif isinstance(m, nn.LayerNorm):
            assert m.weight.shape == m.normalized_shape, name
        if getattr(m, "bias", None) is not None and hasattr(m, "weight"):
            out_dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0
            size = m.weight.shape[out_dim] * (m.groups if isinstance(m, nn.ConvTranspose2d) else 1)
            assert m.bias.shape[0] == size, name


EXACT = [ResNetSmall, TinyCNN, CatNet, SplitNet, DepthwiseNet, GroupedNet, TransposeNet, ParameterNet, SENet,
         TwoHeads, UNet]


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_zeroed_groups_removed_leave_outputs_identical(cls):
    """Mask some units (random scores), then remove by L1 at the same budget: the all-zero units are exactly the
    lowest-scoring ones, so the removal takes them and the outputs must not move."""
    net = _build(cls)
    x = _inputs(net)
    record, masks = prune_graph(net, x, method="random", remove=0.3, mode="mask", seed=3, progress=False)
    assert masks  # some conv/linear weight was masked
    zeroed = _run(net, x)
    before = sum(p.numel() for p in net.parameters())
    record2, none = prune_graph(net, x, method="l1", remove=0.3, progress=False)
    assert none is None
    assert sum(p.numel() for p in net.parameters()) < before
    assert record2["metrics"]["parameters"]["removed"] == record["metrics"]["parameters"]["removed"]
    _assert_close(_run(net, x), zeroed)
    _check_attributes(net)


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_mask_and_remove_give_identical_outputs(cls, allocation):
    net = _build(cls)
    x = _inputs(net)
    masked = copy.deepcopy(net)
    _, masks = prune_graph(masked, x, method="l2", remove=0.25, allocation=allocation, mode="mask",
                           progress=False)
    record, _ = prune_graph(net, x, method="l2", remove=0.25, allocation=allocation, progress=False)
    _assert_close(_run(net, x), _run(masked, x))
    _check_attributes(net)
    # the masks hold the zeros: every masked conv/linear weight is zero where its mask is False
    for name, mask in masks.items():
        weight = masked.get_parameter(name)
        assert mask.shape == weight.shape and not weight[~mask].any()
    # every member slice of a masked unit is zero (BatchNorm weight, bias and running mean included), and the
    # masked units are as many as the removal took away
    graph = DependencyGraph(masked, x)
    zero_units = 0
    for group in graph.groups:
        for unit in group.units:
            members = [(masked.get_parameter(m.name) if m.is_parameter else masked.get_buffer(m.name), m)
                       for m in group.members if not m.name.endswith("running_var") and (m.units == unit).any()]
            parts = [t.index_select(m.dim, torch.as_tensor(m.positions[m.units == unit])) for t, m in members]
            if any(m.name in masks and not p.any() for (_, m), p in zip(members, parts, strict=True)):
                assert not any(p.any() for p in parts)
                zero_units += 1
    assert zero_units == sum(g["units"] - g["kept"] for g in record["metrics"]["groups"])
    # the mask's kept entries are exactly the removed model's weight
    for name, mask in masks.items():
        kept = net.get_parameter(name)
        assert torch.equal(masked.get_parameter(name)[mask].reshape(kept.shape), kept)
    assert record["metrics"]["parameters"]["after"] == sum(p.numel() for p in net.parameters())


def test_masks_are_held_by_training_masks():
    net = _build(ResNetSmall)
    _, masks = prune_graph(net, _inputs(net), remove=0.3, mode="mask", progress=False)
    held = Masks(net, masks)
    held.update(masks)
    for name, mask in masks.items():
        assert torch.equal(held.masks[name], mask)


def test_layernorm_channels_are_coupled_and_removed_consistently():
    """LayerNorm over channels is coupled (its weight goes with the channels) but not exact: removing a channel
    changes the others' statistics, and the graph says so."""
    net = _build(LayerNormNet)
    x = _inputs(net)
    graph = DependencyGraph(net, x)
    norm = [g for g in graph.groups if any(m.name == "norm.weight" for m in g.members)]
    assert len(norm) == 1 and norm[0].renormalised
    names = {m.name for m in norm[0].members}
    assert {"stem.weight", "stem.bias", "norm.bias", "mlp1.weight", "mlp2.weight", "mlp2.bias",
            "fc.weight"} <= names
    prune_graph(net, x, remove=0.3, progress=False)
    _check_attributes(net)
    assert _run(net, x)[0].shape == (2, 3)


def _group_of(graph: DependencyGraph, name: str, dim: int):
    return [g for g in graph.groups if any(m.name == name and m.dim == dim for m in g.members)]


def _member(group, name: str, dim: int):
    return next(m for m in group.members if m.name == name and m.dim == dim)


def test_concatenation_shifts_the_consumer_indices():
    net = _build(CatNet)
    graph = DependencyGraph(net, _inputs(net))
    for name, start, count in (("a.0.weight", 0, 6), ("b.0.weight", 6, 10), ("c.0.weight", 16, 4)):
        (group,) = _group_of(graph, name, 0)
        assert len(group.units) == count and group.prunable
        consumer = _member(group, "mix.0.weight", 1)
        assert consumer.positions.tolist() == list(range(start, start + count))
    assert len(_group_of(graph, "mix.0.weight", 1)) == 3  # one group per concatenated branch


def test_chunk_couples_positions_and_literal_split_is_pinned():
    net = _build(SplitNet)
    graph = DependencyGraph(net, _inputs(net))
    (up,) = _group_of(graph, "up.weight", 0)
    assert len(up.units) == 8  # 16 channels, chunk i of both halves go together
    assert _member(up, "down.weight", 1).positions.tolist() == list(range(8))
    (side,) = _group_of(graph, "side.weight", 0)
    assert not side.prunable  # split(x, [4, 8]) has literal sizes
    (stem,) = _group_of(graph, "stem.0.weight", 0)
    assert stem.prunable


def test_grouped_and_depthwise_convs_remove_whole_groups():
    graph = DependencyGraph(_build(GroupedNet), _inputs(_build(GroupedNet)))
    (group,) = _group_of(graph, "grouped.0.weight", 0)
    # 4 conv groups: the stem's 16 channels (4 per group) and grouped's 32 outputs (8 per group) are 4 units
    assert len(group.units) == 4
    assert np.bincount(_member(group, "grouped.0.weight", 0).units - group.units[0]).tolist() == [8] * 4
    assert np.bincount(_member(group, "stem.0.weight", 0).units - group.units[0]).tolist() == [4] * 4
    dw = DependencyGraph(_build(DepthwiseNet), _inputs(_build(DepthwiseNet)))
    (group,) = _group_of(dw, "dw.0.weight", 0)
    assert len(group.units) == 24 and _member(group, "expand.0.weight", 0).positions.tolist() == list(range(24))
    net = _build(GroupedNet)
    prune_graph(net, _inputs(net), remove=0.3, progress=False)
    assert net.grouped[0].groups < 4 and net.grouped[0].in_channels == net.stem[0].out_channels


def test_flatten_into_linear_maps_each_channel_to_its_features():
    net = _build(TinyCNN)
    graph = DependencyGraph(net, _inputs(net))
    (group,) = _group_of(graph, "features.4.weight", 0)
    fc = _member(group, "classifier.1.weight", 1)
    assert len(fc.positions) == 32 * 49
    assert (fc.units.reshape(32, 49) == group.units[:, None]).all()  # channel c owns features 49c..49c+48


def test_residual_se_gate_parameters_and_io_are_coupled():
    res = DependencyGraph(_build(ResNetSmall), _inputs(_build(ResNetSmall)))
    (group,) = _group_of(res, "layer2.conv2.weight", 0)
    assert {"layer2.shortcut.0.weight", "layer3.conv1.weight", "layer3.shortcut.0.weight"} <= {
        m.name for m in group.members}
    se = DependencyGraph(_build(SENet), _inputs(_build(SENet)))
    (group,) = _group_of(se, "expand.weight", 0)
    assert {"stem.0.weight", "stem.1.weight", "reduce.weight", "conv.0.weight"} <= {m.name for m in group.members}
    par = DependencyGraph(_build(ParameterNet), _inputs(_build(ParameterNet)))
    (group,) = _group_of(par, "scale", 1)
    assert {"stem.weight", "shift", "conv.weight"} <= {m.name for m in group.members}
    two = DependencyGraph(_build(TwoHeads), _inputs(_build(TwoHeads)))
    (group,) = _group_of(two, "a.0.weight", 0)
    assert "b.0.weight" in {m.name for m in group.members} and group.prunable
    for name, dim in (("a.0.weight", 1), ("b.0.weight", 1), ("map_head.weight", 0), ("fc.weight", 0)):
        (group,) = _group_of(two, name, dim)
        assert not group.prunable  # network inputs and outputs keep their width
    summary = two.summary()
    assert all({"group", "units", "prunable_units", "members"} <= set(item) for item in summary)
    assert len(two.summary_lines()) == len(summary)


class ViewNet(nn.Module):
    """Flatten by `view`: with the batch size taken from the tensor the features follow a removal; with a literal
    feature count (`view(-1, 512)`) or a split into heads they cannot, and the channels are pinned."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.conv, self.other = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(8 * 64, 4)
        self.heads = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y.view(-1, 8 * 64) if self.literal else y.view(y.size(0), -1)
        z = self.other(x)
        z = z.view(z.size(0), 2, 3, 64).softmax(-1).view(z.size(0), 6, 8, 8)  # channels split into 2 heads
        return self.fc(y) + self.heads(z).mean((2, 3))


@pytest.mark.parametrize("literal", [False, True])
def test_view_follows_the_channels_unless_its_sizes_are_literal(literal):
    net = ViewNet(literal).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(net, x)
    (group,) = _group_of(graph, "conv.weight", 0)
    assert group.prunable != literal
    assert len(_member(group, "fc.weight", 1).positions) == 512
    (heads,) = _group_of(graph, "other.weight", 0)
    assert not heads.prunable
    if not literal:
        dense = _run(net, x)
        copy_ = copy.deepcopy(net)
        _, masks = prune_graph(copy_, x, remove=0.3, mode="mask", progress=False)
        prune_graph(net, x, remove=0.3, progress=False)
        assert net.fc.in_features < 512 and net.fc.in_features % 64 == 0
        _assert_close(_run(net, x), _run(copy_, x))
        assert _run(net, x)[0].shape == dense[0].shape


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("method", ["l1", "l2", "bn-scale", "taylor", "activation", "random"])
def test_every_scorer_meets_the_parameter_budget(method, allocation):
    net = _build(ResNetSmall)
    x = _inputs(net, batch=4)
    dense = sum(p.numel() for p in net.parameters())
    record, _ = prune_graph(net, x, method=method, remove=0.4, allocation=allocation, progress=False,
                            calibration=[x, {"inputs": _inputs(net, 4, 7), "labels": torch.arange(4)}])
    achieved = record["metrics"]["removed_fraction"]["achieved"]
    assert abs(achieved - 0.4) <= 0.02
    assert achieved == pytest.approx(1 - sum(p.numel() for p in net.parameters()) / dense)
    assert record["metrics"]["macs"]["after"] < record["metrics"]["macs"]["before"]
    _check_attributes(net)


def test_scorers_differ_and_random_follows_its_seed():
    kept = {}
    for method, seed in (("l2", 0), ("taylor", 0), ("random", 0), ("random", 1), ("random", 0)):
        net = _build(ResNetSmall)
        prune_graph(net, _inputs(net), method=method, remove=0.3, mode="mask", seed=seed, progress=False)
        kept.setdefault((method, seed), []).append(net.layer1.conv1.weight.abs().sum((1, 2, 3)).ne(0))
    assert torch.equal(*kept[("random", 0)])
    assert not torch.equal(kept[("random", 0)][0], kept[("random", 1)][0])
    assert not torch.equal(kept[("l2", 0)][0], kept[("taylor", 0)][0])


def test_activation_scores_a_constant_channel_after_its_norm():
    """A channel that BatchNorm turns into a large constant (gamma 0, beta 5) feeds the next layer: activation
    scoring (measured after the norm) keeps it, network slimming (|gamma|) removes it first."""
    net = _build(TinyCNN)
    with torch.no_grad():
        net.features[1].weight[0], net.features[1].bias[0] = 0.0, 5.0
        net.features[0].weight[0] *= 1e-3  # the smallest raw conv output: measured there, it would go first
    x = _inputs(net, batch=4)
    kept = {}
    for method in ("activation", "bn-scale"):
        model = copy.deepcopy(net)
        _, masks = prune_graph(model, x, method=method, remove=0.3, mode="mask",
                               progress=False)
        mask = masks["features.0.weight"]
        assert not mask.all()  # the first layer lost channels either way
        kept[method] = bool(mask[0].all())
    assert kept == {"activation": True, "bn-scale": False}


def test_mac_budget_round_to_min_keep_and_ignore():
    net = _build(ResNetSmall)
    x = _inputs(net)
    record, _ = prune_graph(net, x, remove_macs=0.5, progress=False)
    assert abs(record["metrics"]["macs_removed_fraction"]["achieved"] - 0.5) <= 0.02
    net = _build(ResNetSmall)
    prune_graph(net, x, remove=0.5, round_to=8, allocation="global", progress=False)
    assert all(m.out_channels % 8 == 0 for m in net.modules() if isinstance(m, nn.Conv2d))
    net = _build(ResNetSmall)
    prune_graph(net, x, remove=0.6, min_keep=0.5, allocation="global", progress=False)
    assert net.layer1.conv1.out_channels >= 8 and net.layer3.conv1.out_channels >= 32
    net = _build(ResNetSmall)
    shapes = {n: p.shape for n, p in net.layer3.named_parameters()}
    prune_graph(net, x, remove=0.2, ignore=[net.layer3], progress=False)
    assert shapes == {n: p.shape for n, p in net.layer3.named_parameters()}
    assert net.layer1.conv1.out_channels < 16


def test_tiny_budget_removes_almost_nothing():
    net = _build(ResNetSmall)
    x = _inputs(net)
    dense = _run(net, x)
    record, _ = prune_graph(net, x, remove=1e-6, progress=False)
    assert record["metrics"]["parameters"]["removed"] == 0
    _assert_close(_run(net, x), dense)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return -self.conv(x)


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return torch.matmul(self.a(x), self.b(x).transpose(-1, -2))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("make, kwargs, words", [
    (Small, {"remove": 0.97}, ["remove=0.97", "at most"]),
    (Small, {"remove": 0.2, "ignore": ["fc"]}, ["nothing", "prunable"]),
    (Small, {"remove": 0.2, "ignore": ["head"]}, ["'head'", "not a submodule"]),
    (Small, {"remove": 0.2, "round_to": 5}, ["round_to=5", "12"]),
    (Small, {"remove": 0.2, "remove_macs": 0.2}, ["exactly one budget"]),
    (Small, {"remove": 1.5}, ["remove=1.5"]),
    (Small, {"remove": 0.2, "method": "magnitude"}, ["magnitude"]),
    (Small, {"remove": 0.2, "allocation": "lamp"}, ["lamp"]),
    (Small, {"remove": 0.2, "mode": "zero"}, ["zero"]),
    (Small, {"remove": 0.2, "min_keep": 0}, ["min_keep"]),
    (Untraceable, {"remove": 0.2}, ["Untraceable", "cannot trace", "in forward()", "control flow"]),
    (UnknownOp, {"remove": 0.2}, ["matmul"]),
])
def test_bad_input_is_one_line_and_leaves_the_model_untouched(make, kwargs, words):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(2, 4, 6) if make is UnknownOp else torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PrunekitError) as info:
        prune_graph(net, x, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    after = net.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
