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

The other ways to a program have their own modules: a model converted by
PyTorch's int8 flow, :mod:`nnlab.nna.import_torch`
(:func:`~nnlab.nna.import_torch.compile_torch_int8`); other weight
bit-depths and sparsities for a compiled program, :mod:`nnlab.nna.whatif`
(:func:`~nnlab.nna.whatif.requantise_weights`).  Their names can still be
imported from here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import graph
from ..quant import ActQuantiser, quantised_weight, weight_quantiser
from ..quant.tensor import check_finite_parameters
# PyTorch's int8 import and the what-if re-quantiser lived in this module before it was split by subject: their
# names (and the private ones tests use) stay importable from here.
from .import_torch import (QUINT8, SUPPORTED_INT8, _cpu_has_avx512_vnni, _fbgemm_depthwise,  # noqa: F401
                           _import_torch_int8, compile_torch_int8, torch_conv_kernel, torch_linear_kernel)
from .program import (AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer, _int_bias,
                      _weight_grid)
from .shapes import check_input_shape, output_shapes
from .whatif import requantise_weights

__all__ = ["compile_model", "SUPPORTED",
           # re-exported from their own modules (see the module docstring)
           "compile_torch_int8", "requantise_weights", "output_shapes", "torch_conv_kernel", "torch_linear_kernel",
           "SUPPORTED_INT8", "QUINT8"]

#: What the compiler accepts, for error messages.
SUPPORTED = graph.SUPPORTED


# ----------------------------------------------------------------------------- nnlab models
def _fold_batchnorm(codes, scale, bias, bn, name):
    """Fold ``bn`` (eval mode) into per-channel scales and the bias; the integer weights keep their magnitude."""
    k = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).cpu().numpy()
    bias = (bias - bn.running_mean.double().cpu().numpy()) * k + bn.bias.detach().double().cpu().numpy()
    flip = k < 0
    if flip.any():
        codes = codes.copy()
        codes[flip] = -codes[flip]
    return codes, (scale.astype(np.float64) * np.abs(k)).astype(np.float32), bias


def _scale_empty_channels(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Give every channel whose weights are all zero the layer's largest scale.

    Such a channel (left by coring, or by weights that all round to 0) outputs
    only its bias, whatever its scale: its integers are 0 on any grid.  Its
    quantiser, though, may have set a tiny scale (the smallest one allowed,
    for a channel whose largest weight is 0), and on the accumulator's scale
    ``in_scale * weight_scale`` its bias would then not fit in int32.  With the
    layer's largest scale (1.0 when every channel is empty) the computed
    network is the same and the bias fits.
    """
    empty = ~codes.reshape(codes.shape[0], -1).any(axis=1)
    if not empty.any():
        return scale
    scale = scale.copy()
    scale[empty] = scale[~empty].max() if not empty.all() else 1.0
    return scale


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
        scale = _scale_empty_channels(codes, scale)
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
    shape = check_input_shape(input_shape)
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
