"""The workload: a compiled network as a graph of integer layers.

A :class:`Program` is what the compiler produces, the engine runs, the
report costs and storage saves.  It holds no PyTorch object: only integers,
the grids that relate them to real values, and shapes.

Conventions shared by every layer (``q`` is an integer, ``x`` a real value):

* every tensor lives on a :class:`~nnlab.quant.Grid` (spec, scale, zero
  point): ``x = (q - zero_point) * scale``.  A layer's output grid is
  ``out_grid``; a layer that reads tensors carries the grids it expects
  (``in_grid`` or ``in_grids``), and the program checks that they are the
  output grids of the layers it reads;
* layers are in execution order and each names the layers it reads
  (``inputs``): a program is a directed acyclic graph, so a residual add or
  a concat reads an earlier layer's output;
* a weight tensor is signed with zero point 0 and one scale per output
  channel (``weight_grid``): ``w[o] = weight[o] * weight_grid.scale[o]``;
* a weight layer computes the exact integer sum
  ``acc[o] = sum((q_in - in_zero_point) * weight[o]) + bias[o] / 2**bias_frac_bits``
  and requantises it to its output grid with the multiplier
  ``in_scale * weight_scale[o] / out_scale`` (see :mod:`nnlab.nna.engine`);
* ``activation`` is a clamp of the real output, ``(low, high)`` with None
  for unbounded: ``(0.0, None)`` is a ReLU, ``(0.0, 6.0)`` a ReLU6.  On the
  output grid it clamps the integers to ``out_grid.clamp_range(activation)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from ..quant.grid import Grid
from ..quant.spec import QuantSpec

__all__ = ["InputLayer", "WeightLayer", "PoolLayer", "FlattenLayer", "AddLayer", "ConcatLayer", "Program", "OPS",
           "KERNELS", "AVG_ROUNDINGS", "ADD_ROUNDINGS", "MAX_BIAS_FRAC_BITS", "describe"]

#: Operations the engine runs.
OPS = ("quantise", "conv2d", "linear", "maxpool2d", "avgpool2d", "flatten", "add", "concat")
#: Which of PyTorch's CPU kernels the ``"torch"`` requantisation mode reproduces for a weight layer, exactly:
#: ``"fbgemm"`` (exact int32 sums, fbgemm's rounding: CPUs with AVX512-VNNI), ``"fbgemm_avx2"`` (the same, but
#: neighbouring products summed in pairs that saturate at int16, as fbgemm's AVX2 code does; see
#: :func:`nnlab.nna.engine.int16_pair_saturation`) or ``"onednn"`` (conv with the x86 engine on AVX512-VNNI
#: CPUs).  The ``"integer"`` mode ignores it.
KERNELS = ("fbgemm", "fbgemm_avx2", "onednn")
#: How an add dequantises its inputs in ``"torch"`` mode (see :func:`nnlab.nna.engine.add`): ``"fake_quant"``
#: (``f32(q - zero_point) * scale``, as a fake-quantised model computes it) or ``"qadd"`` (PyTorch's
#: ``quantized::add`` kernel, vectorised: a fused multiply-add, ``fma(q, scale, f32(-zero_point * scale))``).
ADD_ROUNDINGS = ("fake_quant", "qadd")
#: The most fractional bits a weight layer's int32 bias may carry.
MAX_BIAS_FRAC_BITS = 16
#: How an average pool rounds (see :func:`nnlab.nna.engine.avgpool2d`): ``"requantise"`` (the mean onto
#: another grid, as a fake-quantised model computes it), or as one of PyTorch's quantized kernels, which keep
#: the input's grid: ``"scaled"`` (avg_pool2d and adaptive_avg_pool2d, channels-last), ``"scaled_zp"``
#: (avg_pool2d, contiguous), ``"raw_scaled"`` (adaptive_avg_pool2d, contiguous), ``"raw"`` (mean, contiguous).
AVG_ROUNDINGS = ("requantise", "scaled", "scaled_zp", "raw_scaled", "raw")


def _check_activation(name, activation):
    if activation is None:
        return None
    if not (isinstance(activation, (tuple, list)) and len(activation) == 2):
        raise ValueError(f"layer {name!r}: activation must be None or (low, high), got {activation!r}")
    lo, hi = (None if v is None else float(v) for v in activation)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"layer {name!r}: activation clamps to an empty range {activation!r}")
    return (lo, hi)


def _check_grid(name, what, grid, optional=False):
    if grid is None and optional:
        return
    if not isinstance(grid, Grid):
        raise TypeError(f"layer {name!r}: {what} must be a nnlab.quant.Grid, got {type(grid).__name__}")
    if what != "weight_grid" and grid.per_channel:
        raise ValueError(f"layer {name!r}: {what} must be per tensor (activations have one scale), got {grid}")


@dataclass(eq=False)
class InputLayer:
    """Turns the real input image into integers on ``grid`` (the one floating-point step).

    Attributes:
        name: layer name.
        grid: the input grid.
        shape: ``(C, H, W)`` (or ``(features,)``) of one input.
    """

    name: str
    grid: Grid
    shape: tuple
    op: str = "quantise"
    inputs: tuple = ()

    def __post_init__(self):
        _check_grid(self.name, "grid", self.grid)
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def out_grid(self) -> Grid:
        return self.grid


@dataclass(eq=False)
class WeightLayer:
    """A Conv2d or Linear layer in integers, with its folded batch norm, fused clamp and requantisation.

    Attributes:
        name: the layer's name in the source model.
        op: ``"conv2d"`` or ``"linear"``.
        inputs: ``(name,)`` of the layer it reads.
        weight: int32 array ``(out, in / groups, kh, kw)`` or ``(out, in)``.
        weight_grid: signed, zero point 0, one scale per output channel
            (per-channel spec, ``scale`` of shape ``(out,)``).
        bias: int32 ``(out,)`` on the accumulator's scale ``in_scale * weight_scale``,
            with ``bias_frac_bits`` fractional bits: the bias is
            ``bias / 2**bias_frac_bits`` accumulator units.
        bias_frac_bits: fractional bits of the bias (0 to 16).  A bias rounded
            to whole accumulator units would shift outputs near a rounding
            tie by up to half a unit: on a constant region of the image (a
            digit's background, zero padding) every output of a channel sits
            on the same tie, and thousands of integers flip at once.  The
            compiler gives the bias as many fractional bits as int32 holds.
        in_grid: the input activations' grid.
        out_grid: the output grid, or None for the last layer, whose int32
            sums are the output (real logits are ``sum * in_scale * weight_scale``).
        activation: the fused clamp ``(low, high)`` (see the module docstring), or None.
        stride, padding, dilation: convolution geometry (pairs; conv2d only).
        groups: convolution groups (``in`` channels for a depthwise convolution).
        bias_float: float32 ``(out,)``: the float bias of a model quantised by
            PyTorch, which its kernels add in float; None otherwise.
        kernel: the PyTorch kernel the ``"torch"`` mode reproduces, rounding and int16 saturation (see :data:`KERNELS`).
    """

    name: str
    op: str
    inputs: tuple
    weight: np.ndarray
    weight_grid: Grid
    bias: np.ndarray
    in_grid: Grid
    out_grid: Grid | None
    activation: tuple | None = None
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias_float: np.ndarray | None = None
    kernel: str = "fbgemm"
    bias_frac_bits: int = 0

    def __post_init__(self):
        if self.op not in ("conv2d", "linear"):
            raise ValueError(f"layer {self.name!r}: op must be 'conv2d' or 'linear', got {self.op!r}")
        _check_grid(self.name, "weight_grid", self.weight_grid)
        _check_grid(self.name, "in_grid", self.in_grid)
        _check_grid(self.name, "out_grid", self.out_grid, optional=True)
        wg = self.weight_grid
        if not (wg.per_channel and wg.signed and wg.channels == self.weight.shape[0] and not wg.zero_point.any()):
            raise ValueError(f"layer {self.name!r}: weight_grid must be signed with zero points 0 and one scale per "
                             f"output channel ({self.weight.shape[0]}), got {wg}")
        self.activation = _check_activation(self.name, self.activation)
        if self.out_grid is None and self.activation is not None and self.activation != (0.0, None):
            raise ValueError(f"layer {self.name!r}: only a ReLU can follow the last layer (its int32 sums are the "
                             f"output), got the clamp {self.activation}")
        self.inputs = tuple(self.inputs)
        self.stride, self.padding, self.dilation = tuple(self.stride), tuple(self.padding), tuple(self.dilation)
        if self.kernel not in KERNELS:
            raise ValueError(f"layer {self.name!r}: kernel must be one of {KERNELS}, got {self.kernel!r}")
        if not (isinstance(self.bias_frac_bits, (int, np.integer)) and 0 <= self.bias_frac_bits <= MAX_BIAS_FRAC_BITS):
            raise ValueError(f"layer {self.name!r}: bias_frac_bits must be an integer in 0..{MAX_BIAS_FRAC_BITS}, "
                             f"got {self.bias_frac_bits!r}")
        self.bias_frac_bits = int(self.bias_frac_bits)

    @property
    def weight_bits(self) -> int:
        """The bit-depth the weights are stored at."""
        return self.weight_grid.bits

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Products summed into one output value."""
        return int(np.prod(self.weight.shape[1:]))


@dataclass(eq=False)
class PoolLayer:
    """Max or average pooling on integers.

    Attributes:
        name, op (``"maxpool2d"`` / ``"avgpool2d"``), inputs, kernel_size, stride, padding (pairs of ints).
        in_grid, out_grid: the grids read and written; equal for a max pool
            (the maximum of grid values is a grid value) and for every
            rounding but ``"requantise"``.
        rounding: how an average is rounded, one of :data:`AVG_ROUNDINGS`.
        activation: a fused clamp of an average pool's output (see the module docstring), or None.
    """

    name: str
    op: str
    inputs: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple
    in_grid: Grid
    out_grid: Grid
    rounding: str = "requantise"
    activation: tuple | None = None

    def __post_init__(self):
        if self.op not in ("maxpool2d", "avgpool2d"):
            raise ValueError(f"layer {self.name!r}: op must be 'maxpool2d' or 'avgpool2d', got {self.op!r}")
        _check_grid(self.name, "in_grid", self.in_grid)
        _check_grid(self.name, "out_grid", self.out_grid)
        if self.rounding not in AVG_ROUNDINGS:
            raise ValueError(f"layer {self.name!r}: rounding must be one of {AVG_ROUNDINGS}, got {self.rounding!r}")
        keeps_grid = self.op == "maxpool2d" or self.rounding != "requantise"
        if keeps_grid and self.in_grid != self.out_grid:
            raise ValueError(f"layer {self.name!r}: a {self.op} with rounding {self.rounding!r} keeps its input's "
                             f"grid, but in_grid {self.in_grid} differs from out_grid {self.out_grid}")
        self.activation = _check_activation(self.name, self.activation)
        if self.op == "maxpool2d" and self.activation is not None:
            raise ValueError(f"layer {self.name!r}: a max pool takes no activation; fuse it into the layer before")
        self.inputs = tuple(self.inputs)
        self.kernel_size, self.stride, self.padding = tuple(self.kernel_size), tuple(self.stride), tuple(self.padding)


@dataclass(eq=False)
class FlattenLayer:
    """Reshape ``(N, C, H, W)`` to ``(N, C*H*W)``; the grid does not change.

    Attributes:
        name, inputs, out_grid (the input's grid; None after a last weight layer).
    """

    name: str
    inputs: tuple
    out_grid: Grid | None
    op: str = "flatten"

    def __post_init__(self):
        _check_grid(self.name, "out_grid", self.out_grid, optional=True)
        self.inputs = tuple(self.inputs)


@dataclass(eq=False)
class _JoinLayer:
    """A layer that reads several tensors on their own grids and writes one onto ``out_grid``."""

    name: str
    inputs: tuple
    in_grids: tuple
    out_grid: Grid
    activation: tuple | None = None
    ARITY = (1, None)  # the fewest and most inputs (None: any number)

    def __post_init__(self):
        self.inputs, self.in_grids = tuple(self.inputs), tuple(self.in_grids)
        low, high = self.ARITY
        if len(self.inputs) != len(self.in_grids) or len(self.inputs) < low or (high and len(self.inputs) > high):
            raise ValueError(f"layer {self.name!r}: an {self.op} reads {low}{'' if low == high else ' or more'} "
                             f"layers with one grid each, got inputs {self.inputs} and {len(self.in_grids)} grids")
        for g in self.in_grids:
            _check_grid(self.name, "in_grids entry", g)
        _check_grid(self.name, "out_grid", self.out_grid)
        self.activation = _check_activation(self.name, self.activation)


@dataclass(eq=False)
class AddLayer(_JoinLayer):
    """Residual add of two integer tensors on their own grids, onto ``out_grid`` (see :func:`nnlab.nna.engine.add`).

    Attributes:
        name, inputs (two names), in_grids (their grids), out_grid, activation (a fused clamp, or None).
        rounding: how the ``"torch"`` mode dequantises the inputs, one of :data:`ADD_ROUNDINGS`.
    """

    op: str = "add"
    rounding: str = "fake_quant"
    ARITY = (2, 2)

    def __post_init__(self):
        super().__post_init__()
        if self.rounding not in ADD_ROUNDINGS:
            raise ValueError(f"layer {self.name!r}: rounding must be one of {ADD_ROUNDINGS}, got {self.rounding!r}")


@dataclass(eq=False)
class ConcatLayer(_JoinLayer):
    """Channel concatenation of integer tensors, each rescaled onto ``out_grid`` (see :func:`nnlab.nna.engine.concat`).

    Attributes:
        name, inputs (one or more names), in_grids (their grids), out_grid, activation (a fused clamp, or None).
    """

    op: str = "concat"


LAYER_TYPES = (InputLayer, WeightLayer, PoolLayer, FlattenLayer, AddLayer, ConcatLayer)


# ----------------------------------------------------------------------------- a weight layer's numbers
# Shared by the two compilers (nnlab's models, PyTorch's int8 models) and the what-if re-quantiser.
def _int_bias(bias_real, in_scale, weight_scale, name, frac_bits=None):
    """The bias as int32 on the accumulator's scale ``in_scale * weight_scale``, with fractional bits.

    Args:
        bias_real: the real bias per output channel.
        in_scale, weight_scale: the input's scale and the per-channel weight scales.
        name: the layer, for messages.
        frac_bits: fractional bits; None picks the most (up to
            :data:`~nnlab.nna.program.MAX_BIAS_FRAC_BITS`) for which every
            entry still fits in int32.

    Returns:
        ``(bias, frac_bits)``: int32 codes, rounded half to even, standing for
        ``bias / 2**frac_bits`` accumulator units.
    """
    units = np.asarray(bias_real, np.float64) / (np.float64(in_scale) * weight_scale.astype(np.float64))
    top = float(np.abs(units).max(initial=0.0))
    if frac_bits is None:
        frac_bits = 0
        while frac_bits < MAX_BIAS_FRAC_BITS and top * 2.0 ** (frac_bits + 1) < 2 ** 31 - 1:
            frac_bits += 1
    b = np.rint(units * 2.0 ** frac_bits)
    if np.any(np.abs(b) > 2 ** 31 - 1):
        raise ValueError(f"layer {name!r}: the bias does not fit in int32 on the accumulator's scale")
    return b.astype(np.int32), frac_bits


def _weight_grid(spec: QuantSpec, scale: np.ndarray) -> Grid:
    """A program's weight grid: the spec made per channel (axis 0), one scale per output channel, zero points 0."""
    return Grid(spec.replace(granularity="per_channel", ch_axis=0), scale, np.zeros(scale.shape, np.int64))


def _in_grids(layer) -> tuple:
    """The grids a layer expects its inputs on."""
    if isinstance(layer, _JoinLayer):
        return layer.in_grids
    if isinstance(layer, (WeightLayer, PoolLayer)):
        return (layer.in_grid,)
    if isinstance(layer, FlattenLayer):
        return (layer.out_grid,)
    return ()


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
    """A compiled network: integer layers in execution order, each naming the layers it reads.

    Attributes:
        layers: an :class:`InputLayer` first, then weight, pooling, flatten,
            add and concat layers; the last one's output is the network's output.
        name: a label for reports.
        source: ``"nnlab"`` (a model quantised with :mod:`nnlab.quant`) or
            ``"torch.ao"`` (PyTorch's own int8 flow).

    Raises:
        ValueError: names that repeat, an input that names no earlier layer,
            a layer expecting a grid its input is not on, or no InputLayer first.
    """

    layers: list = field(default_factory=list)
    name: str = "program"
    source: str = "nnlab"

    def __post_init__(self):
        self.layers = list(self.layers)
        if not self.layers or not isinstance(self.layers[0], InputLayer):
            raise ValueError(f"program {self.name!r} must start with an InputLayer")
        seen = {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LAYER_TYPES):
                raise TypeError(f"layer {i} of program {self.name!r} is a {type(layer).__name__}, not a program layer")
            if layer.name in seen:
                raise ValueError(f"program {self.name!r} has two layers named {layer.name!r}")
            if i > 0 and isinstance(layer, InputLayer):
                raise ValueError(f"program {self.name!r}: only the first layer may be an InputLayer ({layer.name!r})")
            if i > 0 and not layer.inputs:
                raise ValueError(f"layer {layer.name!r} reads no layer")
            for src, want in zip(layer.inputs, _in_grids(layer)):
                if src not in seen:
                    raise ValueError(f"layer {layer.name!r} reads {src!r}, which is not an earlier layer of "
                                     f"program {self.name!r}")
                have = seen[src].out_grid
                if have != want:
                    raise ValueError(f"layer {layer.name!r} expects its input {src!r} on {want}, but {src!r} "
                                     f"outputs {have}")
            seen[layer.name] = layer

    @property
    def input(self) -> InputLayer:
        return self.layers[0]

    @property
    def output(self):
        """The last layer: its output is the network's output."""
        return self.layers[-1]

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

    def last_uses(self) -> dict:
        """Layer name -> index of the last layer that reads its output (the output layer: ``len(layers)``)."""
        last = {layer.name: i for i, layer in enumerate(self.layers)}
        for i, layer in enumerate(self.layers):
            for src in layer.inputs:
                last[src] = i
        last[self.output.name] = len(self.layers)
        return last

    def __eq__(self, other) -> bool:
        return (isinstance(other, Program) and self.name == other.name and self.source == other.source
                and len(self.layers) == len(other.layers)
                and all(_equal(a, b) for a, b in zip(self.layers, other.layers)))

    def __repr__(self) -> str:
        ops = ", ".join(f"{l.name}:{l.op}" for l in self.layers)
        return f"Program({self.name!r}, {len(self.layers)} layers: {ops})"


def _activation_text(activation) -> str:
    if activation is None:
        return ""
    if activation == (0.0, None):
        return "relu"
    if activation == (0.0, 6.0):
        return "relu6"
    lo, hi = ("-inf" if activation[0] is None else f"{activation[0]:g}",
              "inf" if activation[1] is None else f"{activation[1]:g}")
    return f"clamp({lo}, {hi})"


def describe(program: Program):
    """One row per layer: what it computes, what it reads, at which bit-depths, on which grids.

    Args:
        program: a compiled program.

    Returns:
        pandas DataFrame with ``layer``, ``op``, ``inputs`` (comma-separated),
        ``weights`` (shape), ``w_bits``, ``in_bits``, ``out_bits``,
        ``zeros`` (share of zero weights), ``activation`` (``"relu"``,
        ``"relu6"``, ``"clamp(a, b)"`` or empty), ``in_scale``, ``out_scale``
        and ``multiplier`` (mean of ``in_scale * weight_scale / out_scale``).
    """
    rows = []
    for layer in program.layers:
        out = layer.out_grid
        row = {"layer": layer.name, "op": layer.op, "inputs": ", ".join(layer.inputs),
               "activation": _activation_text(getattr(layer, "activation", None)),
               "out_bits": out.bits if out is not None else 32, "out_scale": float(out.scale) if out else np.nan}
        ins = _in_grids(layer)
        if ins and ins[0] is not None:
            row.update(in_bits=ins[0].bits, in_scale=float(ins[0].scale))
        if isinstance(layer, WeightLayer):
            mult = (float(layer.in_grid.scale) * layer.weight_grid.scale.astype(np.float64) / float(out.scale)).mean() \
                if out is not None else np.nan
            row.update(weights=tuple(layer.weight.shape), w_bits=layer.weight_bits,
                       zeros=float(np.mean(layer.weight == 0)), multiplier=mult)
        rows.append(row)
    columns = ["layer", "op", "inputs", "weights", "w_bits", "in_bits", "out_bits", "zeros", "activation", "in_scale",
               "out_scale", "multiplier"]
    return pd.DataFrame(rows, columns=columns)
