"""nnlab: a hands-on course in training neural networks for efficient inference.

Modules, in the order the course uses them:

* :mod:`nnlab.config`: quick mode, cache directory, CPU threads;
* :mod:`nnlab.data`: MNIST (offline subset or torchvision), Fashion-MNIST, CIFAR-10;
* :mod:`nnlab.models`: LeNet-300-100, LeNet-5, a small VGG, and ``summary``;
* :mod:`nnlab.train`: ``fit`` and ``evaluate``;
* :mod:`nnlab.cache`: trained baselines, trained once and cached;
* :mod:`nnlab.recipes`: pruned and retrained networks, made once and cached.

``import nnlab`` is light: PyTorch loads with the first submodule that needs
it, and the thread count (``NNLAB_THREADS``) is applied the moment it does.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

from . import config
from .config import available_cpus, cache_dir, pick, quick_mode, set_threads

__all__ = ["__version__", "about", "available_cpus", "cache_dir", "config", "pick", "quick_mode", "set_threads"]

config.apply_threads_when_torch_loads()

_SUBMODULES = {"cache", "data", "models", "train", "prune", "distill", "regularise", "quant", "plots", "widgets",
               "nna", "checks", "pipeline", "cli", "distributed", "graph", "export", "recipes", "base",
               "sweep", "regularize", "picker"}  # regularize: the deprecated spelling of regularise: importing it warns


def __getattr__(name):
    # Submodules load on first use (``nnlab.data.load_data(...)``), keeping ``import nnlab`` fast.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'nnlab' has no attribute {name!r}")


def about() -> dict:
    """What nnlab runs on: versions, threads, device, data source and quick mode.

    Notebooks print it in their first cell so that a screenshot of a problem
    says everything needed to reproduce it.
    """
    # lazy: import nnlab stays light; PyTorch loads with the first submodule that needs it
    import platform

    import numpy
    import torch
    import torchvision

    return {
        "nnlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "quick_mode": quick_mode(),
        "data_source": os.environ.get("NNLAB_DATA_SOURCE", "offline"),
        "cache": str(cache_dir(create=False)),
    }
