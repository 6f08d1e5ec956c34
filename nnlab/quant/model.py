"""Quantising a whole network: attach quantisers, calibrate, freeze, inspect.

:func:`quantise_model` is post-training quantisation in one call
(:func:`attach_quantisers` then :func:`calibrate`).  The result is an
ordinary ``nn.Module`` (a ``torch.fx.GraphModule`` when activations are
quantised: the model's traced data flow with the quantisers inserted, see
:mod:`nnlab.quant`): evaluate it, retrain it (:mod:`nnlab.quant.retraining`)
or hand it to the NNA simulator.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pandas as pd
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize, prune

from .. import graph
from .._deprecated import renamed
from .._args import check_choice, check_positive_int
from ..base import loader_of, resolve_device, unwrap
from .modules import ACT_METHODS, ActQuantiser, FixedMask, WeightQuantiser
from .spec import GRANULARITIES, QuantSpec
from .tensor import SCALE_METHODS, check_finite_parameters, fake_quantise

__all__ = ["INPUT_QUANTISER", "WEIGHT_LAYERS", "weight_layers", "weight_quantiser", "act_quantisers",
           "attach_quantisers", "calibrate", "quantise_model", "freeze", "describe_quantisers", "distinct_values",
           "quantised_weight", "act_quantiser_names", "quantiser_input"]

#: Layer types whose weights are quantised.
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
#: Name of the activation quantiser placed in front of the first layer.
INPUT_QUANTISER = "input_quant"

#: Deprecated names (old -> new), served with a DeprecationWarning until the next release:
#: American spellings, and ``describe`` (``nnlab.nna.describe`` describes a compiled program).
RENAMED = {"INPUT_QUANTIZER": "INPUT_QUANTISER", "weight_quantizer": "weight_quantiser",
           "act_quantizers": "act_quantisers", "act_quantizer_names": "act_quantiser_names",
           "describe": "describe_quantisers"}
__getattr__ = renamed(__name__, RENAMED, globals())
_ACT_SUFFIX = "_quant"


def weight_layers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The Conv2d and Linear layers of ``model`` by name, in module order.

    Args:
        model: any ``nn.Module`` (a DistributedDataParallel wrapper: the model inside it).

    Returns:
        An OrderedDict ``name -> layer`` (names as in ``model.named_modules()``).
    """
    return OrderedDict((n, m) for n, m in unwrap(model).named_modules() if isinstance(m, WEIGHT_LAYERS))


def weight_quantiser(layer: nn.Module) -> WeightQuantiser | None:
    """The :class:`WeightQuantiser` on ``layer.weight``, or None if the weight is not quantised."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:
        if isinstance(p, WeightQuantiser):
            return p
    return None


def _flow_order(model: nn.Module):
    """``(name, module)`` pairs in data-flow order: graph order for a GraphModule, module order otherwise."""
    model = unwrap(model)
    if not isinstance(model, fx.GraphModule):
        yield from model.named_modules()
        return
    seen = set()
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            seen.add(node.target)
            yield node.target, model.get_submodule(node.target)


def act_quantisers(model: nn.Module) -> "OrderedDict[str, ActQuantiser]":
    """The activation quantisers of ``model`` (or of the model inside a DDP wrapper) by name, in data-flow order."""
    return OrderedDict((n, m) for n, m in _flow_order(model) if isinstance(m, ActQuantiser))


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
    q = weight_quantiser(layer)
    if q is None:
        raise ValueError(f"{type(layer).__name__} layer has no WeightQuantiser on its weight; "
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


def _placements(model: nn.Module) -> list:
    """Where :func:`attach_quantisers` puts activation quantisers: ``(graph module, [(node, name, non-negative)])``.

    Read from the model's graph (:mod:`nnlab.graph`): one quantiser on the
    input, and one at the end (the ``tail``) of every step that computes a
    new tensor: a Conv2d/Linear with its batch norm, activations and max
    pool, an add, a concat, an average pool.  The last Conv2d/Linear, whose
    output only reaches the model's output, is not quantised (its sums are
    the logits).
    """
    gm = graph.trace(model)
    ops = graph.classify(gm)
    steps = graph.fuse(ops)
    nonneg = graph.nonnegative(ops)
    taken = set(dict(gm.named_modules()))
    places = []
    for step in steps:
        if step.kind == "input":
            name = INPUT_QUANTISER
        elif step.kind in graph.PRODUCERS:
            if step.kind in ("conv2d", "linear") and graph.reaches_output_only(step.tail, ops):
                continue
            name = graph.quantiser_name(step.tail)
        else:
            continue
        if name in taken:
            raise ValueError(f"cannot name the activation quantiser after node {step.tail.name!r} {name!r}: "
                             f"the model already has a module of that name")
        taken.add(name)
        places.append((step.tail, name, nonneg[step.tail]))
    return gm, places


def act_quantiser_names(model: nn.Module) -> list:
    """Names of the activation quantisers of ``model`` (keys for ``act_overrides``), in data-flow order.

    For a float model: the names :func:`attach_quantisers` gives them,
    ``"input_quant"`` first, then ``"<node>_quant"`` for each node a
    quantiser follows (see :mod:`nnlab.quant`).  For a quantised model: the
    names of its quantisers.

    Raises:
        nnlab.graph.GraphError: the model cannot be traced, or has a node
            nnlab does not support.
    """
    model = unwrap(model)
    existing = act_quantisers(model)
    if existing:
        return list(existing)
    return [name for _, name, _ in _placements(model)[1]]


def _insert_act_quantisers(model: nn.Module, make) -> fx.GraphModule:
    """The graph of ``model`` with ``make(name, non_negative)`` inserted after each placement (None: skipped)."""
    gm, places = _placements(model)
    for tail, name, nonneg in places:
        quantiser = make(name, nonneg)
        if quantiser is None:
            continue
        gm.add_submodule(name, quantiser)
        with gm.graph.inserting_after(tail):
            node = gm.graph.call_module(name, (tail,))
        tail.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.graph.lint()
    gm.recompile()
    return gm


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

    Weights: every Conv2d/Linear gets a :class:`WeightQuantiser`
    parametrization whose scale is computed from its weight now.  A layer
    pruned with ``torch.nn.utils.prune`` keeps its mask as a
    :class:`FixedMask` parametrization applied first, so pruned weights stay
    exactly zero.

    Activations (when ``act_bits`` or ``act_overrides`` is given): the model
    is traced (:mod:`nnlab.graph`) and an :class:`ActQuantiser` goes on every
    edge where the NNA stores a tensor: ``"input_quant"`` on the input, and
    ``"<node>_quant"`` after each Conv2d/Linear with what fuses into it
    (batch norm, ReLU/ReLU6/Hardtanh, a max pool), each add, concat and
    average pool.  The last Conv2d/Linear (the logits) is not quantised.  A
    quantiser after a ReLU-like clamp (or after values that stay >= 0) is
    unsigned with zero point 0; the others (the input, a layer without
    activation) have a zero point.  In LeNet-5 they are ``input_quant``,
    ``pool1_quant``, ``pool2_quant``, ``relu3_quant`` and ``relu4_quant``:
    after a max pool that follows a ReLU, since max pooling commutes with
    rounding.  The result is then a ``torch.fx.GraphModule`` (class name
    that of ``model``): layers keep their names (``get_submodule("conv2")``,
    ``get_submodule("layer1.0.conv1")``), indexing such as ``model[0]``
    is gone.  Without activation quantisation the result is a copy of
    ``model`` itself, of its own class.

    Args:
        model: the float network: any ``nn.Module``; with activation
            quantisation, one ``torch.fx`` can trace, made of the operations
            in :data:`nnlab.graph.SUPPORTED`.
        weight_bits: bit-depth of every weight (2..16), or None to leave
            weights float.
        act_bits: bit-depth of activations (2..16), or None to leave them float.
        granularity: ``"per_channel"`` or ``"per_tensor"`` weight scales.
        narrow_range: symmetric weight grid without its most negative level.
        weight_method: ``"max"``, ``"percentile"`` or ``"mse"`` weight scales.
        act_method: ``"max"`` or ``"percentile"`` activation ranges.
        overrides: per-layer weight choice, ``{"conv1": 8, "fc3": QuantSpec(...)}``
            (a bit-depth or a full QuantSpec), keyed by Conv2d/Linear name.
        act_overrides: per-quantiser activation bits or spec (None: no
            quantiser there), keyed by the quantiser's name (see
            :func:`act_quantiser_names`), e.g. ``{"input_quant": 8, "pool1_quant": 6}``.
        inplace: parametrize the layers of ``model`` itself instead of a deep
            copy's (with activation quantisers, the returned GraphModule
            shares those layers).

    Returns:
        The quantised model (in eval mode).  Run :func:`calibrate` before use
        when activations are quantised.

    Raises:
        TypeError, ValueError: bad bit-depths, an unknown granularity or
            method, an override naming a layer or quantiser that does not
            exist, an already quantised model, a weight, bias or buffer
            holding NaN or infinite values (named).
        nnlab.graph.GraphError: activation quantisation of a model that
            cannot be traced, or with a node nnlab does not support (the
            message names the node).
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
    if any(isinstance(m, (WeightQuantiser, ActQuantiser)) for m in model.modules()):
        raise ValueError("model is already quantised (it has WeightQuantiser/ActQuantiser modules)")
    check_finite_parameters(model)  # NaN or infinity: refused here, naming the layer, not rounded onto a grid
    quantise_activations = act_bits is not None or bool(act_overrides)
    if quantise_activations:  # trace and check every node before anything changes
        act_overrides = _check_overrides("act_overrides", act_overrides, act_quantiser_names(model))

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
            layer, "weight", WeightQuantiser(spec, layer.weight.detach(), method=weight_method,
                                             label=f"the weight of layer {name!r}"))

    if quantise_activations:
        def make(name, non_negative):
            value = act_overrides.get(name, act_bits)
            if value is None:
                return None
            if isinstance(value, QuantSpec):
                spec = value
            elif non_negative:
                spec = QuantSpec.for_activations(value)
            else:
                spec = QuantSpec.for_inputs(value)
            return ActQuantiser(spec, method=act_method, label=f"the activations at {name!r}")
        device = next(model.parameters()).device
        model = _insert_act_quantisers(model, make).to(device)
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
        The same model, in eval mode, with every ActQuantiser quantising.
    """
    check_positive_int("batches", batches)
    # Run the network inside a DDP wrapper: the wrapper's forward passes would overwrite
    # each rank's observed ranges with rank 0's before every batch.
    net = unwrap(model)
    quantisers = act_quantisers(net)
    if not quantisers:
        return model.eval()
    dev = resolve_device(device, model)
    loader = loader_of(data, "train")
    for name, q in quantisers.items():
        q.label = f"the activations at {name!r}"
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
    for q in quantisers.values():
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
        The quantised model, an ordinary ``nn.Module`` in eval mode (a
        ``torch.fx.GraphModule`` when activations are quantised; see
        :func:`attach_quantisers`).

    Raises:
        TypeError, ValueError, nnlab.graph.GraphError: as :func:`attach_quantisers`.

    Example:
        >>> q = quantise_model(net, data, weight_bits=4, act_bits=8, overrides={"conv1": 8})
        >>> nnlab.train.accuracy(q, data)
    """
    qmodel = attach_quantisers(model, weight_bits, act_bits, **options)
    return calibrate(qmodel, data, calibration_batches, device=device)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Clamp every quantised weight to its nearest grid level, for good (the end of retraining).

    For each WeightQuantiser: the scale is recomputed from the final weight
    (a learned scale is kept as learned and becomes a buffer again), the
    quantised values are written into the stored (original) weight, and the
    scale stops tracking the weights.  Learned activation scales become
    buffers again too.  The stored weights then hold at
    most ``2**bits`` distinct values per channel (per tensor), pruned zeros
    included as exact zeros.

    Args:
        model: a quantised model.

    Returns:
        The same model, in eval mode.
    """
    for layer in weight_layers(model).values():
        q = weight_quantiser(layer)
        if q is None:
            continue
        w = quantiser_input(layer)
        if q.learning:
            q.fix_scale()  # keep the learned step: it is the grid the network was trained for
        else:
            q.observe(w)
        layer.parametrizations.weight.original.copy_(fake_quantise(w, q.spec, q.scale, q.zero_point))
        q.track = False
        q.set_subset(None)
    for a in act_quantisers(model).values():
        a.fix_scale()
    return model.eval()


@torch.no_grad()
def quantiser_input(layer: nn.Module) -> torch.Tensor:
    """The weight a layer's WeightQuantiser receives: the stored weight through what comes before it (a pruning mask).

    Args:
        layer: a Conv2d or Linear layer with a :class:`WeightQuantiser`.

    Returns:
        A tensor shaped like the weight (no autograd history).

    Raises:
        ValueError: the layer's weight is not quantised.
    """
    q = weight_quantiser(layer)
    if q is None:
        raise ValueError(f"{type(layer).__name__} layer has no WeightQuantiser on its weight")
    chain = layer.parametrizations.weight
    w = chain.original
    for p in chain:  # everything before the quantiser (e.g. the pruning mask)
        if p is q:
            break
        w = p(w)
    return w.detach()


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
        q = weight_quantiser(layer)
        with torch.no_grad():
            w = layer.weight.detach()
        per_channel = max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1))
        rows.append({"layer": name, "bits": None if q is None else q.spec.bits,
                     "distinct": len(torch.unique(w)), "max_per_channel": per_channel,
                     "zeros": int((w == 0).sum()), "weights": w.numel()})
    return pd.DataFrame(rows)


def describe_quantisers(model: nn.Module) -> pd.DataFrame:
    """One row per quantiser in data-flow order: what it quantises and on which grid.

    Args:
        model: a quantised model.

    Returns:
        DataFrame with columns ``name`` (the layer, or the activation
        quantiser), ``kind`` (``"weight"``/``"activation"``), ``bits``,
        ``spec`` (readable), ``scale`` (the single scale, or the mean of the
        per-channel scales), ``zero_point`` and ``levels``.
    """
    rows = []
    for name, m in _flow_order(model):
        q, kind = None, None
        if isinstance(m, WEIGHT_LAYERS):
            q, kind = weight_quantiser(m), "weight"
        elif isinstance(m, ActQuantiser):
            q, kind = m, "activation"
        if q is None:
            continue
        rows.append({"name": name, "kind": kind, "bits": q.spec.bits, "spec": str(q.spec),
                     "scale": float(q.scale.float().mean()), "zero_point": int(q.zero_point.flatten()[0]),
                     "levels": q.spec.levels})
    return pd.DataFrame(rows, columns=["name", "kind", "bits", "spec", "scale", "zero_point", "levels"])
