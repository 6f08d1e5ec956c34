"""What every layer of nnlab shares: devices, "a data bundle or a loader", safe writes, wrappers, moved names.

This module sits at the bottom of nnlab (see ``ARCHITECTURE.md``): it imports
no other nnlab module except :mod:`nnlab._files`, and importing it does not
load PyTorch (the command line's ``--help`` reads it before PyTorch is loaded).

* :func:`resolve_device`: the one meaning of a ``device`` argument in nnlab;
* :func:`loader_of`: the loader of a split of a DataBundle, or a loader as it is;
* :func:`atomic_write`: every file nnlab writes is written whole or not at all;
* :func:`unwrap`: the network inside a DistributedDataParallel/DataParallel wrapper;
* :func:`warn_moved`: the warning of a deprecated alias of a name that moved;
* :func:`release_memory`: hand the memory of dropped networks back to the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import warnings
from typing import TYPE_CHECKING

from ._files import atomic_write

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DEVICE_CHOICES", "atomic_write", "loader_of", "release_memory", "resolve_device", "unwrap", "warn_moved"]

#: How a device may be spelled (besides a ``torch.device``).
DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N', 'mps', 'auto' or None"


def _model_device(model) -> torch.device:
    # lazy: base must not load PyTorch (the command line uses it before PyTorch loads)
    import torch

    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_device(device, model: nn.Module | None = None) -> torch.device:
    """Turn a ``device`` argument into a ``torch.device``: the one meaning of ``device`` in nnlab.

    Every nnlab function and explorer that takes ``device`` passes it through
    here, so it means the same thing everywhere:

    * ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``: that device;
    * ``"auto"``: CUDA when this machine has it, else the CPU;
    * ``None``: where ``model`` already is (its first parameter or buffer; the
      CPU for a model without any), so that evaluating a model moves nothing;
      without a model, ``None`` is ``"auto"``.

    Functions that train and cache a result default to ``device="cpu"``
    instead, so that a cached result is the same on every machine unless
    asked otherwise.

    Args:
        device: one of the spellings above.
        model: the network the device is for (only read when ``device`` is None).

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: the string is not a device, or names an accelerator this
            machine does not have.
        TypeError: ``device`` is neither a string, a ``torch.device`` nor None.
    """
    # lazy: base must not load PyTorch (the command line uses it before PyTorch loads)
    import torch

    if device is None and model is not None:
        return _model_device(model)
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; got {device!r}") from None
    else:
        raise TypeError(f"device must be a string or torch.device, got {device!r} ({type(device).__name__})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r} but Apple's MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; got {device!r}")
    return dev


def is_bundle(data) -> bool:
    """Whether ``data`` is a DataBundle (from :func:`nnlab.data.load_data`) rather than a loader."""
    return hasattr(data, "train") and hasattr(data, "test") and hasattr(data, "description")


def loader_of(data, split: str = "train"):
    """The ``split`` loader (``"train"`` or ``"test"``) of a DataBundle; anything else as it is.

    nnlab's functions take either a DataBundle or a DataLoader yielding
    ``(images, labels)``; this is the one place that tells them apart.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return getattr(data, split) if is_bundle(data) else data


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or DataParallel) wrapper; any other model unchanged."""
    # lazy: base must not load PyTorch (the command line uses it before PyTorch loads)
    from torch import nn

    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


_WARNED: set = set()


def warn_moved(old: str, new: str) -> None:
    """Warn, once per process, that ``old`` is a deprecated alias of ``new``.

    Deprecated aliases call this first and then the new name; the import
    graph test (``tests/test_architecture.py``) lets an upward import stand
    only inside a function that calls it.

    Args:
        old: the old dotted name, e.g. ``"nnlab.distill.pretrained_sparse"``.
        new: where it lives now, e.g. ``"nnlab.recipes.pretrained_sparse"``.
    """
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} moved to {new}; the old name is deprecated and will be removed, use {new}",
                  DeprecationWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> None:
    """Free what Python no longer references and hand the freed heap back to the operating system.

    PyTorch allocates CPU tensors with the C library's ``malloc``.  On Linux,
    glibc keeps the blocks of tensors up to a few megabytes in its heap once
    they are freed, ready for reuse, and the process keeps their memory.  A
    pipeline that makes and drops weight-sized copies one stage after another
    (a ResNet-18 holds 11 million weights: 45 MB a copy) then grows by
    hundreds of megabytes that nothing uses, enough to push a 2 GB Binder pod
    over its limit.  :func:`nnlab.pipeline.compress` calls this between
    stages; call it yourself after dropping a large network in a notebook.

    It runs Python's garbage collector (networks traced with ``torch.fx`` hold
    reference cycles) and then glibc's ``malloc_trim(0)``.  Where the C
    library has no ``malloc_trim`` (macOS, Windows, musl) only the collector
    runs.  Nothing that is still referenced is touched.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
