"""Import a model converted by PyTorch's own int8 flow (eager or FX) into an integer :class:`Program`.

:func:`compile_torch_int8` reads the converted model's graph
(:func:`~nnlab.nna.torch_int8.int8_graph`) node by node, keeping PyTorch's
scales and zero points, so that the engine's ``"torch"`` mode reproduces
PyTorch's integers exactly.  Each weight layer records which of PyTorch's
kernels runs it on this machine (:func:`torch_conv_kernel`,
:func:`torch_linear_kernel`, from a look at ``/proc/cpuinfo`` for
AVX512-VNNI): on CPUs without it fbgemm sums pairs of products in int16
with saturation, which the engine emulates
(:func:`nnlab.nna.engine.int16_pair_saturation`).

PyTorch's side of the flow (making the int8 model, running it node by
node) is in :mod:`nnlab.nna.torch_int8`.
"""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import graph
from ..quant.grid import Grid
from ..quant.spec import QuantSpec
from .program import (AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer, _int_bias,
                      _weight_grid)
from .shapes import check_input_shape, output_shapes
from .torch_int8 import ENGINE_KEY, QuantizedRecorder, int8_graph, node_labels

__all__ = ["compile_torch_int8", "torch_conv_kernel", "torch_linear_kernel", "SUPPORTED_INT8", "QUINT8"]


def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


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
        if not any(n.target is torch.quantize_per_tensor or (n.op == "call_module" and isinstance(
                self.gm.get_submodule(n.target), nnq.Quantize)) for n in self.gm.graph.nodes):
            raise ValueError("qmodel quantizes nothing: convert it with PyTorch's int8 flow first "
                             "(nnlab.nna.quantise_torch_int8, or torch.ao.quantization's convert / convert_fx)")
        for node in self.gm.graph.nodes:
            self.node(node)
        return self.layers


def _import_torch_int8(qmodel, input_shape, engine):
    """(layers, layer name -> name of the node whose integers it outputs) of a converted model."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    recorded = qmodel.meta.get(ENGINE_KEY) if isinstance(qmodel, fx.GraphModule) else getattr(qmodel, ENGINE_KEY,
                                                                                               None)
    engine = _engine(engine or recorded)
    gm = int8_graph(qmodel)
    importer = _Int8Importer(gm, check_input_shape(input_shape), engine)
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
