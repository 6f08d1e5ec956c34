"""Export the compressed network to ONNX, and run it in ONNX Runtime as a second, independent engine.

:func:`to_onnx` writes the network a model quantised with :mod:`nnlab.quant`
computes (or a :class:`~nnlab.nna.Program` compiled from one) as a standard
ONNX model, built only from standard operators and ``QuantizeLinear`` /
``DequantizeLinear`` (Q/DQ) nodes, in one of two forms:

* ``form="exact"`` (the default): ONNX Runtime computes, bit for bit, what the
  simulator computes in its default ``"torch"`` mode (:mod:`nnlab.nna.engine`):
  the same integers in every layer and the same float64 logits.  This is the
  form to compare with the simulator, or to deploy what was simulated.
* ``form="qdq"``: the standard quantize/dequantize form that PyTorch, ONNX
  Runtime's own quantiser and the hardware vendors' tools write, with each
  tensor's real scale; ONNX Runtime can fuse it into its integer kernels
  (``QLinearConv``).  It computes the same grid values, but in float32 on the
  real values, so a few integers round the other way (see below).

The qdq form, and what both forms share:

* the model is first compiled exactly as for the simulator
  (:func:`nnlab.nna.compile_model`): batch norm folded into the weight
  scales and the bias, fused clamps and max pools, residual adds and
  concatenations; whatever the compiler refuses (a float model, an operation
  the accelerator does not run) is refused here with the compiler's message,
  which names the node;
* every **weight** tensor is stored as integers (an initializer), in both
  forms, followed by ``DequantizeLinear`` with its scale: one scale per tensor when every output
  channel has the same one, else one per output channel (``axis=0``).  The
  integers are stored in the smallest ONNX integer type that holds the
  grid: ``INT4`` for 2..4 bits (from opset 21), ``INT8`` for 5..8 bits (a 5-bit
  grid uses -15..15 of the int8 range), ``INT16`` for 9..16 bits (opset 21);
  ONNX has no 5..7-bit type.  The layers' bit-depths are recorded in the
  file's metadata (``nnlab.weight_bits``).  Pruned weights are the integer 0,
  so they stay exactly zero.
* every **activation** the accelerator stores is a ``QuantizeLinear`` /
  ``DequantizeLinear`` pair with the grid's scale and zero point, in
  ``UINT8``/``INT8`` up to 8 bits and ``UINT16``/``INT16`` above.  A grid
  narrower than its type (a 4- or 6-bit activation) and a fused ReLU/ReLU6
  become a ``Clip`` (or ``Relu``) just before the ``QuantizeLinear``, at the
  real values of the grid's end points: rounding is monotone, so clamping the
  real value gives the integer the simulator clamps to.
* **biases** stay float32 (``bias="float"``, the default), as the fake-quantised
  model adds them, or become int32 on the accumulator's scale
  ``in_scale * weight_scale`` behind a ``DequantizeLinear`` (``bias="int32"``,
  the form integer runtimes expect; the simulator's bias keeps up to 16 more
  fractional bits, so that file may round a few more outputs differently).
* ``signed_activations=True`` stores an unsigned grid in the signed type of
  the same width (integers and zero point shifted by ``2**(bits-1)``: the
  same real values), the form ONNX Runtime's quantiser calls S8S8 (both forms).
* the output is the float32 logits of the last layer (the simulator's int32
  sums times their scale), ``logits`` of shape ``(N, classes)``; the input is
  ``input``, float images ``(N, C, H, W)`` normalised as the data loaders yield them.

**The exact form.**  Every stored activation is still a ``QuantizeLinear``
to its integer type (the same integers, the same types as above), but with
scale 1 and the grid's zero point; the ``DequantizeLinear`` after it, also
with scale 1, turns the integers back into integer-valued float32 numbers,
``q - zero_point``.  Weights are dequantised with scale 1 too (the stored
integers themselves, as float32).  Each operation then follows the
simulator's own arithmetic, one ONNX operator per step:

* a **weight layer**: ``Conv``/``Gemm`` without bias on those integers gives
  the exact integer sums ``acc``: every product and partial sum is an integer
  below 2**24 in magnitude, which float32 holds exactly, in whatever order ONNX
  Runtime adds them.  :func:`to_onnx` checks this from the weights and the
  input grid (per output channel, ``sum |w| * max |q - zero_point|``) and
  warns (:class:`InexactExportWarning`, naming the layer and the bound; the
  file's metadata ``nnlab.inexact_layers`` lists them) where it cannot be
  guaranteed.  Then, as :func:`nnlab.nna.engine.requantise_torch`:
  ``Cast`` to float64, ``* 2**F`` and ``+ bias`` (the int32 bias with its
  ``F`` fractional bits: exact in float64), ``Cast`` back to float32 (one
  rounding: ``f32(total)``), ``Mul`` by the float32 per-channel multiplier
  ``in_scale * weight_scale / out_scale``; for PyTorch's int8 programs the
  float bias ``f32(bias) / atw`` or oneDNN's order of multiplications.
  (float64 holds more than twice float32's precision, so a float32 sum or
  product computed there and rounded once is float32's own; the ``Cast``
  also keeps ONNX Runtime from fusing the bias into the ``Conv``.)
* ``QuantizeLinear`` with scale 1 rounds half to even, adds the zero point and
  saturates: ``np.rint`` and a clamp, as the simulator; a fused ReLU/ReLU6 or a
  grid narrower than its type is a ``Relu``/``Clip`` at integer bounds before it.
* the **input**: ``Mul`` by ``f32(1 / scale)`` (the simulator, as PyTorch,
  multiplies by the reciprocal where the qdq form's ``QuantizeLinear`` divides).
* a **residual add**: each input times its float32 scale, added, times
  ``f32(1 / out_scale)``; a **concat**: each input not on the output grid
  rescaled so (``Round``), then ``Concat``; a **max pool**: ``MaxPool``.
* an **average pool**: the window sums by a ``Conv`` with a kernel of ones
  (exact), then the simulator's rounding: ``f32(f64(in_scale) * S / n)`` in
  float64 for nnlab's models, or one of PyTorch's kernels' roundings for its
  int8 programs (which the qdq form refuses).
* the **logits** are float64, as the simulator's: the last layer's int64 sums
  times their scale, or the output grid's ``(q - zero_point) * scale``.

Not exported: the simulator's ``"integer"`` mode (fixed-point multipliers,
round half up; the exact form follows its default ``"torch"`` mode), and the
saturation of an accumulator narrower than the sums (a run with a small
``accumulator_bits``): the file computes the sums in full, as the default
32-bit accumulator holds every sum the 2**24 bound allows.

**The qdq form against the simulator.**  :func:`run_onnx` runs the file with
ONNX Runtime's *basic* graph optimisations by default: it executes the graph
as written, ``DequantizeLinear``, a float32 convolution, ``QuantizeLinear``.
Both engines compute the same grid values, but ONNX Runtime sums the
products in float32 (in another order than the simulator's exact integer
sums) and rounds ``y / scale`` where the simulator, as PyTorch, rounds
``y * (1 / scale)``.  A value that lands within a float32 rounding error of a
half-way point (``k + 0.5``) can round the other way: one step on the grid,
on a handful of the millions of integers of a test set, and that difference
travels on through the later layers.  :func:`compare` counts them.

With ``optimization="all"`` ONNX Runtime fuses each DequantizeLinear -
Conv - QuantizeLinear group into its integer kernel ``QLinearConv``.  On
x86 CPUs without AVX512-VNNI (AVX2 only) that kernel multiplies 8-bit pairs
with ``VPMADDUBSW``, which adds two products in a 16-bit integer and
saturates when they exceed 32,767: with 8-bit weights (up to 127) and 8-bit
activations (up to 255) it does, so the fused network computes something
else (measured on LeNet-5 at 8/8: top-1 agrees with the simulator on 98% of
the test images, and accuracy drops by about one point; with 7-bit weights,
whose products cannot saturate, on 100%).  ONNX Runtime documents this and
advises 7-bit weights ("reduce_range") on such CPUs; a CPU with VNNI, or
another runtime, does not saturate.  This is why nnlab's reference run uses
the basic level.  An exact-form file has no group ONNX Runtime can fuse into
an integer kernel that would compute differently: it gives the same integers
at every optimisation level (tested at ``"none"``, ``"basic"`` and ``"all"``).

:func:`run_onnx` runs an exported file in ONNX Runtime (CPU) and
:func:`compare` sets it against the simulator, layer by layer.  Both need
the optional extra ``pip install "nnlab[onnx]"`` (``onnx`` and ``onnxruntime``).

Example:
    >>> qmodel = nnlab.quant.quantise_model(net, data, weight_bits=4, act_bits=8)
    >>> nnlab.export.to_onnx(qmodel, "lenet5.onnx")                # exact: the simulator's integers
    >>> nnlab.export.run_onnx("lenet5.onnx", images).argmax(axis=1)
    >>> nnlab.export.to_onnx(qmodel, "lenet5-qdq.onnx", form="qdq")  # the standard QDQ form
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from . import __version__, nna
from ._args import check_bool, check_choice, check_int
from .base import atomic_write
from .nna.program import AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer
from .nna.shapes import output_shapes
from .quant import weight_layers, weight_quantiser

__all__ = ["to_onnx", "run_onnx", "compare", "node_table", "weight_storage", "DEFAULT_OPSET", "MIN_OPSET",
           "BIASES", "FORMS", "OPTIMIZATIONS", "InexactExportWarning", "EXACT_FLOAT32", "require_onnx"]

#: The opset :func:`to_onnx` writes by default: the first with 4- and 16-bit integer types in (De)QuantizeLinear.
DEFAULT_OPSET = 21
#: The oldest opset :func:`to_onnx` writes (per-channel ``DequantizeLinear``); before 21 every grid must fit 8 bits.
MIN_OPSET = 13
#: How :func:`to_onnx` stores biases.
BIASES = ("float", "int32")
#: The forms :func:`to_onnx` writes: ``"exact"`` (the simulator's arithmetic, bit for bit) and ``"qdq"``.
FORMS = ("exact", "qdq")

f32 = np.float32

INSTALL_HINT = 'install the optional extra: pip install "nnlab[onnx]" (the onnx and onnxruntime packages)'


def require_onnx(runtime: bool = False):
    """Import ``onnx`` (and ``onnxruntime`` with ``runtime=True``), or raise ImportError saying how to install them.

    Returns:
        The ``onnx`` module, or ``(onnx, onnxruntime)`` with ``runtime=True``.
    """
    try:
        import onnx  # lazy: optional extra (onnx)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package, which is not installed; {INSTALL_HINT}") from exc
    if not runtime:
        return onnx
    try:
        import onnxruntime  # lazy: optional extra (onnxruntime)
    except ImportError as exc:
        raise ImportError(f"running an ONNX file needs the onnxruntime package, which is not installed; "
                          f"{INSTALL_HINT}") from exc
    return onnx, onnxruntime


# ----------------------------------------------------------------------------- integer types
def _container(bits: int, signed: bool, opset: int, weight: bool, what: str):
    """The ONNX integer type holding a ``bits``-bit grid: (TensorProto type, numpy dtype, low, high)."""
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import TensorProto

    if weight and bits <= 4 and opset >= 21:
        return (TensorProto.INT4, np.int8, -8, 7) if signed else (TensorProto.UINT4, np.uint8, 0, 15)
    if bits <= 8:
        return (TensorProto.INT8, np.int8, -128, 127) if signed else (TensorProto.UINT8, np.uint8, 0, 255)
    if opset < 21:
        raise ValueError(f"{what} has {bits}-bit integers; ONNX stores more than 8 bits in (De)QuantizeLinear from "
                         f"opset 21 (INT16/UINT16): export with opset=21 or later, or quantise to 8 bits or fewer")
    return (TensorProto.INT16, np.int16, -32768, 32767) if signed else (TensorProto.UINT16, np.uint16, 0, 65535)


def _pack_4bit(codes: np.ndarray) -> bytes:
    """4-bit integers packed two to a byte, as ONNX stores INT4/UINT4: the first in the low nibble."""
    nibbles = (codes.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


class _Builder:
    """Collects the nodes and initializers of the exported graph."""

    def __init__(self, opset: int, bias: str, signed_activations: bool):
        self.opset, self.bias = opset, bias
        self.nodes, self.inits, self.names = [], [], set()
        self.weight_bits, self.integer_tensors, self.offsets = {}, {}, {}
        self.signed_activations = signed_activations

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def init(self, name, array=None, *, data_type=None, dims=None, values=None, raw=False) -> str:
        # lazy: onnx is an optional extra, imported only when exporting
        from onnx import helper, numpy_helper

        name = self.unique(name)
        if array is not None:
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        else:
            self.inits.append(helper.make_tensor(name, data_type, dims, values, raw=raw))
        return name

    def node(self, op, inputs, output, name, **attrs) -> str:
        # lazy: onnx is an optional extra, imported only when exporting
        from onnx import helper

        output = self.unique(output)
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=self.unique(f"{name}/{op}"), **attrs))
        return output

    # -- activations
    def quantise(self, x: str, grid, layer_name: str, clamp=None) -> str:
        """``x`` (float) onto ``grid``: (Clip/Relu), QuantizeLinear, DequantizeLinear; returns the float tensor.

        ``clamp``: the integer range ``(lo, hi)`` of the outputs (the grid's range and a fused activation).
        """
        signed = grid.signed or self.signed_activations
        kind, dtype, low, high = _container(grid.bits, signed, self.opset, False,
                                            f"the activations of layer {layer_name!r}")
        lo, hi = clamp if clamp is not None else (grid.quant_min, grid.quant_max)
        scale, zp = np.float32(grid.scale), int(grid.zero_point)
        offset = -(1 << (grid.bits - 1)) if signed and not grid.signed else 0  # unsigned grid in a signed type
        lo, hi, zp = lo + offset, hi + offset, zp + offset
        if (lo, hi) != (low, high):
            if lo == zp and hi == high:
                x = self.node("Relu", [x], f"{layer_name}_relu", layer_name)
            else:
                bounds = [self.init(f"{layer_name}_clip_{end}", np.array(np.float64(v - zp) * np.float64(scale),
                                                                         np.float32))
                          for end, v in (("low", lo), ("high", hi))]
                x = self.node("Clip", [x] + bounds, f"{layer_name}_clip", layer_name)
        s = self.init(f"{layer_name}_scale", np.array(scale, np.float32))
        z = self.init(f"{layer_name}_zero_point", np.array(zp, dtype))
        q = self.node("QuantizeLinear", [x, s, z], f"{layer_name}_quantised", layer_name)
        self.integer_tensors[layer_name] = q
        self.offsets[layer_name] = offset
        return self.node("DequantizeLinear", [q, s, z], layer_name, layer_name)

    # -- weights
    def weight_integers(self, layer) -> str:
        """The weight layer's integers as an initializer of their bit-depth's container (INT4 packed, INT8, INT16)."""
        # lazy: onnx is an optional extra, imported only when exporting
        from onnx import TensorProto

        name, grid = layer.name, layer.weight_grid
        kind, dtype, low, high = _container(grid.bits, True, self.opset, True, f"the weights of layer {name!r}")
        codes = layer.weight
        if codes.min(initial=0) < low or codes.max(initial=0) > high:  # a program made by hand
            raise ValueError(f"layer {name!r}: weight integers {codes.min()}..{codes.max()} do not fit the "
                             f"{grid.bits}-bit grid")
        self.weight_bits[name] = int(grid.bits)
        if kind in (TensorProto.INT4, TensorProto.UINT4):
            return self.init(f"{name}.weight_quantised", data_type=kind, dims=list(codes.shape),
                             values=_pack_4bit(codes), raw=True)
        return self.init(f"{name}.weight_quantised", codes.astype(dtype))

    def weight(self, layer) -> tuple:
        """The weight layer's DequantizeLinear output and bias tensor names."""
        name, grid = layer.name, layer.weight_grid
        w = self.weight_integers(layer)
        scale = grid.scale.astype(np.float32)
        per_tensor = bool(np.all(scale == scale[0]))
        s = self.init(f"{name}.weight_scale", np.array(scale[0], np.float32) if per_tensor else scale)
        attrs = {} if per_tensor else {"axis": 0}
        wf = self.node("DequantizeLinear", [w, s], f"{name}.weight", name, **attrs)
        acc_scale = np.float64(layer.in_grid.scale) * scale.astype(np.float64)  # per channel
        frac = 2.0 ** -layer.bias_frac_bits
        if layer.bias_float is not None:  # PyTorch's own int8 models add a float bias
            real = layer.bias_float.astype(np.float64)
        else:
            real = layer.bias.astype(np.float64) * frac * acc_scale
        if self.bias == "float":
            return wf, self.init(f"{name}.bias", real.astype(np.float32))
        units = np.rint(real / acc_scale.astype(np.float32).astype(np.float64))
        if np.any(np.abs(units) > 2 ** 31 - 1):
            raise ValueError(f"layer {name!r}: the bias does not fit in int32 on the accumulator's scale; "
                             f"export with bias='float'")
        b = self.init(f"{name}.bias_quantised", units.astype(np.int32))
        bs = self.init(f"{name}.bias_scale", acc_scale.astype(np.float32))
        return wf, self.node("DequantizeLinear", [b, bs], f"{name}.bias", name, axis=0)


def _pads(padding) -> list:
    return [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]


def _graph(program, opset: int, bias: str, signed_activations: bool):
    """The ONNX GraphProto of ``program`` and the builder that made it."""
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import TensorProto, helper

    shapes = output_shapes(program)
    b = _Builder(opset, bias, signed_activations)
    values = {}
    inp = b.unique("input")
    for layer in program.layers:
        ins = [values[name] for name in layer.inputs]
        name = layer.name
        if isinstance(layer, InputLayer):
            values[name] = b.quantise(inp, layer.grid, name)
        elif isinstance(layer, WeightLayer):
            w, bias_name = b.weight(layer)
            if layer.op == "conv2d":
                y = b.node("Conv", [ins[0], w, bias_name], f"{name}_sum", name,
                           kernel_shape=[int(k) for k in layer.weight.shape[2:]], strides=list(layer.stride),
                           pads=_pads(layer.padding), dilations=list(layer.dilation), group=int(layer.groups))
            else:
                y = b.node("Gemm", [ins[0], w, bias_name], f"{name}_sum", name, transB=1)
            if layer.out_grid is None:
                values[name] = b.node("Relu", [y], f"{name}_relu", name) if layer.activation else y
            else:
                values[name] = b.quantise(y, layer.out_grid, name, layer.out_grid.clamp_range(layer.activation))
        elif isinstance(layer, PoolLayer):
            geometry = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                            pads=_pads(layer.padding))
            if layer.op == "maxpool2d":
                y = b.node("MaxPool", ins, f"{name}_max", name, **geometry)
            else:
                if layer.rounding != "requantise":
                    raise ValueError(f"layer {name!r} (avgpool2d) rounds as PyTorch's quantized kernel "
                                     f"{layer.rounding!r} does, keeping its input's grid; ONNX's AveragePool "
                                     f"followed by QuantizeLinear cannot express that rounding. Export a model "
                                     f"quantised with nnlab.quant instead")
                y = b.node("AveragePool", ins, f"{name}_mean", name, count_include_pad=1, **geometry)
            values[name] = b.quantise(y, layer.out_grid, name, layer.out_grid.clamp_range(layer.activation))
        elif isinstance(layer, FlattenLayer):
            y = b.node("Flatten", ins, f"{name}_flat", name, axis=1)
            values[name] = y if layer.out_grid is None else b.quantise(y, layer.out_grid, name)
        elif isinstance(layer, AddLayer):
            y = b.node("Add", ins, f"{name}_sum", name)
            values[name] = b.quantise(y, layer.out_grid, name, layer.out_grid.clamp_range(layer.activation))
        elif isinstance(layer, ConcatLayer):
            y = b.node("Concat", ins, f"{name}_cat", name, axis=1)
            values[name] = b.quantise(y, layer.out_grid, name, layer.out_grid.clamp_range(layer.activation))
        else:
            raise ValueError(f"layer {name!r} is a {type(layer).__name__} ({getattr(layer, 'op', '?')}), which "
                             f"the ONNX export does not know; supported: the program layers of nnlab.nna")
    out = values[program.output.name]
    b.nodes.append(helper.make_node("Identity", [out], ["logits"], name="output/Identity"))
    x = helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *program.input.shape])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *shapes[program.output.name]])
    return helper.make_graph(b.nodes, program.name, [x], [y], initializer=b.inits), b


# ----------------------------------------------------------------------------- the exact form
#: Sums of integer-valued float32 numbers are exact while every partial sum stays below this in magnitude.
EXACT_FLOAT32 = 2 ** 24


class InexactExportWarning(UserWarning):
    """A layer of an exact-form export may compute sums that float32 cannot hold exactly (above 2**24)."""


def _along(values, ndim: int) -> np.ndarray:
    """Per-channel constants shaped to broadcast along axis 1 of an ``ndim``-dimensional ``(N, C, ...)`` tensor."""
    values = np.asarray(values)
    return values.reshape((-1,) + (1,) * (ndim - 2)) if ndim > 2 else values.reshape(-1)


def _largest_centred(grid) -> int:
    """The largest ``|q - zero_point|`` on a per-tensor grid."""
    zp = int(grid.zero_point)
    return max(zp - int(grid.quant_min), int(grid.quant_max) - zp)


class _ExactBuilder(_Builder):
    """The exact form: every stored activation is an integer-valued float32 tensor centred on its zero point.

    ``values[name]`` is ``(tensor, zero_point, ndim)``: the tensor holds ``q - zero_point`` of layer ``name``'s
    integers (exactly, in float32), or, with ``zero_point`` None, the real logits in float64.
    """

    def __init__(self, opset: int, signed_activations: bool, shapes: dict):
        super().__init__(opset, "float", signed_activations)
        self.values, self.inexact, self.warnings, self.shapes = {}, {}, [], shapes

    def const(self, name: str, value, dtype) -> str:
        return self.init(name, np.asarray(value, dtype))

    def centred(self, name: str, zero_point: int, reader: str) -> str:
        """Layer ``name``'s output as ``q - zero_point`` (the reader's view of it), integer-valued float32."""
        tensor, zp, _ = self.values[name]
        if zp is None:
            raise ValueError(f"layer {reader!r} reads {name!r}, whose sums are not stored on a grid (a weight layer "
                             f"without an output grid is the network's last); the exact form cannot export that")
        if zp == zero_point:
            return tensor
        shift = self.const(f"{reader}_from_{name}_zero_point", np.float32(zp - zero_point), np.float32)
        return self.node("Add", [tensor, shift], f"{reader}_{name}_recentred", reader)

    def check_sums(self, layer_name: str, worst: int, what: str):
        """Record a warning when ``worst``, the largest possible partial sum, may leave float32's exact integers."""
        if worst >= EXACT_FLOAT32:
            self.inexact[layer_name] = int(worst)
            self.warnings.append(
                f"layer {layer_name!r}: {what} may reach {worst:,} in magnitude, beyond 2**24 = {EXACT_FLOAT32:,}, "
                f"where float32 (ONNX Runtime's Conv/Gemm) stops holding every integer; ONNX Runtime may round "
                f"those sums and so differ from the simulator, which sums exactly. Fewer weight or activation bits, "
                f"or a smaller fan-in, keep the sums exact")

    def store(self, v: str, grid, layer_name: str, ndim: int, clamp=None):
        """``v`` (float32, to be rounded: the output integer minus the zero point) onto ``grid``.

        Clip/Relu to the clamp range (centred: rounding is monotone and the bounds are integers),
        QuantizeLinear with scale 1 (round half to even, add the zero point, saturate),
        DequantizeLinear with scale 1 (the centred integer again, for the next layers).
        """
        signed = grid.signed or self.signed_activations
        kind, dtype, low, high = _container(grid.bits, signed, self.opset, False,
                                            f"the activations of layer {layer_name!r}")
        zp = int(grid.zero_point)
        lo, hi = clamp if clamp is not None else (int(grid.quant_min), int(grid.quant_max))
        offset = -(1 << (grid.bits - 1)) if signed and not grid.signed else 0  # unsigned grid in a signed type
        stored_zp = zp + offset
        if (lo - zp, hi - zp) != (low - stored_zp, high - stored_zp):
            if lo == zp and hi - zp == high - stored_zp:
                v = self.node("Relu", [v], f"{layer_name}_relu", layer_name)
            else:
                bounds = [self.const(f"{layer_name}_clip_{end}", np.float32(b - zp), np.float32)
                          for end, b in (("low", lo), ("high", hi))]
                v = self.node("Clip", [v] + bounds, f"{layer_name}_clip", layer_name)
        one = self.const(f"{layer_name}_unit_scale", np.float32(1.0), np.float32)
        z = self.const(f"{layer_name}_zero_point", stored_zp, dtype)
        q = self.node("QuantizeLinear", [v, one, z], f"{layer_name}_quantised", layer_name)
        self.integer_tensors[layer_name] = q
        self.offsets[layer_name] = offset
        centred = self.node("DequantizeLinear", [q, one, z], f"{layer_name}_centred", layer_name)
        self.values[layer_name] = (centred, zp, ndim)

    def weight_sums(self, layer, x: str, ndim: int) -> str:
        """The exact integer sums ``acc`` of a weight layer (float32), checking they stay exact."""
        name, codes = layer.name, layer.weight
        w = self.weight_integers(layer)
        one = self.const(f"{name}.weight_unit_scale", np.float32(1.0), np.float32)
        wf = self.node("DequantizeLinear", [w, one], f"{name}.weight_integers", name)
        per_channel = np.abs(codes.reshape(codes.shape[0], -1).astype(np.int64)).sum(axis=1)
        self.check_sums(name, int(per_channel.max(initial=0)) * _largest_centred(layer.in_grid),
                        "its sums (sum |weight integers| x largest |input - zero point|)")
        if layer.op == "conv2d":
            return self.node("Conv", [x, wf], f"{name}_sum", name,
                             kernel_shape=[int(k) for k in codes.shape[2:]], strides=list(layer.stride),
                             pads=_pads(layer.padding), dilations=list(layer.dilation), group=int(layer.groups))
        return self.node("Gemm", [x, wf], f"{name}_sum", name, transB=1)

    def double(self, x: str, name: str, what: str) -> str:
        # lazy: onnx is an optional extra, imported only when exporting
        from onnx import TensorProto

        return self.node("Cast", [x], f"{name}_{what}", name, to=TensorProto.DOUBLE)

    def single(self, x: str, name: str, what: str) -> str:
        # lazy: onnx is an optional extra, imported only when exporting
        from onnx import TensorProto

        return self.node("Cast", [x], f"{name}_{what}", name, to=TensorProto.FLOAT)


def _exact_weight_layer(b: _ExactBuilder, layer):
    """A weight layer in the exact form, following :func:`nnlab.nna.engine.requantise_torch` operation by operation.

    ``acc`` (exact, float32) goes to float64 (exact) for the bias, and back to float32 in one rounding: float64
    carries more than twice float32's precision, so a float32 sum or product computed there and rounded once
    to float32 is exactly float32's own; the Cast also keeps ONNX Runtime from fusing the bias into the Conv.
    """
    name, ndim = layer.name, 4 if layer.op == "conv2d" else 2
    x = b.centred(layer.inputs[0], int(layer.in_grid.zero_point), name)
    acc = b.weight_sums(layer, x, ndim)
    ws = layer.weight_grid.scale  # float32, one per output channel
    frac = layer.bias_frac_bits
    if layer.out_grid is None:  # the logits: float64, as engine.output_logits computes them
        total = b.double(acc, name, "sum_f64")
        if frac:
            total = b.node("Mul", [total, b.const(f"{name}_frac_unit", _along(np.float64(2.0 ** frac), 2), np.float64)],
                           f"{name}_sum_shifted", name)
        total = b.node("Add", [total, b.const(f"{name}.bias_integers", _along(layer.bias.astype(np.float64), ndim),
                                               np.float64)], f"{name}_total", name)
        if layer.activation is not None:
            total = b.node("Relu", [total], f"{name}_relu", name)
        scale = np.float64(layer.in_grid.scale) * ws.astype(np.float64) * 2.0 ** -frac
        b.values[name] = (b.node("Mul", [total, b.const(f"{name}_logit_scale", _along(scale, ndim), np.float64)],
                                 f"{name}_logits", name), None, ndim)
        return
    in_scale, out_scale = layer.in_grid.scale, layer.out_grid.scale
    clamp = layer.out_grid.clamp_range(layer.activation)
    if layer.kernel == "onednn":
        src = f32(1.0) / f32(1.0 / float(in_scale))
        v = b.node("Mul", [b.double(acc, name, "sum_f64"), b.const(f"{name}_input_scale", src, np.float64)],
                   f"{name}_times_input_scale_f64", name)
        v = b.single(v, name, "times_input_scale")
        v = b.node("Mul", [v, b.const(f"{name}.weight_scale", _along(ws, ndim), np.float32)],
                   f"{name}_real", name)
        if layer.bias_float is not None:
            v = b.node("Add", [v, b.const(f"{name}.bias", _along(layer.bias_float.astype(f32), ndim), np.float32)],
                       f"{name}_biased", name)
        if layer.activation is not None and layer.activation[0] == 0.0:
            v = b.node("Relu", [v], f"{name}_relu_real", name)
        v = b.node("Mul", [v, b.const(f"{name}_inverse_output_scale", f32(1.0 / float(out_scale)), np.float32)],
                   f"{name}_on_grid", name)
        return b.store(v, layer.out_grid, name, ndim, clamp)
    atw = in_scale * ws  # float32, as requantise_torch
    mult = atw / out_scale
    total = b.double(acc, name, "sum_f64")
    if layer.bias_float is not None:  # f32(acc) + f32(bias) / atw, in float32
        bias = layer.bias_float.astype(f32) / atw
        total = b.node("Add", [total, b.const(f"{name}.bias_over_scale", _along(bias.astype(np.float64), ndim),
                                              np.float64)], f"{name}_total_f64", name)
    else:  # f32(acc * 2**F + bias): exact in float64, rounded once to float32
        if frac:
            total = b.node("Mul", [total, b.const(f"{name}_frac_unit", np.float64(2.0 ** frac), np.float64)],
                           f"{name}_sum_shifted", name)
            mult = mult * f32(2.0 ** -frac)  # a power of two: exact
        total = b.node("Add", [total, b.const(f"{name}.bias_integers", _along(layer.bias.astype(np.float64), ndim),
                                              np.float64)], f"{name}_total_f64", name)
    v = b.node("Mul", [b.single(total, name, "total"), b.const(f"{name}_multiplier", _along(mult, ndim), np.float32)],
               f"{name}_on_grid", name)
    b.store(v, layer.out_grid, name, ndim, clamp)


def _exact_pool(b: _ExactBuilder, layer):
    """A pooling layer in the exact form, following :func:`nnlab.nna.engine.maxpool2d` and ``avgpool2d``."""
    name, grid, out = layer.name, layer.in_grid, layer.out_grid
    geometry = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=_pads(layer.padding))
    if layer.op == "maxpool2d":  # the integers' maximum; padding never wins
        y = b.node("MaxPool", [b.centred(layer.inputs[0], int(out.zero_point), name)], f"{name}_max", name,
                   **geometry)
        return b.store(y, out, name, 4)
    (kh, kw), rounding = layer.kernel_size, layer.rounding
    n = kh * kw
    raw = rounding in ("raw_scaled", "raw")  # sums of the integers themselves, the zero point never subtracted
    x = b.centred(layer.inputs[0], 0 if raw else int(grid.zero_point), name)
    channels = int(b.shapes[layer.inputs[0]][0])
    largest = max(abs(int(grid.quant_min)), abs(int(grid.quant_max))) if raw else _largest_centred(grid)
    b.check_sums(name, n * largest, "its window sums")
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import TensorProto, helper

    shape = b.const(f"{name}_window_shape", np.array([channels, 1, kh, kw], np.int64), np.int64)
    ones = b.node("ConstantOfShape", [shape], f"{name}_window", name,  # a kernel of ones, stored as its shape
                  value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    s = b.node("Conv", [x, ones], f"{name}_window_sum", name, group=channels, **geometry)  # exact sums
    zp = int(out.zero_point)
    m = f32(np.float64(grid.scale) / np.float64(out.scale) / n)
    if rounding == "requantise":  # f32(f64(in_scale) * S / n), then times f32(1 / out_scale)
        mean = b.node("Mul", [b.double(s, name, "window_sum_f64"),
                              b.const(f"{name}_input_scale", np.float64(grid.scale), np.float64)],
                      f"{name}_real_sum", name)
        mean = b.single(b.node("Div", [mean, b.const(f"{name}_count", np.float64(n), np.float64)],
                               f"{name}_mean_f64", name), name, "mean")
        v = b.node("Mul", [mean, b.const(f"{name}_inverse_output_scale", f32(1.0) / out.scale, np.float32)],
                   f"{name}_on_grid", name)
    elif rounding == "scaled":
        v = b.node("Mul", [s, b.const(f"{name}_multiplier", m, np.float32)], f"{name}_on_grid", name)
    elif rounding in ("scaled_zp", "raw_scaled"):  # rounded with (scaled_zp) or without (raw_scaled) the zero point
        v = b.node("Mul", [s, b.const(f"{name}_multiplier", m, np.float32)], f"{name}_scaled", name)
        if rounding == "scaled_zp":
            v = b.node("Add", [v, b.const(f"{name}_zero_point_f32", f32(zp), np.float32)], f"{name}_shifted", name)
        v = b.node("Round", [v], f"{name}_rounded", name)
        v = b.node("Sub", [v, b.const(f"{name}_zero_point_f32", f32(zp), np.float32)], f"{name}_centred_mean", name)
    else:  # "raw": rint(R / n) in float64
        v = b.node("Div", [b.double(s, name, "window_sum_f64"), b.const(f"{name}_count", np.float64(n), np.float64)],
                   f"{name}_mean_f64", name)
        v = b.node("Round", [v], f"{name}_rounded", name)
        v = b.node("Sub", [v, b.const(f"{name}_zero_point_f64", np.float64(zp), np.float64)], f"{name}_centred_f64",
                   name)
        v = b.single(v, name, "centred_mean")
    b.store(v, out, name, 4, out.clamp_range(layer.activation))


def _exact_graph(program, opset: int, signed_activations: bool):
    """The exact form's GraphProto of ``program`` (see :func:`to_onnx`) and the builder that made it."""
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import TensorProto, helper

    shapes = output_shapes(program)
    b = _ExactBuilder(opset, signed_activations, shapes)
    inp = b.unique("input")
    for layer in program.layers:
        name = layer.name
        if isinstance(layer, InputLayer):  # clamp(rint(x * f32(1 / scale)) + zero_point), as Grid.quantise
            grid = layer.grid
            v = b.node("Mul", [inp, b.const(f"{name}_inverse_scale", f32(1.0) / grid.scale, np.float32)],
                       f"{name}_on_grid", name)
            b.store(v, grid, name, 1 + len(layer.shape))
        elif isinstance(layer, WeightLayer):
            _exact_weight_layer(b, layer)
        elif isinstance(layer, PoolLayer):
            _exact_pool(b, layer)
        elif isinstance(layer, FlattenLayer):  # the integers unchanged, in PyTorch's order
            src, zp, ndim = b.values[layer.inputs[0]]
            if zp is not None and layer.out_grid is not None:
                zp = int(layer.out_grid.zero_point)
                src = b.centred(layer.inputs[0], zp, name)
            y = b.node("Flatten", [src], f"{name}_flat", name, axis=1) if ndim > 2 else src
            if zp is not None and layer.out_grid is not None:
                b.store(y, layer.out_grid, name, 2)
            else:
                b.values[name] = (y, zp, 2)
        elif isinstance(layer, AddLayer):  # f32(a - zp_a) * s_a + f32(b - zp_b) * s_b, times f32(1 / out_scale)
            real = [b.node("Mul", [b.centred(src, int(g.zero_point), name),
                                   b.const(f"{name}_scale_{i}", g.scale, np.float32)], f"{name}_real_{i}", name)
                    for i, (src, g) in enumerate(zip(layer.inputs, layer.in_grids))]
            c = b.node("Add", real, f"{name}_sum", name)
            v = b.node("Mul", [c, b.const(f"{name}_inverse_output_scale", f32(1.0) / layer.out_grid.scale,
                                          np.float32)], f"{name}_on_grid", name)
            b.store(v, layer.out_grid, name, b.values[layer.inputs[0]][2],
                    layer.out_grid.clamp_range(layer.activation))
        elif isinstance(layer, ConcatLayer):  # each input rescaled (engine._rescale) unless already on the grid
            out, parts = layer.out_grid, []
            for i, (src, g) in enumerate(zip(layer.inputs, layer.in_grids)):
                if g == out:
                    parts.append(b.centred(src, int(out.zero_point), name))
                    continue
                v = b.node("Mul", [b.centred(src, int(g.zero_point), name),
                                   b.const(f"{name}_scale_{i}", g.scale, np.float32)], f"{name}_real_{i}", name)
                v = b.node("Mul", [v, b.const(f"{name}_inverse_output_scale_{i}", f32(1.0) / out.scale, np.float32)],
                           f"{name}_on_grid_{i}", name)
                parts.append(b.node("Round", [v], f"{name}_rounded_{i}", name))
            y = b.node("Concat", parts, f"{name}_cat", name, axis=1)
            b.store(y, out, name, b.values[layer.inputs[0]][2], out.clamp_range(layer.activation))
        else:
            raise ValueError(f"layer {name!r} is a {type(layer).__name__} ({getattr(layer, 'op', '?')}), which "
                             f"the ONNX export does not know; supported: the program layers of nnlab.nna")
    tensor, zp, _ = b.values[program.output.name]
    if zp is not None:  # (q - zero_point) * scale in float64, as engine.output_logits
        last = program.output
        while isinstance(last, FlattenLayer) and last.out_grid is None:
            last = program.layer(last.inputs[0])
        grid = last.out_grid
        tensor = b.node("Mul", [b.double(tensor, "output", "centred_f64"),
                                b.const("output_scale", np.float64(grid.scale), np.float64)], "output_logits", "output")
    b.nodes.append(helper.make_node("Identity", [tensor], ["logits"], name="output/Identity"))
    x = helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *program.input.shape])
    y = helper.make_tensor_value_info("logits", TensorProto.DOUBLE, ["N", *shapes[program.output.name]])
    return helper.make_graph(b.nodes, program.name, [x], [y], initializer=b.inits), b


def _program(model, input_shape):
    """The compiled program of ``model`` (a Program passes through), refusing a float model by name."""
    if isinstance(model, Program):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a quantised torch.nn.Module (nnlab.quant.quantise_model) or an "
                        f"nnlab.nna.Program, got {type(model).__name__}")
    layers = weight_layers(model)
    float_layers = [name for name, m in layers.items() if weight_quantiser(m) is None]
    if layers and len(float_layers) == len(layers):
        raise ValueError(f"model is a float model (no quantised weights in {', '.join(float_layers[:4])}"
                         f"{' ...' if len(float_layers) > 4 else ''}); ONNX export writes a quantised network: "
                         f"quantise it first with nnlab.quant.quantise_model(model, data, weight_bits=8, act_bits=8)")
    return nna.compile_model(model, input_shape)


def to_onnx(model, path, *, form: str = "exact", input_shape=(1, 28, 28), opset: int = DEFAULT_OPSET,
            bias: str = "float", signed_activations: bool = False, name: str | None = None):
    """Write a quantised network as an ONNX model of standard operators and Q/DQ nodes (see the module docstring).

    Args:
        model: a model quantised with :mod:`nnlab.quant` (weights and activations,
            e.g. :func:`nnlab.quant.quantise_model` with ``act_bits``), pruned or not,
            or a :class:`~nnlab.nna.Program` compiled from one.
        path: the ``.onnx`` file to write (written whole or not at all).
        form: ``"exact"`` (default: ONNX Runtime computes the simulator's integers and
            float64 logits bit for bit) or ``"qdq"`` (the standard quantize/dequantize form
            with real scales, which ONNX Runtime can fuse into its integer kernels; float32
            logits, a few integers rounded differently). One of :data:`FORMS`.
        input_shape: one input's ``(C, H, W)`` (ignored for a Program, which knows it).
        opset: ONNX opset, ``13`` .. the newest the installed ``onnx`` knows (default 21).
            Below 21, 2..4-bit weights are stored in INT8 and more than 8 bits are refused.
        bias: for ``form="qdq"``: ``"float"`` (float32 biases, as the fake-quantised model adds
            them) or ``"int32"`` (int32 on the accumulator's scale, behind a DequantizeLinear).
            The exact form adds each bias as the simulator does; it accepts only ``"float"``.
        name: the graph's name (default the program's).

    Returns:
        The ``onnx.ModelProto`` written (``onnx.checker`` has passed on it).

    Raises:
        ImportError: ``onnx`` is not installed (says how to install it).
        TypeError: ``model`` is neither a module nor a Program.
        ValueError: a float model; a bad ``form``, ``opset`` or ``bias``; a grid ONNX cannot
            store at that opset; a layer ONNX cannot express (names it).

    Warns:
        InexactExportWarning: ``form="exact"`` and a layer whose sums may exceed 2**24 in
            magnitude, where ONNX Runtime's float32 sums may round (names the layer and the bound).
        nnlab.graph.GraphError: a node the compiler refuses (names the node,
            its operation and what is supported).
    """
    onnx = require_onnx()
    from onnx import helper  # lazy: optional extra, checked by require_onnx above


    newest = onnx.defs.onnx_opset_version()
    check_int("opset", opset, minimum=MIN_OPSET, maximum=newest)
    check_choice("form", form, FORMS)
    check_choice("bias", bias, BIASES)
    if form == "exact" and bias != "float":
        raise ValueError(f"bias={bias!r} applies to form='qdq'; form='exact' adds each bias as the simulator does "
                         f"(the int32 bias with its fractional bits, or the float bias over the accumulator's scale): "
                         f"leave bias at 'float' or export with form='qdq'")
    check_bool("signed_activations", signed_activations)
    program = _program(model, input_shape)
    if form == "exact":
        graph, builder = _exact_graph(program, opset, signed_activations)
    else:
        graph, builder = _graph(program, opset, bias, signed_activations)
    if name is not None:
        graph.name = str(name)
    proto = helper.make_model(graph, producer_name="nnlab", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", opset)],
                              doc_string=f"{program.name}: quantised with nnlab, "
                                         f"{'exact integer form' if form == 'exact' else 'quantize/dequantize form'}")
    proto.ir_version = min(proto.ir_version, _ir_version(opset))
    helper.set_model_props(proto, {
        "nnlab.weight_bits": json.dumps(builder.weight_bits),
        "nnlab.activation_tensors": json.dumps(builder.integer_tensors),
        "nnlab.activation_offsets": json.dumps(builder.offsets),
        "nnlab.bias": bias,
        "nnlab.form": form,
        "nnlab.inexact_layers": json.dumps(getattr(builder, "inexact", {})),
    })
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    atomic_write(path, proto.SerializeToString())
    for message in getattr(builder, "warnings", ()):
        warnings.warn(message, InexactExportWarning, stacklevel=2)
    return proto


def _ir_version(opset: int) -> int:
    """The IR version that goes with ``opset`` (an old runtime refuses a newer IR)."""
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import helper

    for entry in helper.VERSION_TABLE:  # (release, ir, opset, ...)
        if entry[2] >= opset:
            return entry[1]
    return helper.VERSION_TABLE[-1][1]


# ----------------------------------------------------------------------------- reading and running
def _load(path_or_proto):
    onnx = require_onnx()
    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    path = Path(path_or_proto)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    return onnx.load(str(path))


#: ONNX Runtime's graph optimisation levels :func:`run_onnx` offers (see the module docstring).
OPTIMIZATIONS = ("none", "basic", "all")


def _session(proto, threads: int, optimization: str):
    _, ort = require_onnx(runtime=True)
    options = ort.SessionOptions()
    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnx(model, images, *, optimization: str = "basic", threads: int = 1, batch_size: int = 256,
             intermediates: bool = False):
    """Run an exported file in ONNX Runtime on the CPU.

    Args:
        model: the ``.onnx`` path, or the ``onnx.ModelProto`` :func:`to_onnx` returned.
        images: float images ``(N, C, H, W)`` (NumPy array or torch tensor), normalised.
        optimization: ONNX Runtime's graph optimisations, one of :data:`OPTIMIZATIONS`:
            ``"basic"`` (default) runs the graph as written, QuantizeLinear, DequantizeLinear and float
            kernels; ``"all"`` lets it fuse the pairs into its integer kernels (``QLinearConv``), which
            on x86 CPUs without AVX512-VNNI saturate with 8-bit weights (see the module docstring).
        threads: ONNX Runtime's intra-op threads (1: the same results on every machine load).
        batch_size: images per call.
        intermediates: also return every quantised activation, as integers.

    Returns:
        logits ``(N, classes)``: float64 from an exact-form file, float32 from a qdq-form one;
        with ``intermediates``, ``(logits, {layer name: integers})``
        (the integers of the QuantizeLinear after each layer, ``(N, C, H, W)`` or ``(N, features)``).

    Raises:
        ImportError: onnx or onnxruntime is missing.
    """
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import helper

    check_choice("optimization", optimization, OPTIMIZATIONS)
    check_int("threads", threads, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    proto = _load(model)
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    x = x.astype(np.float32, copy=False)
    tensors = {}
    if intermediates:
        props = {p.key: p.value for p in proto.metadata_props}
        tensors = json.loads(props.get("nnlab.activation_tensors", "{}"))
        if not tensors:
            raise ValueError("this ONNX file has no record of its quantised activations (nnlab.activation_tensors); "
                             "intermediates=True reads files written by nnlab.export.to_onnx")
        proto = type(proto).FromString(proto.SerializeToString())
        types = _tensor_types(proto)
        for layer, tensor in tensors.items():
            proto.graph.output.append(helper.make_tensor_value_info(tensor, types[tensor], None))
    session = _session(proto, threads, optimization)
    names = ["logits"] + list(tensors.values())
    outs = [[] for _ in names]
    for start in range(0, len(x), batch_size):
        for acc, value in zip(outs, session.run(names, {session.get_inputs()[0].name: x[start: start + batch_size]})):
            acc.append(value)
    results = [np.concatenate(acc) if acc else np.zeros((0,), np.float32) for acc in outs]
    if not intermediates:
        return results[0]
    offsets = json.loads(props.get("nnlab.activation_offsets", "{}"))
    return results[0], {layer: results[i + 1].astype(np.int64) - offsets.get(layer, 0)
                        for i, layer in enumerate(tensors)}


def _tensor_types(proto) -> dict:
    """The element type of every QuantizeLinear output: its zero point's type."""
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    return {n.output[0]: inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}


def compare(model, program, images, *, optimization: str = "basic", threads: int = 1) -> dict:
    """ONNX Runtime against the simulator on the same images: top-1 and the integers of every layer.

    Args:
        model: the ``.onnx`` path or ModelProto (from :func:`to_onnx`).
        program: the :class:`~nnlab.nna.Program` the simulator runs (compiled from the same model).
        images: float images ``(N, C, H, W)``.
        optimization, threads: as for :func:`run_onnx`.

    Returns:
        dict: ``top1_agreement`` (share of images with the same top-1 class),
        ``identical_integers`` (share of every stored activation integer, all
        layers, that is identical), ``max_integer_difference``, ``layers``
        (per layer: ``identical``, ``max_difference``, ``values``),
        ``max_logit_difference`` (largest absolute difference of the logits)
        and ``images``.
    """
    logits, ints = run_onnx(model, images, optimization=optimization, threads=threads, intermediates=True)
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    sim = nna.run(program, x, trace=True)
    layers, same, total, worst = {}, 0, 0, 0
    for layer, got in ints.items():
        if layer not in sim.outputs:
            raise ValueError(f"layer {layer!r} of the ONNX file is not in program {program.name!r}; compare the "
                             f"file with the program it was exported from")
        want = sim.outputs[layer].astype(np.int64)
        got = got.astype(np.int64).reshape(want.shape)
        diff = np.abs(got - want)
        n_same, n = int(np.count_nonzero(diff == 0)), int(diff.size)
        layers[layer] = {"identical": n_same / n, "max_difference": int(diff.max(initial=0)), "values": n}
        same, total, worst = same + n_same, total + n, max(worst, int(diff.max(initial=0)))
    return {
        "images": int(len(x)),
        "top1_agreement": float(np.mean(logits.argmax(axis=1) == sim.predictions)),
        "identical_integers": same / total if total else 1.0,
        "max_integer_difference": worst,
        "max_logit_difference": float(np.abs(logits.astype(np.float64) - sim.logits).max(initial=0.0)),
        "layers": layers,
    }


def node_table(model):
    """The exported graph's nodes as a pandas table: ``op``, ``name``, ``inputs``, ``output``.

    Args:
        model: the ``.onnx`` path or ModelProto.
    """
    proto = _load(model)
    return pd.DataFrame([{"op": n.op_type, "name": n.name, "inputs": ", ".join(n.input), "output": ", ".join(n.output)}
                         for n in proto.graph.node])


def weight_storage(model):
    """What each stored weight tensor is: a pandas table of ``tensor``, ``type`` (INT4/INT8/...), ``shape``,
    ``zeros`` (how many integers are 0) and ``bytes`` (packed, as ONNX stores them).

    Args:
        model: the ``.onnx`` path or ModelProto.
    """
    # lazy: onnx is an optional extra, imported only when exporting
    from onnx import TensorProto, numpy_helper

    proto = _load(model)
    rows = []
    for t in proto.graph.initializer:
        if not t.name.endswith(".weight_quantised"):
            continue
        values = numpy_helper.to_array(t)
        rows.append({"tensor": t.name, "type": TensorProto.DataType.Name(t.data_type), "shape": tuple(t.dims),
                     "zeros": int(np.count_nonzero(values.astype(np.int64) == 0)), "bytes": len(t.raw_data)})
    return pd.DataFrame(rows)
