"""The workload: a compiled network as a list of integer layers.

A :class:`Program` is what the compiler produces, the engine runs, the
report costs and storage saves.  It holds no PyTorch object: only integers,
the scales that relate them to real values, and shapes.

Conventions shared by every layer (``q`` is an integer, ``x`` a real value):

* an activation tensor has one ``scale`` and ``zero_point``:
  ``x = (q - zero_point) * scale``;
* a weight tensor is signed with zero point 0 and one scale per output
  channel: ``w[o] = weight[o] * weight_scale[o]``;
* a weight layer computes the exact integer sum
  ``acc[o] = sum((q_in - in_zero_point) * weight[o]) + bias[o]`` and
  requantises it to the next layer's grid with the multiplier
  ``in_scale * weight_scale[o] / out_scale`` (see :mod:`nnlab.nna.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["InputLayer", "WeightLayer", "PoolLayer", "FlattenLayer", "AddLayer", "Program", "OPS", "KERNELS",
           "describe"]

#: Operations the engine runs.
OPS = ("quantise", "conv2d", "linear", "maxpool2d", "avgpool2d", "flatten", "add")
#: How the ``"torch"`` requantisation mode rounds, matching PyTorch's CPU kernels exactly:
#: ``"fbgemm"`` (linear layers, and conv without AVX512-VNNI) or ``"onednn"`` (conv with the x86 engine
#: on AVX512-VNNI CPUs).  The ``"integer"`` mode ignores it.
KERNELS = ("fbgemm", "onednn")


@dataclass
class InputLayer:
    """Turns the real input image into integers: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Attributes:
        name: layer name.
        scale, zero_point: the input grid.
        bits, qmin, qmax: bit-depth and integer range.
        shape: ``(C, H, W)`` (or ``(features,)``) of one input.
    """

    name: str
    scale: float
    zero_point: int
    bits: int
    qmin: int
    qmax: int
    shape: tuple
    op: str = "quantise"


@dataclass
class WeightLayer:
    """A Conv2d or Linear layer in integers, with its (fused) ReLU and requantisation.

    Attributes:
        name: the layer's name in the source model.
        op: ``"conv2d"`` or ``"linear"``.
        weight: int32 array ``(out, in, kh, kw)`` or ``(out, in)``, signed, zero point 0.
        weight_bits: bit-depth the weights are stored at.
        weight_scale: float32 ``(out,)``.
        bias: int32 ``(out,)`` on the accumulator's scale ``in_scale * weight_scale``.
        in_scale, in_zero_point, in_bits: the input activations' grid and bit-depth.
        out_scale, out_zero_point: the output grid, or ``None`` for the last
            layer, whose int32 sums are the output (real logits are
            ``sum * in_scale * weight_scale``).
        out_bits, out_min, out_max: the output integers' bit-depth and range.
        relu: the ReLU is fused: outputs are clamped below at ``out_zero_point``.
        stride, padding: convolution geometry (conv2d only).
        bias_float: float32 ``(out,)``: the float bias of a model quantised by
            PyTorch, which its kernels add in float; None otherwise.
        kernel: rounding of the ``"torch"`` mode (see :data:`KERNELS`).
    """

    name: str
    op: str
    weight: np.ndarray
    weight_bits: int
    weight_scale: np.ndarray
    bias: np.ndarray
    in_scale: float
    in_zero_point: int
    in_bits: int
    out_scale: float | None
    out_zero_point: int
    out_bits: int
    out_min: int
    out_max: int
    relu: bool
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    bias_float: np.ndarray | None = None
    kernel: str = "fbgemm"

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Products summed into one output value."""
        return int(np.prod(self.weight.shape[1:]))


@dataclass
class PoolLayer:
    """Max or average pooling on integers (the grid does not change).

    Attributes:
        name, op (``"maxpool2d"`` / ``"avgpool2d"``), kernel_size, stride, padding (pairs of ints).
        zero_point: the input's zero point (average pooling pads with it when ``padding`` > 0).
    """

    name: str
    op: str
    kernel_size: tuple
    stride: tuple
    padding: tuple = (0, 0)
    zero_point: int = 0


@dataclass
class FlattenLayer:
    """Reshape ``(N, C, H, W)`` to ``(N, C*H*W)``."""

    name: str
    op: str = "flatten"


@dataclass
class AddLayer:
    """Residual add of the previous layer's output and the output of layer ``other`` (an index).

    ``out = clamp(round((a - a_zp) * a_scale / out_scale + (b - b_zp) * b_scale / out_scale) + out_zp)``,
    clamped below at ``out_zero_point`` when ``relu``.

    Attributes:
        name, other, a_scale, a_zero_point, b_scale, b_zero_point, out_scale, out_zero_point,
        out_bits, out_min, out_max, relu.
    """

    name: str
    other: int
    a_scale: float
    a_zero_point: int
    b_scale: float
    b_zero_point: int
    out_scale: float
    out_zero_point: int
    out_bits: int
    out_min: int
    out_max: int
    relu: bool = False
    op: str = "add"


def _equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@dataclass
class Program:
    """A compiled network: integer layers in execution order.

    Attributes:
        layers: an :class:`InputLayer` first, then weight, pooling, flatten and add layers.
        name: a label for reports.
        source: ``"nnlab"`` (a model quantised with :mod:`nnlab.quant`) or
            ``"torch.ao"`` (PyTorch's own int8 flow).
    """

    layers: list = field(default_factory=list)
    name: str = "program"
    source: str = "nnlab"

    @property
    def input(self) -> InputLayer:
        return self.layers[0]

    @property
    def weight_layers(self) -> list:
        """The Conv2d/Linear layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, WeightLayer)]

    def layer(self, name: str):
        """The layer called ``name`` (KeyError listing the names otherwise)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers: {', '.join(l.name for l in self.layers)}")

    def __eq__(self, other) -> bool:
        return (isinstance(other, Program) and self.name == other.name and self.source == other.source
                and len(self.layers) == len(other.layers)
                and all(_equal(a, b) for a, b in zip(self.layers, other.layers)))

    def __repr__(self) -> str:
        ops = ", ".join(f"{l.name}:{l.op}" for l in self.layers)
        return f"Program({self.name!r}, {len(self.layers)} layers: {ops})"


def describe(program: Program):
    """One row per layer: what it computes, at which bit-depths, on which grids.

    Args:
        program: a compiled program.

    Returns:
        pandas DataFrame with ``layer``, ``op``, ``weights`` (shape),
        ``w_bits``, ``in_bits``, ``out_bits``, ``zeros`` (share of zero
        weights), ``relu``, ``in_scale``, ``out_scale`` and ``multiplier``
        (mean of ``in_scale * weight_scale / out_scale``).
    """
    import pandas as pd

    rows = []
    for layer in program.layers:
        row = {"layer": layer.name, "op": layer.op}
        if isinstance(layer, WeightLayer):
            mult = (layer.in_scale * layer.weight_scale.astype(np.float64) / layer.out_scale).mean() \
                if layer.out_scale is not None else np.nan
            row.update(weights=tuple(layer.weight.shape), w_bits=layer.weight_bits, in_bits=layer.in_bits,
                       out_bits=layer.out_bits, zeros=float(np.mean(layer.weight == 0)), relu=layer.relu,
                       in_scale=layer.in_scale, out_scale=layer.out_scale, multiplier=mult)
        elif isinstance(layer, InputLayer):
            row.update(out_bits=layer.bits, out_scale=layer.scale)
        rows.append(row)
    columns = ["layer", "op", "weights", "w_bits", "in_bits", "out_bits", "zeros", "relu", "in_scale", "out_scale",
               "multiplier"]
    return pd.DataFrame(rows, columns=columns)
