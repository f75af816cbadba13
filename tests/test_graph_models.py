"""`prune_graph` on real CNNs: MobileNetV2 with torchvision's ImageNet weights, and ResNetSmall."""

import copy

import pytest
import torch
from torch import nn

from prunekit.nets import ResNetSmall, mobilenet_v2_imagenet
from prunekit.structure.graph_prune import prune_graph

pytestmark = pytest.mark.slow

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def smooth_images(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic image-like inputs (no ImageNet images exist here): low-frequency colour fields with finer
    texture, in [0, 1], normalised with ImageNet's statistics."""
    g = torch.Generator().manual_seed(seed)
    coarse = nn.functional.interpolate(torch.randn(count, 3, 7, 7, generator=g), size=size, mode="bicubic")
    fine = nn.functional.interpolate(torch.randn(count, 3, 56, 56, generator=g), size=size, mode="bilinear")
    pixels = torch.sigmoid(1.5 * coarse + 0.5 * fine)
    return (pixels - MEAN) / STD


@pytest.fixture(scope="module")
def mobilenet():
    return mobilenet_v2_imagenet()


@pytest.fixture(scope="module")
def images():
    return smooth_images(8)


def _top1(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(-1)


def test_mobilenet_v2_loses_30_percent_of_parameters_by_l2(mobilenet, images, record_property):
    dense_top1 = _top1(mobilenet, images)
    model = copy.deepcopy(mobilenet)
    before = sum(p.numel() for p in model.parameters())
    record, masks = prune_graph(model, images[:1], method="l2", remove=0.3, progress=False)
    assert masks is None
    after = sum(p.numel() for p in model.parameters())
    achieved = record["metrics"]["removed_fraction"]["achieved"]
    assert achieved == pytest.approx(1 - after / before) and abs(achieved - 0.3) <= 0.02
    assert record["metrics"]["macs"]["after"] < record["metrics"]["macs"]["before"]
    assert model.classifier[1].out_features == 1000 and model.features[0][0].in_channels == 3
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
            # depthwise convs stay depthwise
            assert m.groups == 1 or m.groups == m.in_channels == m.out_channels
    pruned_top1 = _top1(model, images)
    agreement = (pruned_top1 == dense_top1).float().mean().item()
    record_property("mobilenet_v2_l2_30_top1_agreement", agreement)
    assert pruned_top1.shape == dense_top1.shape and 0 <= agreement <= 1
    # the depthwise layers lost channels with their expansions, the residual streams kept equal widths
    assert model.features[2].conv[1][0].out_channels < 96
    assert model.features[4].conv[2].out_channels == model.features[5].conv[2].out_channels


def test_mobilenet_v2_tiny_budget_is_the_identity(mobilenet, images):
    model = copy.deepcopy(mobilenet)
    record, _ = prune_graph(model, images[:1], method="l2", remove=1e-7, progress=False)
    assert record["metrics"]["parameters"]["removed"] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(images), mobilenet(images))


def test_resnet_small_loses_half_its_parameters_globally():
    torch.manual_seed(0)
    model = ResNetSmall().eval()
    x = torch.randn(16, 1, 28, 28)
    record, _ = prune_graph(model, x, method="taylor", remove=0.5, allocation="global", progress=False,
                            calibration=[x[:8], x[8:]])
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - 0.5) <= 0.02
    assert model(x).shape == (16, 10)
    assert record["metrics"]["macs"]["after"] < record["metrics"]["macs"]["before"]
