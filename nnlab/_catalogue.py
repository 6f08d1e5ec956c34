"""What nnlab offers, by name, without loading PyTorch: data sets, data sources and models (with their recipes).

The command line builds its options from these tables before it imports
anything heavy, so ``nnlab compress --help`` and a mistyped option answer at
once.  :mod:`nnlab.data` re-exports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DATASETS", "SOURCES", "RECIPES", "FACTORY_FORM", "parse_model_argument"]


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


#: Training recipe of each model: (full-mode epochs, quick-mode epochs) and optimiser settings.
RECIPES = {
    "lenet300": {"epochs": (12, 2), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "lenet5": {"epochs": (12, 2), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "vgg-mnist": {"epochs": (8, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "vgg-cifar": {"epochs": (30, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "mobilenet-mnist": {"epochs": (10, 2), "lr": 0.1, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "mobilenet-cifar": {"epochs": (30, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "resnet-mnist": {"epochs": (10, 2), "lr": 0.1, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "resnet-cifar": {"epochs": (30, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "torchvision:resnet18": {"epochs": (3, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "torchvision:mobilenet_v2": {"epochs": (3, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 64,
                                 "augment": True},
}


#: How to name a model defined in a Python file, for messages.
FACTORY_FORM = "path/to/file.py:function (a Python file and a function in it that returns an nn.Module)"


def parse_model_argument(text: str, name: str = "model") -> tuple:
    """Read a model given by name: a registered model, or a Python file and a factory function in it.

    Needs no PyTorch (the command line parses ``--model`` with it before
    loading anything heavy).  Registered names are those of
    :data:`RECIPES` (``"lenet5"``, ``"torchvision:mobilenet_v2"``
    ...); anything else must have the form ``path/to/file.py:function``, and
    the file must exist.

    Args:
        text: the model argument.
        name: the argument's name, for messages (``"--model"`` on the command line).

    Returns:
        ``("name", text)`` for a registered model, or
        ``("factory", Path, function_name)`` for a file and a function.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: neither a registered name nor ``file.py:function`` (the
            message lists both forms), a function name that is not a Python
            identifier, or a file that is not a ``.py`` file.
        FileNotFoundError: the file does not exist.
    """
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a model name or {FACTORY_FORM}, got {text!r} ({type(text).__name__})")
    if text in RECIPES:
        return ("name", text)
    path, sep, function = text.rpartition(":")
    names = ", ".join(repr(n) for n in RECIPES)
    if not sep or not path or not path.endswith(".py"):
        raise ValueError(f"{name}={text!r} is neither a registered model ({names}) nor {FACTORY_FORM}")
    if not function.isidentifier():
        raise ValueError(f"{name}={text!r}: {function!r} is not a Python function name; expected {FACTORY_FORM}")
    file = Path(os.path.expanduser(path))
    if not file.exists():
        raise FileNotFoundError(f"{name}={text!r}: the file {str(file)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{name}={text!r}: {str(file)!r} is not a file")
    return ("factory", file, function)
