"""Checks that run before any work: every argument of a long-running entry point, all at once.

A bad argument must be refused before the first epoch, not after three
trained stages.  Each function here checks everything its entry point will
need (bit-depths against the accelerator, layer names against the model,
the model against the data set's image size ...) without loading data or
training anything, and raises an error that names the argument, the bad
value and what is allowed.
"""

from __future__ import annotations

import numbers

from ._args import check_bool, check_choice, check_float, check_int, check_positive_int
from ._catalogue import DATASETS, SOURCES

__all__ = ["check_compress_arguments", "check_quantised_arguments", "check_bits", "check_common",
           "check_overrides", "check_source", "weight_layer_names"]


def check_source(dataset: str, source) -> None:
    """``source`` is None or a known source that can serve ``dataset``."""
    if source is None:
        return
    check_choice("source", source, SOURCES)
    if source == "offline" and not DATASETS[dataset].offline:
        offline = [n for n, s in DATASETS.items() if s.offline]
        raise ValueError(f"source='offline' is not available for dataset={dataset!r}: only {offline} ship with "
                         f"nnlab; use source='torchvision' (needs the network)")


def check_bits(name: str, bits, *, optional: bool = False) -> int | None:
    """A bit-depth nnlab's quantisers support (``nnlab.quant.MIN_BITS`` .. ``MAX_BITS``), or None if ``optional``."""
    from .quant.spec import MAX_BITS, MIN_BITS

    if bits is None and optional:
        return None
    return check_int(name, bits, minimum=MIN_BITS, maximum=MAX_BITS)


def weight_layer_names(model: str) -> list:
    """Names of the Conv2d and Linear layers of the zoo model ``model`` (built untrained, in a second)."""
    import torch
    from torch import nn

    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        net = build_model(model)
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_overrides(overrides, model: str) -> None:
    """``overrides`` is None or ``{layer name: bits or QuantSpec}`` naming layers of ``model``."""
    from .quant.spec import MAX_BITS, MIN_BITS, QuantSpec

    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict (layer name -> bits or QuantSpec), got {overrides!r} "
                        f"({type(overrides).__name__})")
    valid = weight_layer_names(model)
    for name, value in overrides.items():
        if name not in valid:
            raise ValueError(f"overrides names layer {name!r}, which {model} does not have; valid names: "
                             f"{', '.join(map(repr, valid))}")
        if isinstance(value, QuantSpec):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"overrides[{name!r}] must be a bit-depth (int) or a QuantSpec, got {value!r}")
        check_int(f"overrides[{name!r}]", value, minimum=MIN_BITS, maximum=MAX_BITS)


def check_common(model, dataset, source, seed, quick, verbose) -> None:
    """The arguments every trained-once entry point shares (``dataset`` None: not checked)."""
    from .cache import RECIPES

    check_choice("model", model, RECIPES)
    if dataset is not None:
        check_choice("dataset", dataset, DATASETS)
        check_source(dataset, source)
    check_int("seed", seed, minimum=0, maximum=2**63 - 1)
    if quick is not None:
        check_bool("quick", quick)
    check_bool("verbose", verbose)


def check_compress_arguments(model, dataset, *, source, sparsity, weight_bits, act_bits, method, hardware,
                             device, seed, quick, l1_branch, verbose):
    """Check every argument of :func:`nnlab.pipeline.compress` before any data is loaded or model trained.

    Returns:
        ``(sparsity as float, hardware, torch.device)``, ``hardware``
        defaulting to the Series2NX-like preset.

    Raises:
        ValueError, TypeError: naming the argument, the value and what is allowed.
    """
    from . import nna
    from .cache import check_model_fits
    from .nna.engine import accumulator_width
    from .quant import METHODS
    from .train import resolve_device

    check_common(model, dataset, source, seed, quick, verbose)
    sparsity = check_float("sparsity", sparsity, 0, 1, high_open=True)
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits)
    check_choice("method", method, METHODS)
    check_bool("l1_branch", l1_branch)
    hardware = nna.SERIES2NX if hardware is None else hardware
    if not isinstance(hardware, nna.NNAConfig):
        raise TypeError(f"hardware must be an nnlab.nna.NNAConfig, got {type(hardware).__name__}")
    try:
        accumulator_width(hardware)  # an integer accelerator whose accumulator the engine simulates
    except ValueError as exc:
        raise ValueError(f"hardware: {exc}") from None
    for name, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if not hardware.min_bits <= bits <= hardware.max_bits:
            raise ValueError(f"{name}={bits} is outside what {hardware.name} supports "
                             f"({hardware.min_bits}..{hardware.max_bits} bits)")
    dev = resolve_device(device)
    spec = DATASETS[dataset]
    check_model_fits(model, (spec.channels, spec.size, spec.size), len(spec.classes), dataset)
    return sparsity, hardware, dev


def check_quantised_arguments(model, weight_bits, act_bits, *, method, epochs, sparsity, granularity, overrides,
                              lr, data, device, seed, quick, verbose):
    """Check every argument of :func:`nnlab.quant.pretrained_quantised` before anything is trained.

    Raises:
        ValueError, TypeError: naming the argument, the value and what is allowed.
    """
    from .data import DataBundle
    from .quant import GRANULARITIES, METHODS
    from .train import resolve_device

    check_common(model, None, None, seed, quick, verbose)
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits, optional=True)
    check_choice("method", method, METHODS + ("ptq",))
    if epochs is not None:
        check_positive_int("epochs", epochs)
    if sparsity is not None:
        check_float("sparsity", sparsity, 0, 1, high_open=True)
    check_choice("granularity", granularity, GRANULARITIES)
    check_float("lr", lr, 0, None, low_open=True)
    if data is not None and not isinstance(data, DataBundle):
        raise TypeError(f"data must be a DataBundle from nnlab.data.load_data, got {type(data).__name__}")
    check_overrides(overrides, model)
    resolve_device(device)
