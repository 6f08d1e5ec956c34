"""Quantising a whole network: attach quantisers, calibrate, freeze, inspect.

:func:`quantise_model` is post-training quantisation in one call
(:func:`attach_quantisers` then :func:`calibrate`).  The result is an
ordinary ``nn.Module``: evaluate it, retrain it (:mod:`nnlab.quant.retraining`)
or hand it to the NNA simulator.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .._args import check_choice, check_positive_int
from ..distributed import unwrap
from ..train import resolve_device
from .modules import ACT_METHODS, ActQuantizer, FixedMask, WeightQuantizer
from .spec import GRANULARITIES, QuantSpec
from .tensor import SCALE_METHODS, fake_quantise

__all__ = ["INPUT_QUANTIZER", "WEIGHT_LAYERS", "weight_layers", "weight_quantizer", "act_quantizers",
           "attach_quantisers", "calibrate", "quantise_model", "freeze", "describe", "distinct_values",
           "quantised_weight", "act_quantizer_names"]

#: Layer types whose weights are quantised.
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
#: Name of the activation quantiser placed in front of the first layer.
INPUT_QUANTIZER = "input_quant"
_ACT_SUFFIX = "_quant"


def weight_layers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The Conv2d and Linear layers of ``model`` by name, in module order.

    Args:
        model: any ``nn.Module`` (a DistributedDataParallel wrapper: the model inside it).

    Returns:
        An OrderedDict ``name -> layer`` (names as in ``model.named_modules()``).
    """
    return OrderedDict((n, m) for n, m in unwrap(model).named_modules() if isinstance(m, WEIGHT_LAYERS))


def weight_quantizer(layer: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` on ``layer.weight``, or None if the weight is not quantised."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def act_quantizers(model: nn.Module) -> "OrderedDict[str, ActQuantizer]":
    """The activation quantisers of ``model`` (or of the model inside a DDP wrapper) by name, in data-flow order."""
    return OrderedDict((n, m) for n, m in unwrap(model).named_modules() if isinstance(m, ActQuantizer))


def quantised_weight(layer: nn.Module):
    """What the simulator stores for a layer: integer codes and the grid they live on.

    Args:
        layer: a Conv2d or Linear layer of a quantised model.

    Returns:
        ``(codes, spec, scale, zero_point)``: int32 codes shaped like the
        weight, the QuantSpec, the float32 scale and the int32 zero point
        (0-dim or per output channel).  ``layer.weight`` equals
        ``dequantise(codes, spec, scale, zero_point)``.

    Raises:
        ValueError: the layer's weight is not quantised.
    """
    q = weight_quantizer(layer)
    if q is None:
        raise ValueError(f"{type(layer).__name__} layer has no WeightQuantizer on its weight; "
                         f"quantise the model first (nnlab.quant.quantise_model)")
    with torch.no_grad():
        w = layer.weight
        # layer.weight is already on the grid; quantising it again recovers its integers.
        return q.codes(w), q.spec, q.scale.clone(), q.zero_point.clone()


def _mask_to_parametrization(layer: nn.Module) -> None:
    """Turn a torch prune mask (weight_orig, weight_mask, pre-hook) into a FixedMask parametrization."""
    if not (hasattr(layer, "weight_orig") and hasattr(layer, "weight_mask")):
        return
    mask = layer.weight_mask.detach().clone()
    prune.remove(layer, "weight")  # weight = weight_orig * mask becomes the plain parameter
    parametrize.register_parametrization(layer, "weight", FixedMask(mask))


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also works for pruned layers.

    torch.nn.utils.prune keeps ``weight = weight_orig * weight_mask`` as a plain
    attribute that may carry autograd history, which deepcopy refuses; it is
    recomputed here without history (its pre-hook recomputes it at every
    forward pass anyway).
    """
    with torch.no_grad():
        for layer in model.modules():
            for hook in layer._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(layer, hook._tensor_name, hook.apply_mask(layer))
    return copy.deepcopy(model)


def _weight_spec(bits, granularity, narrow_range, value, name):
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"overrides[{name!r}] must be a bit-depth (int) or a QuantSpec, got {value!r}")
    return QuantSpec.for_weights(value, granularity=granularity, narrow_range=narrow_range)


def _check_overrides(arg, overrides, valid):
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"{arg} must be a dict (layer name -> bits or QuantSpec), got {type(overrides).__name__}")
    for name in overrides:
        if name not in valid:
            raise ValueError(f"{arg} names layer {name!r}, which is not a layer this applies to; "
                             f"valid names: {', '.join(map(repr, valid)) or 'none'}")
    return overrides


def _act_positions(seq: nn.Sequential, prefix=""):
    """Names of the children of ``seq`` (and nested Sequentials) that an ActQuantizer follows.

    The quantiser follows each ReLU, or the MaxPool2d right after it: max
    pooling commutes with rounding onto a grid (both are monotone), so the
    values are identical and a quarter as many get quantised.
    """
    names, items = [], list(seq._modules.items())
    for i, (name, child) in enumerate(items):
        if isinstance(child, nn.ReLU):
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if not isinstance(nxt, nn.MaxPool2d):
                names.append(f"{prefix}{name}")
        elif isinstance(child, nn.MaxPool2d) and i > 0 and isinstance(items[i - 1][1], nn.ReLU):
            names.append(f"{prefix}{name}")
        elif isinstance(child, nn.Sequential):
            names += _act_positions(child, f"{prefix}{name}.")
    return names


def act_quantizer_names(model: nn.Module) -> list:
    """Names the activation quantisers of ``model`` get (keys for ``act_overrides``), in order.

    ``"input_quant"`` first, then ``"<n>_quant"`` for each module ``<n>`` a
    quantiser follows: a ReLU, or the MaxPool2d directly after a ReLU.
    """
    if not isinstance(model, nn.Sequential):
        return []
    return [INPUT_QUANTIZER] + [n + _ACT_SUFFIX for n in _act_positions(model)]


def _insert_act_quantizers(seq: nn.Sequential, make, positions, prefix="", top=True):
    """Rebuild ``seq``'s children with an ActQuantizer after each of ``positions`` (and at the input if top)."""
    children = OrderedDict()
    if top:
        children[INPUT_QUANTIZER] = make(INPUT_QUANTIZER)
    for name, child in seq._modules.items():
        children[name] = child
        full = f"{prefix}{name}"
        if full in positions:
            children[name + _ACT_SUFFIX] = make(full + _ACT_SUFFIX)
        elif isinstance(child, nn.Sequential):
            _insert_act_quantizers(child, make, positions, prefix=f"{full}.", top=False)
    seq._modules = children


def attach_quantisers(
    model: nn.Module,
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    *,
    granularity: str = "per_channel",
    narrow_range: bool = True,
    weight_method: str = "max",
    act_method: str = "max",
    overrides: dict | None = None,
    act_overrides: dict | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Put weight and activation quantisers into (a copy of) ``model``; activations start in calibration mode.

    Weights: every Conv2d/Linear gets a :class:`WeightQuantizer`
    parametrization whose scale is computed from its weight now.  A layer
    pruned with ``torch.nn.utils.prune`` keeps its mask as a
    :class:`FixedMask` parametrization applied first, so pruned weights stay
    exactly zero.  Activations (when ``act_bits`` is given): an
    :class:`ActQuantizer` named ``"input_quant"`` in front of the first layer
    (asymmetric: normalised images are signed) and one after each ReLU
    (unsigned, zero point 0), named ``"<n>_quant"`` after the module ``<n>``
    it follows: the ReLU, or the MaxPool2d right after it (pooling commutes
    with rounding, so the values are the same and 4x fewer are quantised).
    Original layers keep their names, but positional indices shift
    (``model[0]`` is now the input quantiser): use ``get_submodule("conv2")``.

    Args:
        model: the float network; activation quantisation needs an
            ``nn.Sequential`` (LeNet-5, LeNet-300-100 and VGGSmall are).
        weight_bits: bit-depth of every weight (2..16), or None to leave
            weights float.
        act_bits: bit-depth of activations (2..16), or None to leave them float.
        granularity: ``"per_channel"`` or ``"per_tensor"`` weight scales.
        narrow_range: symmetric weight grid without its most negative level.
        weight_method: ``"max"``, ``"percentile"`` or ``"mse"`` weight scales.
        act_method: ``"max"`` or ``"percentile"`` activation ranges.
        overrides: per-layer weight choice, ``{"conv1": 8, "fc3": QuantSpec(...)}``
            (a bit-depth or a full QuantSpec), keyed by Conv2d/Linear name.
        act_overrides: per-quantiser activation bits or spec, keyed by the
            quantiser's name (see :func:`act_quantizer_names`), e.g.
            ``{"input_quant": 8, "pool1_quant": 6}``.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The quantised model (in eval mode).  Run :func:`calibrate` before use
        when ``act_bits`` is set.

    Raises:
        TypeError, ValueError: bad bit-depths, an unknown granularity or
            method, an override naming a layer that does not exist, or
            activation quantisation of a model that is not an nn.Sequential.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)  # a DDP wrapper cannot be copied: quantise the network inside it
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("weight_method", weight_method, SCALE_METHODS)
    check_choice("act_method", act_method, ACT_METHODS)
    if weight_bits is not None:
        QuantSpec.for_weights(weight_bits)  # validates bits with a clear message
    if act_bits is not None:
        QuantSpec.for_activations(act_bits)
    layers = weight_layers(model)
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to quantise")
    overrides = _check_overrides("overrides", overrides, list(layers))
    for name, value in overrides.items():
        _weight_spec(weight_bits, granularity, narrow_range, value, name)
    if any(isinstance(m, (WeightQuantizer, ActQuantizer)) for m in model.modules()):
        raise ValueError("model is already quantised (it has WeightQuantizer/ActQuantizer modules)")
    if act_bits is not None or act_overrides:
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"activation quantisation needs an nn.Sequential model, got {type(model).__name__}; "
                             f"pass act_bits=None to quantise the weights only")
    act_overrides = _check_overrides("act_overrides", act_overrides, act_quantizer_names(model))

    if not inplace:
        model = _deepcopy(model)
    layers = weight_layers(model)
    for name, layer in layers.items():
        value = overrides.get(name, weight_bits)
        if value is None:
            continue
        spec = _weight_spec(weight_bits, granularity, narrow_range, value, name)
        _mask_to_parametrization(layer)
        parametrize.register_parametrization(
            layer, "weight", WeightQuantizer(spec, layer.weight.detach(), method=weight_method))

    if act_bits is not None or act_overrides:
        def make(name):
            value = act_overrides.get(name, act_bits)
            if isinstance(value, QuantSpec):
                spec = value
            elif value is None:
                return nn.Identity()
            elif name == INPUT_QUANTIZER:
                spec = QuantSpec.for_inputs(value)
            else:
                spec = QuantSpec.for_activations(value)
            return ActQuantizer(spec, method=act_method)
        _insert_act_quantizers(model, make, set(_act_positions(model)))
        device = next(model.parameters()).device
        model.to(device)
    return model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, data, batches: int = 4, *, device=None, seed: int = 0,
              sync_ranks: bool | None = None) -> nn.Module:
    """Measure activation ranges on a few training batches and fix the activation grids.

    Args:
        model: a model from :func:`attach_quantisers`.
        data: a DataBundle (its ``train`` loader is used) or a DataLoader.
        batches: how many batches to run (positive integer).
        device: where to run; default where the model is.
        seed: seeds the batch order, without touching torch's global RNG state.
        sync_ranks: combine the ranges every rank of a ``torch.distributed``
            group observed (all-reduce), so all ranks get the same grids.
            Default: whenever a process group is initialised; every rank must
            then call ``calibrate``.  With
            :func:`nnlab.distributed.distributed_loader` each rank calibrates
            on its own images and the ranges cover them all.

    Returns:
        The same model, in eval mode, with every ActQuantizer quantising.
    """
    check_positive_int("batches", batches)
    # Run the network inside a DDP wrapper: the wrapper's forward passes would overwrite
    # each rank's observed ranges with rank 0's before every batch.
    net = unwrap(model)
    quantizers = act_quantizers(net)
    if not quantizers:
        return model.eval()
    if device is None:
        device = next(model.parameters()).device
    dev = resolve_device(device)
    loader = data.train if hasattr(data, "train") and hasattr(data, "description") else data
    for q in quantizers.values():
        q.start_calibration()
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seen = 0
        for x, _ in loader:
            net(x.to(dev))
            seen += 1
            if seen >= batches:
                break
    if seen == 0:
        raise ValueError("data has no batches to calibrate on")
    for q in quantizers.values():
        q.end_calibration(sync_ranks=sync_ranks)
    return model


def quantise_model(
    model: nn.Module,
    data,
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    *,
    calibration_batches: int = 4,
    device=None,
    **options,
) -> nn.Module:
    """Post-training quantisation: a quantised copy of ``model``, activations calibrated on ``data``.

    Args:
        model: the trained float network (left unchanged).
        data: DataBundle or loader for calibration (training images).
        weight_bits: weight bit-depth (2..16) or None for float weights.
        act_bits: activation bit-depth (2..16) or None for float activations.
        calibration_batches: batches used to measure activation ranges.
        device: where to calibrate; default where the model is.
        **options: ``granularity``, ``narrow_range``, ``weight_method``,
            ``act_method``, ``overrides``, ``act_overrides`` as for
            :func:`attach_quantisers`.

    Returns:
        The quantised model, an ordinary ``nn.Module`` in eval mode.

    Example:
        >>> q = quantise_model(net, data, weight_bits=4, act_bits=8, overrides={"conv1": 8})
        >>> nnlab.train.accuracy(q, data)
    """
    qmodel = attach_quantisers(model, weight_bits, act_bits, **options)
    return calibrate(qmodel, data, calibration_batches, device=device)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Clamp every quantised weight to its nearest grid level, for good (the end of retraining).

    For each WeightQuantizer: the scale is recomputed from the final weight,
    the quantised values are written into the stored (original) weight, and
    the scale stops tracking the weights.  The stored weights then hold at
    most ``2**bits`` distinct values per channel (per tensor), pruned zeros
    included as exact zeros.

    Args:
        model: a quantised model.

    Returns:
        The same model, in eval mode.
    """
    for layer in weight_layers(model).values():
        q = weight_quantizer(layer)
        if q is None:
            continue
        chain = layer.parametrizations.weight
        w = chain.original
        for p in chain:  # everything before the quantiser (e.g. the pruning mask)
            if p is q:
                break
            w = p(w)
        q.observe(w)
        chain.original.copy_(fake_quantise(w, q.spec, q.scale, q.zero_point))
        q.track = False
        q.set_subset(None)
    return model.eval()


def distinct_values(model: nn.Module) -> pd.DataFrame:
    """How many distinct weight values each layer (and at most each channel) holds, and its zeros.

    Args:
        model: any model (quantised or not).

    Returns:
        DataFrame with columns ``layer``, ``bits`` (None if float),
        ``distinct`` (whole layer), ``max_per_channel`` (largest count in one
        output channel), ``zeros`` (exact zeros) and ``weights``.
    """
    rows = []
    for name, layer in weight_layers(model).items():
        q = weight_quantizer(layer)
        with torch.no_grad():
            w = layer.weight.detach()
        per_channel = max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1))
        rows.append({"layer": name, "bits": None if q is None else q.spec.bits,
                     "distinct": len(torch.unique(w)), "max_per_channel": per_channel,
                     "zeros": int((w == 0).sum()), "weights": w.numel()})
    return pd.DataFrame(rows)


def describe(model: nn.Module) -> pd.DataFrame:
    """One row per quantiser in module order: what it quantises and on which grid.

    Args:
        model: a quantised model.

    Returns:
        DataFrame with columns ``name`` (the layer, or the activation
        quantiser), ``kind`` (``"weight"``/``"activation"``), ``bits``,
        ``spec`` (readable), ``scale`` (the single scale, or the mean of the
        per-channel scales), ``zero_point`` and ``levels``.
    """
    rows = []
    for name, m in unwrap(model).named_modules():
        q, kind = None, None
        if isinstance(m, WEIGHT_LAYERS):
            q, kind = weight_quantizer(m), "weight"
        elif isinstance(m, ActQuantizer):
            q, kind = m, "activation"
        if q is None:
            continue
        rows.append({"name": name, "kind": kind, "bits": q.spec.bits, "spec": str(q.spec),
                     "scale": float(q.scale.float().mean()), "zero_point": int(q.zero_point.flatten()[0]),
                     "levels": q.spec.levels})
    return pd.DataFrame(rows, columns=["name", "kind", "bits", "spec", "scale", "zero_point", "levels"])
