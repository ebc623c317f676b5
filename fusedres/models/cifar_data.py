"""CIFAR-10 as tensors, from a local copy or synthesised; nothing is downloaded.

``load_cifar10`` reads the python-pickle release (the ``cifar-10-batches-py`` directory of
https://www.cs.toronto.edu/~kriz/cifar.html). ``synthetic_cifar10`` makes a learnable stand-in
of the same shape, for runs and tests without the data set.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import torch
import torch.nn.functional as F

# Per-channel statistics of the CIFAR-10 training images.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_SYNTHETIC_SEEDS = {"train": 1, "test": 2}


def load_cifar10(path: str | pathlib.Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the ``"train"`` (50,000) or ``"test"`` (10,000) split: float32
    N x 3 x 32 x 32 images normalised per channel, int64 labels.

    ``path`` is the ``cifar-10-batches-py`` directory or the directory holding it.
    """
    root = pathlib.Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = {"train": _TRAIN_FILES, "test": _TEST_FILES}[split]
    data, labels = [], []
    for name in files:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    pixels = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std, torch.tensor(labels, dtype=torch.int64)


def synthetic_cifar10(size: int, split: str = "train", noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of a learnable 10-class task shaped like normalised CIFAR-10.

    Each class is a fixed smooth random pattern (shared by both splits); an image is its class's
    pattern at a random contrast, plus Gaussian noise of std ``noise``. The splits draw different
    images, so the test error measures generalisation.
    """
    patterns = torch.randn(NUM_CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    patterns = F.interpolate(patterns, size=(32, 32), mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(_SYNTHETIC_SEEDS[split])
    labels = torch.randint(NUM_CLASSES, (size,), generator=generator)
    contrast = torch.empty(size, 1, 1, 1).uniform_(0.5, 1.5, generator=generator)
    images = patterns[labels] * contrast + noise * torch.randn(size, 3, 32, 32, generator=generator)
    return images, labels
