"""Checks that run before any work: every argument of a long-running entry point, all at once.

A bad argument must be refused before the first epoch, not after three
trained stages.  Each function here checks everything its entry point will
need (bit-depths against the accelerator, layer names against the model,
the model against the data set's image size ...) without loading data or
training anything, and raises an error that names the argument, the bad
value and what is allowed.
"""

from __future__ import annotations

import copy
import numbers

from ._args import check_bool, check_choice, check_float, check_int, check_positive_int
from ._catalogue import DATASETS, FACTORY_FORM, RECIPES, SOURCES, parse_model_argument
from .base import resolve_device

__all__ = ["parse_model_argument", "check_model_fits", "model_kwargs", "resolve_model", "check_module_fits", "check_compress_arguments",
           "check_quantised_arguments", "check_bits", "check_common", "check_overrides", "check_source",
           "weight_layer_names"]


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
    # lazy: quant.spec loads PyTorch; the command line checks its options before that
    from .quant.spec import MAX_BITS, MIN_BITS

    if bits is None and optional:
        return None
    return check_int(name, bits, minimum=MIN_BITS, maximum=MAX_BITS)


def weight_layer_names(model: str) -> list:
    """Names of the Conv2d and Linear layers of the zoo model ``model`` (built untrained, in a second)."""
    # lazy: PyTorch and the models load only once the cheap checks have passed
    import torch
    from torch import nn

    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        net = build_model(model)
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_overrides(overrides, model: str) -> None:
    """``overrides`` is None or ``{layer name: bits or QuantSpec}`` naming layers of ``model``."""
    # lazy: quant.spec loads PyTorch; the command line checks its options before that
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


def check_common(model, dataset, source, seed, quick, verbose, *, module_allowed: bool = False) -> None:
    """The arguments every trained-once entry point shares (``dataset`` None: not checked).

    ``model`` must be a registered name; with ``module_allowed``, an
    ``nn.Module`` passes too (checked by :func:`check_module_fits`).
    """
    if not (module_allowed and not isinstance(model, str)):
        check_choice("model", model, RECIPES)
    if dataset is not None:
        check_choice("dataset", dataset, DATASETS)
        check_source(dataset, source)
    check_int("seed", seed, minimum=0, maximum=2**63 - 1)
    if quick is not None:
        check_bool("quick", quick)
    check_bool("verbose", verbose)


def model_kwargs(model: str, input_shape: tuple) -> dict:
    """The constructor arguments that adapt ``model`` to images of ``input_shape`` ``(C, H, W)``."""
    # lazy: models loads PyTorch; the command line checks its options before that
    from .models import data_kwargs

    return data_kwargs(model, input_shape)


def check_model_fits(model: str, input_shape: tuple, num_classes: int = 10, dataset: str | None = None) -> None:
    """Refuse, before any training, a model that cannot take images of ``input_shape``.

    Builds ``model`` (untrained) and runs one blank image through it.

    Raises:
        ValueError: naming the model, the image shape and the data set.
    """
    # lazy: PyTorch and the models load only once the cheap checks have passed
    import torch

    from .models import build_model

    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the caller's random state alone
            net = build_model(model, num_classes=num_classes, **model_kwargs(model, input_shape))
            out = net.eval()(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        what = f"the {dataset} images" if dataset else "images"
        shape = "x".join(str(d) for d in input_shape)
        raise ValueError(f"model={model!r} cannot take {what} ({shape}): {' '.join(str(exc).split())[:160] or type(exc).__name__}; choose a model "
                         f"built for this image size (e.g. 'vgg-cifar' for 3x32x32, 'lenet5' for 1x28x28)") from None
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(f"model={model!r} gives outputs of shape {tuple(out.shape)} for {num_classes} classes")


def check_module_fits(module, input_shape: tuple, num_classes: int, dataset: str | None = None) -> None:
    """Refuse, before any training, an ``nn.Module`` nnlab cannot compress for images of ``input_shape``.

    A copy of ``module`` runs one blank image (in eval mode) and must give
    ``num_classes`` outputs; it must have a Conv2d or Linear layer, and its
    traced graph (:mod:`nnlab.graph`) must hold only operations the
    quantisers and the NNA compiler support.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: it cannot take the images, gives another number of
            outputs, or has no layer to quantise.
        nnlab.graph.GraphError: it cannot be traced, or a node is not
            supported (the message names the node and its operation).
    """
    # lazy: PyTorch and quant load only once the cheap checks have passed
    import torch
    from torch import nn

    from .quant import act_quantiser_names

    if not isinstance(module, nn.Module):
        raise TypeError(f"model must be a model name, {FACTORY_FORM} or a torch.nn.Module, got "
                        f"{type(module).__name__}")
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()):
        raise ValueError(f"model {type(module).__name__} has no Conv2d or Linear layer to compress")
    what = f"the {dataset} images" if dataset else "images"
    shape = "x".join(str(d) for d in input_shape)
    net = copy.deepcopy(module).cpu().eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = net(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, TypeError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise ValueError(f"model {type(module).__name__} cannot take {what} ({shape}): {type(exc).__name__}: "
                         f"{text}; adapt its first layer to {input_shape[0]} input channels and its size") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {type(module).__name__} gives outputs of shape {got} for one of {what}, but "
                         f"the data set has {num_classes} classes: (1, {num_classes}) is needed")
    act_quantiser_names(net)  # traces and classifies every node: an unsupported one is named now


def resolve_model(model, seed: int = 0):
    """A model argument as :func:`nnlab.pipeline.compress` uses it: a registered name, or an ``nn.Module``.

    A string ``"file.py:function"`` is built with
    :func:`nnlab.models.from_factory` (seeded with ``seed``).

    Raises:
        TypeError, ValueError, FileNotFoundError, ImportError: as
            :func:`parse_model_argument` and :func:`nnlab.models.from_factory`.
    """
    if isinstance(model, str):
        kind, *_ = parse_model_argument(model)
        if kind == "name":
            return model
        # lazy: models loads PyTorch; a registered model's name needs no PyTorch
        from .models import from_factory

        return from_factory(model, seed=seed)
    # lazy: PyTorch loads only once the cheap checks have passed
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model name, {FACTORY_FORM} or a torch.nn.Module, got {model!r} "
                        f"({type(model).__name__})")
    return model


def check_compress_arguments(model, dataset, *, source, sparsity, weight_bits, act_bits, method, hardware,
                             device, seed, quick, l1, verbose, budget=None, train=True, name=None, sim_images=None,
                             sim_batch_size=250, keep_models=True):
    """Check every argument of :func:`nnlab.pipeline.compress` before any data is loaded or model trained.

    Returns:
        ``(model, sparsity as float, hardware, torch.device)``: ``model``
        a registered name or an ``nn.Module`` (a ``file.py:function`` is
        built here), ``hardware`` defaulting to the Series2NX-like preset.

    Raises:
        ValueError, TypeError: naming the argument, the value and what is allowed.
        FileNotFoundError, ImportError: a ``file.py:function`` whose file is
            missing or cannot be imported.
        nnlab.graph.GraphError: a model with an operation nnlab does not support.
    """
    # lazy: the simulator and quant load PyTorch; the command line checks its options before that
    from . import nna
    from .nna.engine import accumulator_width
    from .quant import METHODS

    check_int("seed", seed, minimum=0, maximum=2**63 - 1)
    model = resolve_model(model, seed)
    check_common(model, dataset, source, seed, quick, verbose, module_allowed=True)
    check_bool("train", train)
    check_bool("keep_models", keep_models)
    if isinstance(model, str) and not train:
        raise ValueError(f"train=False needs an nn.Module (a network you trained yourself); model={model!r} is a "
                         f"registered name, whose baseline is always trained (and cached)")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be None or a non-empty string, got {name!r}")
    if sim_images is not None:  # at most the test set's size: checked once the data set is loaded
        if isinstance(sim_images, bool) or not isinstance(sim_images, numbers.Integral):
            raise TypeError(f"sim_images must be None (every test image) or a positive integer, got {sim_images!r} "
                            f"({type(sim_images).__name__})")
        if sim_images <= 0:
            raise ValueError(f"sim_images must be None (every test image) or a positive integer, got {sim_images}")
    check_positive_int("sim_batch_size", sim_batch_size)
    sparsity = check_float("sparsity", sparsity, 0, 1, high_open=True)
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits)
    check_choice("method", method, METHODS)
    check_bool("l1", l1)
    hardware = nna.SERIES2NX if hardware is None else hardware
    if not isinstance(hardware, nna.NNAConfig):
        raise TypeError(f"hardware must be an nnlab.nna.NNAConfig, got {type(hardware).__name__}")
    try:
        accumulator_width(hardware)  # an integer accelerator whose accumulator the engine simulates
    except ValueError as exc:
        raise ValueError(f"hardware: {exc}") from None
    for arg, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if not hardware.min_bits <= bits <= hardware.max_bits:
            raise ValueError(f"{arg}={bits} is outside what {hardware.name} supports "
                             f"({hardware.min_bits}..{hardware.max_bits} bits)")
    if budget is not None:
        # lazy: the picker loads PyTorch, needed only with a budget
        from .picker import BUDGETS, _budget

        if not isinstance(budget, dict):
            raise TypeError(f"budget must be a dict such as {{'budget_bytes': 20000}}, got {type(budget).__name__}")
        for key in budget:
            check_choice("budget key", key, BUDGETS)
        _budget(budget)
    dev = resolve_device(device)
    spec = DATASETS[dataset]
    shape = (spec.channels, spec.size, spec.size)
    if isinstance(model, str):
        check_model_fits(model, shape, len(spec.classes), dataset)
    else:
        check_module_fits(model, shape, len(spec.classes), dataset)
    return model, sparsity, hardware, dev


def check_quantised_arguments(model, weight_bits, act_bits, *, method, epochs, sparsity, granularity, overrides,
                              lr, data, device, seed, quick, verbose):
    """Check every argument of :func:`nnlab.quant.pretrained_quantised` before anything is trained.

    Raises:
        ValueError, TypeError: naming the argument, the value and what is allowed.
    """
    # lazy: data and quant load PyTorch; the command line checks its options before that
    from .data import DataBundle
    from .quant import GRANULARITIES, METHODS

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
