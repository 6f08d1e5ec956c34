"""The compiler: from a trained, pruned and quantised PyTorch model to an integer :class:`Program`.

The pipeline of :func:`compile_model`, for a model quantised by
:mod:`nnlab.quant` (read its module docstring: weights carry a
``WeightQuantiser`` parametrization, ``ActQuantiser`` modules sit on the
input and wherever the NNA stores a tensor):

1. **trace** the model with ``torch.fx`` and classify every node
   (:mod:`nnlab.graph`): what cannot run on the NNA is refused, naming the
   node, its operation and what is supported; nothing is skipped.
2. **fuse** the nodes into the NNA's layers (:func:`nnlab.graph.fuse`): a
   Conv2d/Linear with its batch norm, activation clamps and max pool; an
   add; a concat; an average pool; each followed by the activation
   quantiser that gives its output grid.  A max pool before the quantiser
   runs after the requantisation: rounding onto a grid never reorders
   values, so the maximum is the same.
3. **emit** one program layer per step, reading the earlier layers it names
   (a DAG): the weights as integer codes with their
   :class:`~nnlab.quant.Grid`, batch norm folded into the weight scale and
   the bias (exactly: the integer weights do not change; a negative factor
   flips their sign), the bias as int32 on the accumulator's scale
   ``in_scale * weight_scale``, each activation grid read from its quantiser
   (:meth:`~nnlab.quant.ActQuantiser.grid`).  Shapes are measured by running
   the graph once (:func:`nnlab.graph.node_shapes`) and checked against the
   program's own (:func:`output_shapes`).

:func:`compile_torch_int8` reads an 8-bit model converted by PyTorch's own
``torch.ao.quantization`` flow, eager or graph mode (FX; see
:mod:`nnlab.nna.torch_int8`), node by node from its graph, keeping its
scales and zero points, so that the ``"torch"`` mode reproduces PyTorch's
integers exactly, int16 saturation of fbgemm's AVX2 kernels included.

:func:`requantise_weights` re-targets a program's weights to other
bit-depths and sparsities (the what-if explorer uses it).
"""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import graph
from .._args import check_float, check_int
from ..quant.grid import Grid
from ..quant.spec import QuantSpec
from ..quant.tensor import check_finite_parameters
from .program import (MAX_BIAS_FRAC_BITS, AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program,
                      WeightLayer)

__all__ = ["compile_model", "compile_torch_int8", "requantise_weights", "output_shapes", "torch_conv_kernel",
           "torch_linear_kernel", "SUPPORTED", "SUPPORTED_INT8"]

#: What the compiler accepts, for error messages.
SUPPORTED = graph.SUPPORTED


def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


# ----------------------------------------------------------------------------- shapes
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


# ----------------------------------------------------------------------------- nnlab models
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


def _fold_batchnorm(codes, scale, bias, bn, name):
    """Fold ``bn`` (eval mode) into per-channel scales and the bias; the integer weights keep their magnitude."""
    k = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).cpu().numpy()
    bias = (bias - bn.running_mean.double().cpu().numpy()) * k + bn.bias.detach().double().cpu().numpy()
    flip = k < 0
    if flip.any():
        codes = codes.copy()
        codes[flip] = -codes[flip]
    return codes, (scale.astype(np.float64) * np.abs(k)).astype(np.float32), bias


def _weight_grid(spec: QuantSpec, scale: np.ndarray) -> Grid:
    """A program's weight grid: the spec made per channel (axis 0), one scale per output channel, zero points 0."""
    return Grid(spec.replace(granularity="per_channel", ch_axis=0), scale, np.zeros(scale.shape, np.int64))


class _Compiler:
    """Turns the fused steps of a quantised model's graph into program layers."""

    def __init__(self, gm, ops, shapes, input_shape):
        self.gm, self.ops, self.shapes, self.input_shape = gm, ops, shapes, input_shape
        self.layers, self.values, self.absorbed = [], {}, set()

    # -- helpers
    def name(self, wanted: str, node) -> str:
        taken = {layer.name for layer in self.layers}
        return wanted if wanted not in taken else node.name

    def quantiser_after(self, node):
        """The ActQuantiser node reading ``node`` as its only user, with its grid, or (None, None)."""
        from ..quant import ActQuantiser

        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None, None
        m = self.gm.get_submodule(users[0].target)
        if not isinstance(m, ActQuantiser):
            return None, None
        if m.calibrating:
            raise ValueError(f"activation quantiser {users[0].target!r} is still calibrating; "
                             f"run nnlab.quant.calibrate")
        if m.spec.per_channel:
            raise ValueError(f"activation quantiser {users[0].target!r} is per channel; the NNA needs per-tensor grids")
        self.absorbed.add(users[0])
        return users[0], m.grid()

    def read(self, node, reader: str):
        """(layer name, grid) of the tensor ``node``, which ``reader`` reads: it must be on a grid."""
        if node not in self.values:
            if self.ops[node].kind == "input":
                raise ValueError(f"the model's input is not quantised before {reader!r}: quantise activations "
                                 f"(nnlab.quant.quantise_model with act_bits) so that it starts with an input "
                                 f"quantiser")
            raise ValueError(f"the output of node {graph.node_label(node)!r} ({self.ops[node].what}) is not "
                             f"quantised before {reader!r}; quantise activations (nnlab.quant.quantise_model with "
                             f"act_bits)")
        name, grid = self.values[node]
        if grid is None:
            raise ValueError(f"{reader!r} reads the int32 sums of the last layer {name!r}; only a reshape may "
                             f"follow the last Conv2d/Linear")
        return name, grid

    def out_grid(self, step, final_ok: bool):
        """The grid of the step's output (its quantiser's), None for a last Conv2d/Linear; and the output node."""
        qnode, grid = self.quantiser_after(step.tail)
        if qnode is not None:
            return grid, qnode
        if final_ok and graph.reaches_output_only(step.tail, self.ops):
            return None, step.tail
        raise ValueError(f"the output of {step.kind} {step.name!r} (node {step.tail.name!r}) is not quantised: the "
                         f"NNA stores it on a grid, so an activation quantiser must follow it; quantise the model "
                         f"with nnlab.quant.quantise_model(act_bits=...)")

    def emit(self, step, layer, grid, value_node):
        """Append ``layer`` (and the step's fused max pool after it); ``value_node`` now holds its output."""
        self.layers.append(layer)
        last = layer.name
        if step.maxpool is not None:
            pool = step.maxpool
            if grid is None:
                raise ValueError(f"max pool {pool.name!r} follows the last layer {layer.name!r}, whose int32 sums "
                                 f"have no grid; the NNA pools quantised tensors")
            last = self.name(pool.name, pool.node)
            self.layers.append(PoolLayer(last, "maxpool2d", (layer.name,), pool.attrs["kernel_size"],
                                         pool.attrs["stride"], pool.attrs["padding"], grid, grid))
        self.values[value_node] = (last, grid)

    # -- one method per step kind
    def input(self, step):
        qnode, grid = self.quantiser_after(step.tail)
        if qnode is None:
            raise ValueError("the model's input is not quantised: quantise activations (nnlab.quant.quantise_model "
                             "with act_bits) so that it starts with an input quantiser")
        layer = InputLayer(str(qnode.target), grid, self.input_shape)
        self.layers.append(layer)
        self.values[qnode] = (layer.name, grid)

    def weight(self, step):
        from ..quant import quantised_weight, weight_quantiser

        op, m = step.head, step.head.module
        in_name, in_grid = self.read(step.inputs[0], op.name)
        grid, value_node = self.out_grid(step, final_ok=True)
        if weight_quantiser(m) is None:
            raise ValueError(f"layer {op.name!r} ({type(m).__name__}) has float weights; quantise the model first "
                             f"(nnlab.quant.quantise_model)")
        codes, spec, scale, zero_point = quantised_weight(m)
        if torch.any(zero_point != 0):
            raise ValueError(f"layer {op.name!r}: weight zero points must be 0 (symmetric weights); got {spec}")
        codes = codes.cpu().numpy().astype(np.int32)
        out_ch = codes.shape[0]
        scale = np.broadcast_to(scale.detach().cpu().float().numpy(), (out_ch,)).astype(np.float32)
        bias = np.zeros(out_ch) if m.bias is None else m.bias.detach().cpu().double().numpy()
        if step.batchnorm is not None:
            codes, scale, bias = _fold_batchnorm(codes, scale, bias, step.batchnorm.module, op.name)
            if codes.max() > spec.quant_max or codes.min() < spec.quant_min:
                raise ValueError(f"layer {op.name!r}: folding a negative batch-norm factor pushes a weight outside "
                                 f"the {spec.bits}-bit grid; use narrow_range=True weights")
        conv = op.kind == "conv2d"
        geometry = {k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")} if conv else {}
        int_bias, frac_bits = _int_bias(bias, in_grid.scale, scale, op.name)
        layer = WeightLayer(self.name(op.name, op.node), op.kind, (in_name,), codes, _weight_grid(spec, scale),
                            int_bias, in_grid, grid, activation=step.activation, bias_frac_bits=frac_bits,
                            **geometry)
        self.emit(step, layer, grid, value_node)

    def join(self, step, cls):
        """An add or a concat: read every operand on its grid, write onto the grid of the quantiser after it."""
        op = step.head
        ins = [self.read(n, op.name) for n in op.attrs["operands"]]
        grid, value_node = self.out_grid(step, final_ok=False)
        layer = cls(self.name(op.name, op.node), tuple(n for n, _ in ins), tuple(g for _, g in ins), grid,
                    step.activation)
        self.emit(step, layer, grid, value_node)

    def add(self, step):
        self.join(step, AddLayer)

    def cat(self, step):
        op = step.head
        rank = len(self.shapes[step.head.node])
        dim = op.attrs["dim"]
        if not isinstance(dim, int) or dim % rank != 1:
            raise graph.GraphError(f"node {op.name!r} (torch.cat) concatenates along dim {dim} of "
                                   f"{rank}-D tensors; the NNA concatenates channels (dim=1)")
        self.join(step, ConcatLayer)

    def pool_geometry(self, op):
        """kernel, stride, padding of an average pool (adaptive pools and means from the measured shapes)."""
        if "output_size" not in op.attrs:
            return op.attrs["kernel_size"], op.attrs["stride"], op.attrs["padding"]
        shape = self.shapes[op.inputs[0]]
        if len(shape) != 4:
            raise graph.GraphError(f"node {op.name!r} ({op.what}) averages a {len(shape)}-D tensor; the NNA "
                                   f"averages (N, C, H, W) feature maps")
        size = op.attrs["output_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        out = tuple(shape[2 + i] if s is None else int(s) for i, s in enumerate(size))
        if shape[2] % out[0] or shape[3] % out[1]:
            raise graph.GraphError(f"node {op.name!r} ({op.what}) pools {shape[2]}x{shape[3]} down to "
                                   f"{out[0]}x{out[1]}, which needs windows of different sizes; the NNA supports "
                                   f"output sizes that divide the input (1x1: a global average)")
        kernel = (shape[2] // out[0], shape[3] // out[1])
        return kernel, kernel, (0, 0)

    def avgpool2d(self, step):
        op = step.head
        in_name, in_grid = self.read(op.inputs[0], op.name)
        kernel, stride, padding = self.pool_geometry(op)
        grid, value_node = self.out_grid(step, final_ok=False)
        name = self.name(op.name, op.node)
        layer = PoolLayer(name, "avgpool2d", (in_name,), kernel, stride, padding, in_grid, grid,
                          activation=step.activation)
        if op.attrs.get("mean") and not op.attrs.get("keepdim"):  # mean((2, 3)) also drops H and W
            self.layers.append(layer)
            layer = FlattenLayer(self.name(f"{name}.flatten", op.node), (name,), grid)
        self.emit(step, layer, grid, value_node)

    def maxpool2d(self, step):
        op = step.head
        in_name, grid = self.read(op.inputs[0], op.name)
        layer = PoolLayer(self.name(op.name, op.node), "maxpool2d", (in_name,), op.attrs["kernel_size"],
                          op.attrs["stride"], op.attrs["padding"], grid, grid)
        self.layers.append(layer)
        self.values[op.node] = (layer.name, grid)

    def flatten(self, step):
        op = step.head
        src = op.inputs[0]
        if src not in self.values:
            self.read(src, op.name)  # raises: not quantised
        in_name, grid = self.values[src]
        before, after = self.shapes[src], self.shapes[op.node]
        if after != (before[0], int(np.prod(before[1:]))):
            raise graph.GraphError(f"node {op.name!r} ({op.what}) reshapes {before} to {after}; the NNA supports "
                                   f"flattening (N, C, H, W) to (N, C*H*W)")
        layer = FlattenLayer(self.name(op.name, op.node), (in_name,), grid)
        self.layers.append(layer)
        self.values[op.node] = (layer.name, grid)

    def identity(self, step):
        src = step.head.inputs[0]
        if src in self.values:
            self.values[step.head.node] = self.values[src]

    def quantise(self, step):
        if step.head.node in self.absorbed:
            return
        src = step.head.inputs[0]
        raise ValueError(f"activation quantiser {step.name!r} follows node {graph.node_label(src)!r} "
                         f"({self.ops[src].what}); the NNA quantises the input and the outputs of Conv2d/Linear, "
                         f"add, concat and average pool layers only")

    def output(self, step):
        src = step.head.inputs[0]
        if src not in self.values:
            self.read(src, "the output")  # raises
        name, _ = self.values[src]
        if self.layers[-1].name != name:
            raise ValueError(f"the model's output comes from layer {name!r}, but layers after it were compiled "
                             f"({self.layers[-1].name!r}); remove computations that do not reach the output")

    def run(self, steps):
        handlers = {"input": self.input, "conv2d": self.weight, "linear": self.weight, "add": self.add,
                    "cat": self.cat, "avgpool2d": self.avgpool2d, "maxpool2d": self.maxpool2d,
                    "flatten": self.flatten, "identity": self.identity, "quantise": self.quantise,
                    "shape": lambda step: None, "output": self.output}
        for step in steps:
            handlers[step.kind](step)
        return self.layers


def _check_input_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be positive integers, (C, H, W) or (features,), without the batch; "
                         f"got {input_shape!r}")
    return shape


def compile_model(model: nn.Module, input_shape=(1, 28, 28), *, name: str | None = None) -> Program:
    """Compile a model quantised with :mod:`nnlab.quant` into an integer :class:`Program`.

    Args:
        model: a model from :func:`nnlab.quant.quantise_model` (or
            :func:`~nnlab.quant.pretrained_quantised`), weights and
            activations quantised, pruned or not: any traceable network of
            the operations in :data:`SUPPORTED`.
        input_shape: shape of one input image, ``(C, H, W)``.
        name: a label for reports (default: the model's class name).

    Returns:
        The :class:`Program`.

    Raises:
        nnlab.graph.GraphError: a node the NNA cannot run, or a model that
            cannot be traced; the message names the node and what is supported.
        ValueError: a weight or activation left in float, an activation
            quantiser still calibrating, a weight, bias or batch-norm statistic
            holding NaN or infinite values, or shapes that do not fit (names the layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    check_finite_parameters(model)  # the program would hold other numbers than the model
    gm = graph.trace(model)
    ops = graph.classify(gm)
    steps = graph.fuse(ops)
    shapes = graph.node_shapes(gm, shape)
    compiler = _Compiler(gm, ops, shapes, shape)
    layers = compiler.run(steps)
    if not any(isinstance(layer, WeightLayer) for layer in layers):
        raise ValueError("model has no Conv2d or Linear layer to compile")
    program = Program(layers, name or type(gm).__name__, "nnlab")
    program_shape = output_shapes(program)[program.output.name]
    torch_shape = shapes[next(n for n in gm.graph.nodes if n.op == "output").args[0]][1:]
    if program_shape != tuple(torch_shape):
        raise ValueError(f"the compiled program outputs shape {program_shape} but the model {tuple(torch_shape)}")
    return program


# ----------------------------------------------------------------------------- PyTorch's int8 models
def _cpu_has_avx512_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _refuse_onednn():
    return ValueError(
        "models converted with engine='onednn' are not supported: on CPUs without AVX512-VNNI oneDNN's int8 "
        "kernels sum neighbouring products in int16 with saturation, in an order the simulator does not reproduce "
        "(hundreds to thousands of integers differ), and on CPUs with AVX512-VNNI its rounding has not been "
        "verified; convert with engine='x86' (or 'fbgemm'), whose kernels the simulator reproduces exactly")


def _engine(engine):
    engine = engine or torch.backends.quantized.engine
    if engine == "onednn":
        raise _refuse_onednn()
    if engine not in ("x86", "fbgemm"):
        raise ValueError(f"quantized engine {engine!r} is not supported; use 'x86' or 'fbgemm'")
    return engine


def _fbgemm_depthwise(groups, in_channels, out_channels, kernel, stride, padding, dilation) -> bool:
    """True when fbgemm runs the convolution on its depthwise fast path (AVX2 code on every CPU)."""
    k = _pair(kernel)
    return (groups == in_channels == out_channels and groups % 8 == 0 and k[0] == k[1] and k[0] in (3, 5)
            and all(s in (1, 2) for s in _pair(stride)) and _pair(dilation) == (1, 1)
            and _pair(padding) == ((k[0] - 1) // 2,) * 2)


def torch_conv_kernel(engine: str | None = None, groups: int = 1, *, depthwise_fast_path: bool = False) -> str:
    """Which of PyTorch's kernels runs a quantized convolution on this machine (see :data:`~nnlab.nna.program.KERNELS`).

    With the ``"x86"`` engine PyTorch runs convolutions with symmetric
    weights and at most 100 groups through oneDNN when the CPU has
    AVX512-VNNI (``"onednn"``), the others through fbgemm; ``"fbgemm"``
    always uses fbgemm.  fbgemm sums in int32 on AVX512-VNNI CPUs
    (``"fbgemm"``) and in int16-saturating pairs elsewhere
    (``"fbgemm_avx2"``), and its depthwise fast path always runs AVX2 code.

    Args:
        engine: ``torch.backends.quantized.engine`` at conversion time (default: the current one).
        groups: the convolution's groups.
        depthwise_fast_path: the convolution takes fbgemm's depthwise fast path
            (a 3x3 or 5x5 depthwise convolution with a multiple of 8 channels,
            stride 1 or 2, padding ``(k - 1) / 2``).

    Returns:
        ``"fbgemm"``, ``"fbgemm_avx2"`` or ``"onednn"``.

    Raises:
        ValueError: engine ``"onednn"`` (refused: see :func:`compile_torch_int8`) or an unknown engine.
    """
    engine = _engine(engine)
    vnni = _cpu_has_avx512_vnni()
    if engine == "x86" and vnni and groups <= 100:
        return "onednn"
    return "fbgemm" if vnni and not depthwise_fast_path else "fbgemm_avx2"


def torch_linear_kernel(engine: str | None = None) -> str:
    """Which kernel runs a quantized Linear layer: fbgemm, ``"fbgemm"`` with AVX512-VNNI, else ``"fbgemm_avx2"``.

    Raises:
        ValueError: engine ``"onednn"`` or an unknown engine.
    """
    _engine(engine)
    return "fbgemm" if _cpu_has_avx512_vnni() else "fbgemm_avx2"


#: The grid of PyTorch's quint8 activations: 8 bits, unsigned, with a zero point.
QUINT8 = QuantSpec(8, signed=False, symmetric=False)


def _torch_grid(scale, zero_point, dtype, name) -> Grid:
    if dtype != torch.quint8:
        raise ValueError(f"layer {name!r}: activations must be quint8 (PyTorch's default), got {dtype}")
    scale, zero_point = float(scale), int(zero_point)  # a Python number or a one-element tensor
    if float(np.float32(scale)) != scale:
        raise ValueError(f"layer {name!r}: scale {scale!r} is not a float32 value")
    return Grid(QUINT8, scale, zero_point)


def _torch_weight_layer(name, m, in_name, grid_in, engine):
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    w = m.weight()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zp = w.q_per_channel_scales(), w.q_per_channel_zero_points()
    else:
        scale, zp = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
    if torch.any(zp != 0):
        raise ValueError(f"layer {name!r}: weight zero points must be 0 (symmetric qint8 weights), got {w.qscheme()}")
    codes = w.int_repr().numpy().astype(np.int32)
    out_ch = codes.shape[0]
    scale = np.broadcast_to(scale.numpy().astype(np.float32), (out_ch,)).copy()  # PyTorch keeps them as float
    bias = m.bias()
    bias_float = np.zeros(out_ch, np.float32) if bias is None else bias.detach().numpy().astype(np.float32)
    conv = isinstance(m, nnq.Conv2d)
    geometry = {}
    if conv:
        if m.padding_mode != "zeros":
            raise ValueError(f"layer {name!r} pads with padding_mode={m.padding_mode!r}; the NNA pads with zeros")
        geometry = {"stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                    "groups": m.groups}
        fast = _fbgemm_depthwise(m.groups, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                 m.dilation)
        kernel = torch_conv_kernel(engine, m.groups, depthwise_fast_path=fast)
    else:
        kernel = torch_linear_kernel(engine)
    out = _torch_grid(m.scale, m.zero_point, torch.quint8, name)
    atw = grid_in.scale * scale  # float32, as PyTorch computes it
    relu = isinstance(m, (nniq.ConvReLU2d, nniq.LinearReLU))
    return WeightLayer(
        name, "conv2d" if conv else "linear", (in_name,), codes,
        _weight_grid(QuantSpec(8, signed=True, symmetric=True), scale), _int_bias(bias_float, 1.0, atw, name, 0)[0],
        grid_in, out, activation=(0.0, None) if relu else None, bias_float=bias_float, kernel=kernel, **geometry)


#: What :func:`compile_torch_int8` reads, for error messages.
SUPPORTED_INT8 = ("quantize_per_tensor (or a converted QuantStub) on the model's input; quantized Conv2d, "
                  "ConvReLU2d (any stride, padding, dilation and groups), Linear, LinearReLU; "
                  "torch.ops.quantized.add and add_relu; torch.cat (or torch.ops.quantized.cat) along channels; "
                  "ReLU, ReLU6, Hardtanh (and F.relu, F.relu6, F.hardtanh) right after a layer whose output only "
                  "they read; MaxPool2d, "
                  "AvgPool2d, AdaptiveAvgPool2d (and their functional forms); mean over H and W of a contiguous "
                  "tensor; flatten/view/reshape to (N, features); Identity, Dropout; dequantize at the end")

_FUSABLE = (WeightLayer, AddLayer, ConcatLayer, PoolLayer)


@dataclasses.dataclass(frozen=True)
class _Float:
    """A float tensor that holds the dequantized integers of layer ``name`` (on ``grid``), PyTorch's node ``node``."""

    name: str
    grid: Grid
    node: str


def _quantized_op(name: str):
    """The ``torch.ops.quantized`` operator ``name`` and its default overload (both may appear as node targets)."""
    packet = getattr(torch.ops.quantized, name)
    return {packet, packet.default}


class _Int8Importer:
    """Reads a converted model's graph (eager or FX) node by node into program layers.

    Every node becomes a layer, joins the layer before it (a clamp, an
    identity), or is refused with an error naming it.  Each layer's output
    grid is the one PyTorch's tensor carries, read from one probe run of the
    graph (:class:`~nnlab.nna.torch_int8.QuantizedRecorder`), which also
    gives shapes and memory formats.
    """

    def __init__(self, gm, input_shape, engine):
        from .torch_int8 import QuantizedRecorder, node_labels

        self.gm, self.input_shape, self.engine = gm, input_shape, engine
        self.labels = node_labels(gm)
        self.layers, self.values, self.nodes = [], {}, {}  # values: node -> (layer name, grid) or a marker
        recorder = QuantizedRecorder(gm, keep=True)
        with torch.no_grad():
            try:
                recorder.run(torch.zeros((2, *input_shape)))
            except Exception as exc:
                where = f"node {self.label(recorder.failed)!r} ({self.what(recorder.failed)})" \
                    if recorder.failed is not None else "the model"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ValueError(f"{where} fails on inputs of shape {tuple(input_shape)} (batch left out): "
                                 f"{type(exc).__name__}: {first}; check input_shape") from exc
        self.tensors = recorder.tensors

    # -- helpers
    def label(self, node) -> str:
        return self.labels[node]

    def what(self, node) -> str:
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        return graph.node_operation(node, module)

    def refuse(self, node, reason, hint=None):
        return graph.GraphError(f"node {self.label(node)!r} ({self.what(node)}) {reason}; "
                                f"{hint or 'supported: ' + SUPPORTED_INT8}")

    def grid_of(self, node) -> Grid:
        """The grid of the quantized tensor ``node`` outputs in the probe run."""
        t = self.tensors.get(node)
        if t is None or not t.is_quantized:
            raise self.refuse(node, "does not output a quantized tensor")
        if t.qscheme() != torch.per_tensor_affine:
            raise self.refuse(node, f"outputs a tensor quantized with {t.qscheme()}",
                              "activations must be quantized per tensor (quint8)")
        return _torch_grid(t.q_scale(), t.q_zero_point(), t.dtype, self.label(node))

    def shape(self, node) -> tuple:
        return tuple(self.tensors[node].shape)

    def channels_last(self, node) -> bool:
        t = self.tensors[node]
        return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)

    def read(self, node, reader):
        """(layer name, grid) of the quantized value ``node`` that ``reader`` reads."""
        value = self.values.get(node)
        if isinstance(value, tuple) and isinstance(value[1], Grid):
            return value
        if isinstance(value, _Float):
            raise self.refuse(reader, f"computes in float on the dequantized output of {value.node!r}",
                              "the simulator runs quantized operations; between a dequantize and a "
                              "quantize_per_tensor only reshapes may run (as around an nn.Flatten module)")
        if value == "float":
            raise self.refuse(reader, f"computes on the float tensor {self.label(node)!r}",
                              "the simulator runs a graph quantized from its input to a dequantize at the end; "
                              "convert the whole model (no float operations between quantized layers)")
        raise self.refuse(reader, f"reads {self.label(node)!r}, which holds no quantized tensor")

    def emit(self, node, layer):
        if layer.name in self.nodes:
            raise self.refuse(node, f"would give a second layer named {layer.name!r}")
        self.layers.append(layer)
        self.nodes[layer.name] = self.label(node)
        self.values[node] = (layer.name, layer.out_grid)

    def same_grid(self, node, grid):
        """Check that PyTorch's output of ``node`` is on ``grid`` (ops that keep their input's grid)."""
        have = self.grid_of(node)
        if have != grid:
            raise self.refuse(node, f"outputs {have}, not its input's grid {grid}",
                              "the simulator expects clamps, pools and reshapes to keep their input's grid")

    # -- nodes
    def quantise(self, node, src):
        value = self.values.get(src)
        if isinstance(value, _Float):  # dequantize, reshapes in float, quantize_per_tensor: a requantisation
            self.emit(node, ConcatLayer(self.label(node), (value.name,), (value.grid,), self.grid_of(node)))
            return
        if self.layers:
            raise self.refuse(node, "quantizes a tensor a second time", "the simulator quantizes the model's input "
                              "once, first; convert the whole model (no float operations between quantized layers)")
        if src is None or src.op != "placeholder":
            raise self.refuse(node, "quantizes a float computation on the model's input",
                              "the simulator quantizes the model's input itself")
        self.emit(node, InputLayer(self.label(node), self.grid_of(node), self.input_shape))

    def weight(self, node, m):
        in_name, in_grid = self.read(node.args[0], node)
        self.emit(node, _torch_weight_layer(self.label(node), m, in_name, in_grid, self.engine))
        if self.layers[-1].out_grid != self.grid_of(node):
            raise self.refuse(node, f"outputs {self.grid_of(node)}, not its module's grid")

    def clamp(self, node, src, lo, hi):
        """A ReLU/ReLU6/Hardtanh on a quantized tensor: a clamp of the integers, fused into the layer before it."""
        name, grid = self.read(src, node)
        index = next(i for i, layer in enumerate(self.layers) if layer.name == name)
        layer = self.layers[index]
        if not isinstance(layer, _FUSABLE) or getattr(layer, "op", "") == "maxpool2d" or layer.out_grid is None:
            raise self.refuse(node, f"clamps the output of {self.nodes[name]!r} ({layer.op}), which cannot take "
                              f"a clamp", "a ReLU/ReLU6/Hardtanh must directly follow a convolution, Linear, add, "
                              "concat or average pool")
        holders = {n for n, v in self.values.items() if v == (name, grid)}  # the value and its identities
        if {u for n in holders for u in n.users} - holders != {node}:
            raise self.refuse(node, f"clamps the output of {self.nodes[name]!r}, which is also read elsewhere",
                              "a clamp is fused into the layer before it, so it must be that output's only reader")
        self.same_grid(node, grid)
        activation = graph._intersect(layer.activation, (lo, hi))
        self.layers[index] = dataclasses.replace(layer, activation=activation)
        self.nodes[name] = self.label(node)
        self.values[node] = (name, grid)

    def join(self, node, cls, operands, relu=False):
        ins = [self.read(n, node) for n in operands]
        grid = self.grid_of(node)
        extra = {"rounding": "qadd"} if cls is AddLayer else {}  # PyTorch's quantized::add kernel
        self.emit(node, cls(self.label(node), tuple(n for n, _ in ins), tuple(g for _, g in ins), grid,
                            (0.0, None) if relu else None, **extra))

    def cat(self, node, tensors, dim):
        rank = len(self.shape(node))
        if not isinstance(dim, int) or dim % rank != 1:
            raise self.refuse(node, f"concatenates along dim {dim} of {rank}-D tensors",
                              "the simulator concatenates channels (dim=1)")
        self.join(node, ConcatLayer, tensors)

    def pool(self, node, op):
        """Max, average, adaptive average pool or mean: ``op`` is nnlab's classification of the node."""
        src = op.inputs[0]
        in_name, grid = self.read(src, node)
        shape = self.shape(src)
        if len(shape) != 4:
            raise self.refuse(node, f"pools a {len(shape)}-D tensor", "the simulator pools (N, C, H, W) tensors")
        if op.kind == "maxpool2d":
            layer = PoolLayer(self.label(node), "maxpool2d", (in_name,), op.attrs["kernel_size"], op.attrs["stride"],
                              op.attrs["padding"], grid, grid)
        else:
            nhwc = self.channels_last(src)
            if "output_size" in op.attrs:
                size = op.attrs["output_size"]
                size = (size, size) if isinstance(size, int) else tuple(size)
                out = tuple(shape[2 + i] if s is None else int(s) for i, s in enumerate(size))
                if shape[2] % out[0] or shape[3] % out[1]:
                    raise self.refuse(node, f"pools {shape[2]}x{shape[3]} down to {out[0]}x{out[1]}, which needs "
                                      f"windows of different sizes", "output sizes that divide the input")
                kernel = (shape[2] // out[0], shape[3] // out[1])
                stride, padding = kernel, (0, 0)
                if op.attrs.get("mean"):
                    if nhwc and shape[1] > 1 and shape[2] * shape[3] > 1:
                        raise self.refuse(
                            node, "averages a channels-last quantized tensor (the output of a quantized "
                            "convolution or add), which PyTorch computes as the float32 mean of dequantised values "
                            "in a summation order the simulator does not reproduce",
                            "use nn.AdaptiveAvgPool2d(1) or F.adaptive_avg_pool2d(x, 1), which it reproduces exactly")
                    rounding = "raw"
                else:
                    rounding = "scaled" if nhwc else "raw_scaled"
            else:
                kernel, stride, padding = op.attrs["kernel_size"], op.attrs["stride"], op.attrs["padding"]
                rounding = "scaled" if nhwc else "scaled_zp"
            layer = PoolLayer(self.label(node), "avgpool2d", (in_name,), kernel, stride, padding, grid, grid,
                              rounding=rounding)
        self.emit(node, layer)
        self.same_grid(node, grid)
        if op.attrs.get("mean") and not op.attrs.get("keepdim"):  # mean((2, 3)) also drops H and W
            self.layers.append(FlattenLayer(f"{layer.name}.flatten", (layer.name,), grid))
            self.values[node] = (self.layers[-1].name, grid)
            self.nodes[self.layers[-1].name] = self.label(node)

    def reshape(self, node, src):
        value = self.values.get(src)
        in_name, grid = (value.name, value.grid) if isinstance(value, _Float) else self.read(src, node)
        before, after = self.shape(src), self.shape(node)
        if after == before:
            self.values[node] = value
            return
        if after != (before[0], int(np.prod(before[1:]))):
            raise self.refuse(node, f"reshapes {before} to {after}", "flattening (N, C, H, W) to (N, C*H*W)")
        layer = FlattenLayer(self.label(node), (in_name,), grid)
        self.emit(node, layer)
        if isinstance(value, _Float):  # a float reshape of dequantized integers: the same integers, reshaped
            self.nodes[layer.name] = value.node
            self.values[node] = _Float(layer.name, grid, value.node)
        else:
            self.same_grid(node, grid)

    def dequantise(self, node, src):
        name, grid = self.read(src, node)
        self.values[node] = _Float(name, grid, self.nodes[name])

    def identity(self, node, src):
        if src is None:
            raise self.refuse(node, "reads no tensor")
        self.values[node] = self.values.get(src)

    def output(self, node):
        out = node.args[0]
        value = self.values.get(out) if isinstance(out, fx.Node) else None
        if isinstance(value, _Float):
            value = (value.name, value.grid)
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Grid)):
            raise graph.GraphError(f"the model returns {out!r}, not one quantized or dequantized tensor; the "
                                   f"simulator needs a model that returns one tensor (the logits)")
        if self.layers[-1].name != value[0]:
            raise ValueError(f"the model's output comes from layer {value[0]!r}, but layers after it were compiled "
                             f"({self.layers[-1].name!r}); remove computations that do not reach the output")

    # -- dispatch
    def node(self, node):
        import torch.ao.nn.intrinsic.quantized as nniq
        import torch.ao.nn.quantized as nnq

        if node.op == "placeholder":
            self.values[node] = "float"
            return None
        if node.op == "get_attr":
            self.values[node] = "constant"
            return None
        if node.op == "output":
            return self.output(node)
        tensors = [n for n in node.all_input_nodes if self.values.get(n) not in ("constant", "shape")]
        src = tensors[0] if tensors else None
        if node.op == "call_function":
            return self.function(node, src)
        if node.op == "call_method":
            return self.method(node, src)
        m = self.gm.get_submodule(node.target)
        if isinstance(m, nnq.Quantize):
            return self.quantise(node, src)
        if isinstance(m, nnq.DeQuantize):
            return self.dequantise(node, src)
        if type(m) in (nnq.Conv2d, nniq.ConvReLU2d, nnq.Linear, nniq.LinearReLU):
            return self.weight(node, m)
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
            return self.identity(node, src)
        if type(m) is nnq.ReLU6:
            return self.clamp(node, src, 0.0, 6.0)
        if type(m) is nn.ReLU:
            return self.clamp(node, src, 0.0, None)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return self.clamp(node, src, float(m.min_val), float(m.max_val))
        if type(m) in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            return self.pool(node, graph.classify_module(node, m))
        if type(m) is nn.Flatten:
            return self.reshape(node, src)
        raise self.refuse(node, "is not supported")

    def function(self, node, src):
        f = node.target
        if f is torch.quantize_per_tensor:
            return self.quantise(node, node.args[0])
        if f is torch.dequantize:
            return self.dequantise(node, src)
        if (f is getattr and node.args[1:] == ("shape",)) or (f is operator.getitem
                                                            and self.values.get(node.args[0]) == "shape"):
            self.values[node] = "shape"
            return None
        if f in _quantized_op("add") or f in _quantized_op("add_relu"):
            a, b = node.args[0], node.args[1]
            return self.join(node, AddLayer, (a, b), relu=f in _quantized_op("add_relu"))
        if f in (torch.cat, torch.concat, torch.concatenate) or f in _quantized_op("cat"):
            tensors = graph._arg(node, 0, "tensors" if f not in _quantized_op("cat") else "qx")
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
                raise self.refuse(node, "concatenates something other than a list of tensors")
            return self.cat(node, tensors, graph._arg(node, 1, "dim", 0))
        if f in (F.relu, torch.relu):
            return self.clamp(node, src, 0.0, None)
        if f is F.relu6:
            return self.clamp(node, src, 0.0, 6.0)
        if f is F.hardtanh:
            return self.clamp(node, src, float(graph._arg(node, 1, "min_val", -1.0)),
                              float(graph._arg(node, 2, "max_val", 1.0)))
        if f in (F.max_pool2d, torch.max_pool2d, F.avg_pool2d, torch._C._nn.avg_pool2d, F.adaptive_avg_pool2d,
                 torch.mean):
            return self.pool(node, graph._function_op(node, set()))
        if f in (torch.flatten, torch.reshape):
            return self.reshape(node, src)
        if f in (F.dropout, F.dropout1d, F.dropout2d, torch.dropout):
            return self.identity(node, src)
        raise self.refuse(node, "is not supported")

    def method(self, node, src):
        name = node.target
        if name == "dequantize":
            return self.dequantise(node, src)
        if name in ("size", "dim"):
            self.values[node] = "shape"
            return None
        if name in ("view", "reshape", "flatten"):
            return self.reshape(node, src)
        if name == "contiguous":
            return self.identity(node, src)
        if name == "relu":
            return self.clamp(node, src, 0.0, None)
        if name == "mean":
            return self.pool(node, graph._method_op(node, set()))
        raise self.refuse(node, "is not supported")

    def run(self):
        import torch.ao.nn.quantized as nnq

        if not any(n.target is torch.quantize_per_tensor or (n.op == "call_module" and isinstance(
                self.gm.get_submodule(n.target), nnq.Quantize)) for n in self.gm.graph.nodes):
            raise ValueError("qmodel quantizes nothing: convert it with PyTorch's int8 flow first "
                             "(nnlab.nna.quantise_torch_int8, or torch.ao.quantization's convert / convert_fx)")
        for node in self.gm.graph.nodes:
            self.node(node)
        return self.layers


def _import_torch_int8(qmodel, input_shape, engine):
    """(layers, layer name -> name of the node whose integers it outputs) of a converted model."""
    from .torch_int8 import ENGINE_KEY, int8_graph

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    recorded = qmodel.meta.get(ENGINE_KEY) if isinstance(qmodel, fx.GraphModule) else getattr(qmodel, ENGINE_KEY,
                                                                                               None)
    engine = _engine(engine or recorded)
    gm = int8_graph(qmodel)
    importer = _Int8Importer(gm, _check_input_shape(input_shape), engine)
    layers = importer.run()
    return layers, importer.nodes, gm


def compile_torch_int8(qmodel: nn.Module, input_shape=(1, 28, 28), *, name: str | None = None,
                       engine: str | None = None) -> Program:
    """Compile a model converted by PyTorch's int8 flow, eager or FX, keeping its scales and zero points.

    Reads the converted model's graph node by node (an FX model's own
    graph; an eager model traced with :func:`nnlab.graph.trace`): the input's
    ``quantize_per_tensor`` (or converted ``QuantStub``), quantized
    Conv2d/ConvReLU2d (depthwise and grouped included)/Linear/LinearReLU
    modules, ``torch.ops.quantized.add``/``add_relu`` (also as eager
    ``FloatFunctional`` adds), ``torch.cat``, ReLU/ReLU6/Hardtanh on quantized
    tensors (a clamp of the integers, fused into the layer before it: the
    layer keeps its name and outputs what the clamp outputs), max, average
    and adaptive average pools, reshapes, and the ``dequantize`` at the end
    (:data:`SUPPORTED_INT8`).  Any other node is refused with an error that
    names it.  Each layer's output grid is the one PyTorch's tensor carries
    (from one run of the graph on zeros).

    Exactness, in ``"torch"`` mode: every layer reproduces PyTorch's
    integers.  Average pools keep their input's grid and round as PyTorch's
    kernel for the tensor's memory format does (``"scaled"`` for the
    channels-last output of a quantized convolution or add); ``mean`` over H
    and W of a channels-last tensor is refused (PyTorch takes a float32
    mean whose summation order is not reproduced): use ``AdaptiveAvgPool2d(1)``.
    Weight layers carry the kernel PyTorch runs them with on this machine
    (:func:`torch_conv_kernel`, :func:`torch_linear_kernel`): on CPUs without
    AVX512-VNNI that is ``"fbgemm_avx2"``, whose int16 saturation of pair
    sums the engine emulates exactly (:func:`nnlab.nna.engine.int16_pair_saturation`),
    so inputs beyond the calibrated range are matched too, and
    :func:`nnlab.nna.compare_torch_int8` reports how many sums saturated.

    Models converted with ``engine="onednn"`` are refused: without
    AVX512-VNNI oneDNN saturates at int16 in an order the simulator does not
    reproduce, and its rounding with AVX512-VNNI is not verified.

    Args:
        qmodel: the converted model (e.g. from :func:`nnlab.nna.quantise_torch_int8`, either flow).
        input_shape: one input's shape ``(C, H, W)`` (or ``(features,)``).
        name: a label for reports (default: the model's class name).
        engine: the quantized engine it was converted under (default: the one
            :func:`~nnlab.nna.quantise_torch_int8` recorded on it, else the current one).

    Returns:
        The :class:`Program` (``source="torch.ao"``).

    Raises:
        nnlab.graph.GraphError: a node the simulator does not support (named,
            with what is supported), or an eager model that cannot be traced.
        ValueError: engine ``"onednn"``, asymmetric weights, non-quint8
            activations, a model that fails on ``input_shape``.
    """
    layers, _, gm = _import_torch_int8(qmodel, input_shape, engine)
    program = Program(layers, name or gm.meta.get(graph.MODEL_CLASS, type(qmodel).__name__), "torch.ao")
    output_shapes(program)
    return program


# ----------------------------------------------------------------------------- what-if
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
