"""What if the weights had other bit-depths or sparsities?  Re-quantise a compiled program.

:func:`requantise_weights` prunes and re-quantises a program's weights
layer by layer, without the model or data; the explorer widget
(:mod:`nnlab.widgets.nna`) and the bit-depth picker (:mod:`nnlab.picker`)
cost the result with :func:`nnlab.nna.report`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .._args import check_float, check_int
from ..quant.spec import QuantSpec
from .program import Program, WeightLayer, _int_bias, _weight_grid

__all__ = ["requantise_weights"]


def _per_layer(arg, value, names, check):
    if value is None:
        return {}
    if isinstance(value, dict):
        for k in value:
            if k not in names:
                raise ValueError(f"{arg} names layer {k!r}; weight layers: {', '.join(map(repr, names))}")
        return {k: check(f"{arg}[{k!r}]", v) for k, v in value.items()}
    return {k: check(arg, value) for k in names}


def requantise_weights(program: Program, weight_bits=None, sparsity=None) -> Program:
    """A copy of ``program`` with weights pruned further and re-quantised to other bit-depths.

    For each weight layer named in the arguments: the real weights
    (``weight * weight_grid.scale``) lose their smallest-magnitude entries until a
    share ``sparsity`` of the layer is zero (a layer already sparser stays as
    it is), then are rounded onto a symmetric, narrow-range, per-channel grid
    of ``weight_bits`` bits (scale: the channel's largest magnitude); the
    bias is re-expressed on the new accumulator scale.  Activations keep
    their grids.  Start from a program compiled at high precision (e.g. 16-bit
    weights) so rounding is not applied twice.

    Args:
        program: a compiled program.
        weight_bits: one bit-depth (2..16) for every layer, or a dict layer name -> bits.
        sparsity: one share of zeros in [0, 1) for every layer, or a dict layer name -> share.

    Returns:
        A new :class:`Program`.
    """
    names = [layer.name for layer in program.weight_layers]
    bits = _per_layer("weight_bits", weight_bits, names, lambda a, v: check_int(a, v, minimum=2, maximum=16))
    share = _per_layer("sparsity", sparsity, names, lambda a, v: check_float(a, v, 0.0, 1.0, high_open=True))
    layers = []
    for layer in program.layers:
        if not isinstance(layer, WeightLayer) or (layer.name not in bits and layer.name not in share):
            layers.append(layer)
            continue
        b = bits.get(layer.name, layer.weight_bits)
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        in_scale = np.float64(layer.in_grid.scale)
        old_scale = layer.weight_grid.scale.astype(np.float64)
        w = layer.weight.astype(np.float64) * old_scale.reshape(shape)
        if layer.name in share:
            k = int(round(share[layer.name] * w.size))
            if k > np.count_nonzero(w == 0):
                order = np.argsort(np.abs(w), axis=None, kind="stable")
                w.reshape(-1)[order[:k]] = 0.0
        spec = QuantSpec.for_weights(b)
        top = spec.quant_max
        peak = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        scale = np.where(peak > 0, peak / top, np.finfo(np.float32).eps).astype(np.float32)
        codes = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -top, top).astype(np.int32)
        bias_real = (layer.bias.astype(np.float64) * 2.0 ** -layer.bias_frac_bits * in_scale * old_scale
                     if layer.bias_float is None else layer.bias_float.astype(np.float64))
        bias, frac_bits = _int_bias(bias_real, in_scale, scale, layer.name,
                                    None if layer.bias_float is None else layer.bias_frac_bits)
        layers.append(dataclasses.replace(layer, weight=codes, weight_grid=_weight_grid(spec, scale), bias=bias,
                                          bias_frac_bits=frac_bits))
    return Program(layers, program.name, program.source)
