"""The image assets, the small networks and accuracy measurement that the data and training benchmarks share."""

import pytest
import torch

from prunekit.assets import load_images
from prunekit.errors import PrunekitError
from prunekit.measure import accuracy
from prunekit.nets import NETS, build_net


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_image_assets_have_their_published_sizes(name):
    train, test = load_images(name, "train"), load_images(name, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.images.min() >= 0.0 and train.images.max() <= 1.0
    assert set(train.labels.unique().tolist()) == set(range(10)) and len(train.classes) == 10
    subset = train.subset([5, 0, 7])
    assert torch.equal(subset.labels, train.labels[[5, 0, 7]]) and len(subset) == 3


def test_image_asset_errors_name_the_bad_value():
    with pytest.raises(PrunekitError, match="unknown image asset 'cifar10'"):
        load_images("cifar10")
    with pytest.raises(PrunekitError, match="unknown split 'val'"):
        load_images("mnist", "val")


@pytest.mark.parametrize("name", list(NETS))
def test_nets_classify_28x28_images_and_seed_fixes_the_initialisation(name):
    net, same, other = build_net(name, num_classes=10, seed=3), build_net(name, seed=3), build_net(name, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters(), strict=True))
    assert net(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_accuracy_counts_correct_predictions_and_restores_train_mode():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # predicts class 0 for every input
            return torch.tensor([[5.0, 0.0]]).expand(len(x), 2) + self.anchor

    model = Fixed().train()
    result = accuracy(model, torch.zeros(10, 3), torch.tensor([0] * 7 + [1] * 3), batch_size=4)
    assert result["accuracy"] == pytest.approx(0.7) and result["examples"] == 10 and model.training
