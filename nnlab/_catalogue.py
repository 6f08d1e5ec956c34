"""What nnlab offers, by name, without loading PyTorch: data sets and data sources.

The command line builds its options from these tables before it imports
anything heavy, so ``nnlab compress --help`` and a mistyped option answer at
once.  :mod:`nnlab.data` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "SOURCES"]


@dataclass(frozen=True)
class _Spec:
    title: str
    tv_class: str
    channels: int
    size: int
    mean: tuple
    std: tuple
    classes: tuple
    offline: bool
    #: Where torchvision unpacks the files, relative to its root (what is deleted when they are damaged).
    tv_folder: str = ""


_DIGITS = tuple(str(i) for i in range(10))
DATASETS = {
    "mnist": _Spec("MNIST", "MNIST", 1, 28, (0.1307,), (0.3081,), _DIGITS, True, "MNIST/raw"),
    "fashion-mnist": _Spec(
        "Fashion-MNIST", "FashionMNIST", 1, 28, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        False, "FashionMNIST/raw",
    ),
    "cifar10": _Spec(
        "CIFAR-10", "CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        False, "cifar-10-batches-py",
    ),
}
SOURCES = ("offline", "torchvision", "auto")
