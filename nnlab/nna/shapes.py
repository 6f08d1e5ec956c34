"""Shape inference: the output shape of every layer of a :class:`~nnlab.nna.program.Program`, without running it.

NumPy only (no PyTorch), so the engine and the cost report can use it.
:func:`output_shapes` walks the program in order and checks that each layer
can take what it reads; the compilers check their programs with it, the
engine sizes its batches with it and the cost report counts activations
with it.
"""

from __future__ import annotations

import numpy as np

from .program import AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer

__all__ = ["output_shapes", "check_input_shape"]


def check_input_shape(input_shape) -> tuple:
    """``input_shape`` as a tuple of positive integers, ``(C, H, W)`` or ``(features,)`` without the batch.

    Raises:
        ValueError: anything else (names the argument and the value).
    """
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be positive integers, (C, H, W) or (features,), without the batch; "
                         f"got {input_shape!r}")
    return shape


def _window(shape, kernel, stride, padding, dilation=(1, 1)):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return ((shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _layer_shape(layer, ins):
    """The output shape of ``layer`` for input shapes ``ins`` (no batch), or a reason it does not fit."""
    shape = ins[0] if ins else None
    if isinstance(layer, InputLayer):
        return tuple(layer.shape)
    if isinstance(layer, WeightLayer) and layer.op == "conv2d":
        need = layer.weight.shape[1] * layer.groups
        if len(shape) != 3 or shape[0] != need:
            return f"expects ({need}, H, W) inputs but receives {shape}; check input_shape"
        ho, wo = _window(shape, layer.weight.shape[2:], layer.stride, layer.padding, layer.dilation)
        if ho < 1 or wo < 1:
            return f"a {tuple(layer.weight.shape[2:])} kernel does not fit in the {shape} input"
        return (layer.out_channels, ho, wo)
    if isinstance(layer, WeightLayer):
        if len(shape) != 1 or shape[0] != layer.weight.shape[1]:
            return (f"expects {layer.weight.shape[1]} input features but receives shape {shape}; check "
                    f"input_shape (and that a Flatten comes first)")
        return (layer.out_channels,)
    if isinstance(layer, PoolLayer):
        if len(shape) != 3:
            return f"needs (C, H, W) inputs, receives {shape}"
        ho, wo = _window(shape, layer.kernel_size, layer.stride, layer.padding)
        if ho < 1 or wo < 1:
            return f"a {layer.kernel_size} window does not fit in the {shape} input"
        return (shape[0], ho, wo)
    if isinstance(layer, FlattenLayer):
        return (int(np.prod(shape)),)
    if isinstance(layer, AddLayer):
        return shape if ins[0] == ins[1] else f"adds shapes {ins[0]} and {ins[1]}"
    if isinstance(layer, ConcatLayer):
        if any(len(s) != len(shape) or s[1:] != shape[1:] for s in ins):
            return f"concatenates channels of shapes {', '.join(map(str, ins))}, which differ beyond the channels"
        return (sum(s[0] for s in ins),) + tuple(shape[1:])
    return f"is an unknown layer type {type(layer).__name__}"


def output_shapes(program: Program) -> dict:
    """The output shape of every layer for one input (no batch dimension), checking that they fit.

    Args:
        program: a compiled program.

    Returns:
        dict layer name -> shape tuple, in order.

    Raises:
        ValueError: a layer receives a shape it cannot take (names the layer).
    """
    shapes = {}
    for layer in program.layers:
        shape = _layer_shape(layer, [shapes[name] for name in layer.inputs])
        if isinstance(shape, str):
            raise ValueError(f"layer {layer.name!r} ({layer.op}) {shape}")
        shapes[layer.name] = shape
    return shapes
