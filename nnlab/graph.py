"""One graph view of a model: its real data flow, traced with ``torch.fx``, every node classified.

Everything in nnlab that needs a model's structure reads it from here:
placing activation quantisers (:func:`nnlab.quant.attach_quantisers`),
folding batch norm and compiling for the NNA (:func:`nnlab.nna.compile_model`),
counting MACs and activations (:func:`nnlab.models.summary`).  Nothing walks a
list of child modules: a residual ``conv(x) + x`` in ``forward``, a
``Sequential`` subclass with its own ``forward`` or a ``torch.cat`` are seen
exactly as they run.

Three steps:

1. :func:`trace`: ``torch.fx`` symbolic tracing with :class:`Tracer`, which
   keeps Conv2d, Linear (parametrized ones included), nnlab's ``ActQuantiser``
   and every other ``torch.nn`` layer as one node each and opens containers
   (``Sequential``, custom blocks).  A model fx cannot trace (Python control
   flow on tensor values, ``.item()`` ...) gets a :class:`GraphError` naming
   the module where tracing stopped.
2. :func:`classify`: every node becomes an :class:`Op` of one of the kinds in
   :data:`KINDS`, or a :class:`GraphError` names the node, its operation and
   what is supported (:data:`SUPPORTED`).  No node is ever skipped.
3. :func:`fuse`: nodes are grouped into :class:`Step` s, the layers an
   accelerator runs: a *producer* (Conv2d/Linear, add, concat, average pool)
   with what fuses into it: a batch norm right after a Conv2d/Linear,
   activations (ReLU, ReLU6, Hardtanh: clamps of the output range) and one
   max pool (max pooling commutes with rounding onto a grid: both are
   non-decreasing).  The end of a step (its ``tail``) is where the NNA stores
   a tensor, so it is where an activation quantiser goes.

:func:`node_shapes` runs the graph once on zeros and records every tensor's shape.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .base import resolve_device, unwrap

__all__ = ["GraphError", "Tracer", "trace", "Op", "Step", "KINDS", "PRODUCERS", "SUPPORTED", "classify",
           "classify_module", "fuse", "is_act_quantiser", "node_shapes", "node_label", "node_operation", "quantiser_name", "nonnegative",
           "reaches_output_only"]

#: The kinds of node :func:`classify` knows.
KINDS = ("input", "output", "quantise", "conv2d", "linear", "batchnorm", "activation", "maxpool2d", "avgpool2d",
         "flatten", "add", "cat", "identity", "shape")
#: Kinds that compute new values onto a new grid (a :class:`Step` starts with one of them).
PRODUCERS = ("conv2d", "linear", "add", "cat", "avgpool2d")
#: What the graph view supports, for error messages.
SUPPORTED = ("Conv2d (any stride, padding, dilation and groups, zero padding), Linear, BatchNorm1d/2d right after "
             "them (folded), ReLU, ReLU6, Hardtanh (fused as clamps), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d and "
             "mean over H and W, Flatten/flatten/view/reshape to (N, features), Dropout, Identity, "
             "the sum of two tensors (+, torch.add), torch.cat along channels, and nnlab's ActQuantiser")


#: Key of ``GraphModule.meta`` that keeps the traced model's class name.
MODEL_CLASS = "nnlab_model_class"


class GraphError(ValueError):
    """A model nnlab cannot turn into its graph view: untraceable, or a node it does not support."""


# ----------------------------------------------------------------------------- tracing
def is_act_quantiser(m: nn.Module) -> bool:
    """Whether ``m`` is an activation quantiser (:class:`nnlab.quant.ActQuantiser` or a subclass).

    The class says so itself (``ACT_QUANTISER = True``), so that the graph,
    which the quantisers are built on, needs not import them.
    """
    return bool(getattr(type(m), "ACT_QUANTISER", False))


class Tracer(fx.Tracer):
    """``torch.fx`` tracer with nnlab's leaves.

    Leaves (one ``call_module`` node each): Conv2d and Linear (also when
    their weight is parametrized), nnlab's ActQuantiser, and every other
    module of ``torch.nn`` / ``torch.ao.nn`` except containers.  Containers
    and custom modules are opened, so the graph shows what ``forward`` does.
    """

    def __init__(self):
        super().__init__()
        self.stack = []  # (qualified name, class) of the modules being traced, outermost first
        self.failed_in = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_act_quantiser(m) or isinstance(m, (nn.Conv2d, nn.Linear)):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's data flow as a ``torch.fx.GraphModule`` (sharing the model's layers).

    Args:
        model: any ``nn.Module`` whose ``forward`` takes one tensor (a
            DistributedDataParallel wrapper: the model inside it).

    Returns:
        A GraphModule over ``model`` with the class name of ``model`` (also
        in ``gm.meta["nnlab_model_class"]``, which survives ``copy.deepcopy``);
        its layers are the model's own module objects.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        GraphError: torch.fx cannot trace the model; the message names the
            module where tracing stopped and what fx reported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        name, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"in module {name!r} ({cls})" if name else f"in the forward of {cls}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx: {where}: {type(exc).__name__}: {first}. "
            f"nnlab reads a model's structure from its traced graph, so forward must run the same operations for "
            f"every input (no if/for/while on tensor values, no .item() or .tolist())") from exc
    name = type(model).__name__
    if isinstance(model, fx.GraphModule):  # a copy of a GraphModule is called "GraphModule": keep the model's name
        name = model.meta.get(MODEL_CLASS, name)
    gm = fx.GraphModule(model, graph, class_name=name)
    gm.meta[MODEL_CLASS] = name
    return gm


# ----------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class Op:
    """One classified node.

    Attributes:
        node: the ``torch.fx`` node.
        kind: one of :data:`KINDS`.
        name: the module's qualified name for a module (``"layer1.0.conv1"``),
            otherwise the node's name (``"add"``, ``"cat_1"``).
        inputs: the nodes whose tensors it reads (shape queries excluded).
        module: the ``nn.Module`` it calls, or None.
        attrs: the operation's parameters, by kind: ``range`` (activation:
            ``(low, high)``, None for unbounded); ``kernel_size``, ``stride``,
            ``padding`` (pools); ``output_size`` (adaptive average pool);
            ``mean``, ``keepdim`` (mean); ``dim`` (cat); ``operands`` (add,
            cat: the tensors in order, repeats included); ``start_dim``,
            ``end_dim`` (flatten), ``shape_args`` (view/reshape).
    """

    node: fx.Node
    kind: str
    name: str
    inputs: tuple = ()
    module: nn.Module | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def what(self) -> str:
        """The operation, for messages: the module class or the function/method name."""
        return node_operation(self.node, self.module)


def node_operation(node: fx.Node, module=None) -> str:
    """A readable name of what ``node`` does (``"Conv2d"``, ``"torch.cat"``, ``"operator.mul"``, ``"method view"``)."""
    if node.op == "call_module":
        if module is None:
            return f"module {node.target}"
        if parametrize.is_parametrized(module):  # "ParametrizedConv2d" is a Conv2d with a quantised weight
            return type(module).__mro__[1].__name__
        return type(module).__name__
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions":
               "torch"}.get(mod, mod)
        return f"{mod}.{getattr(node.target, '__name__', node.target)}" if mod else str(node.target)
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    return node.op


def node_label(node: fx.Node) -> str:
    """The name a node is known by: the module's qualified name, or the node's own name."""
    return str(node.target) if node.op == "call_module" else node.name


def quantiser_name(node: fx.Node) -> str:
    """The name of the activation quantiser that follows ``node``: ``"<node>_quant"``.

    The node's fx name (``"pool1"``, ``"layer1_0_relu"``, ``"add_1"``), without
    the leading underscore fx gives names that start with a digit
    (``"1_quant"`` after module ``"1"`` of a plain ``nn.Sequential``).
    """
    return node.name.lstrip("_") + "_quant"


def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _refuse(node, module, reason, hint=None):
    what = node_operation(node, module)
    return GraphError(f"node {node_label(node)!r} ({what}) {reason}; "
                      f"{hint or 'supported: ' + SUPPORTED}")


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor_inputs(node, shape_nodes):
    seen = []
    for n in node.all_input_nodes:
        if n not in shape_nodes and n not in seen:
            seen.append(n)
    return tuple(seen)


def _conv_attrs(node, m):
    if m.padding_mode != "zeros":
        raise _refuse(node, m, f"pads with padding_mode={m.padding_mode!r}",
                      "the NNA pads with zeros (padding_mode='zeros')")
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" at stride 1: symmetric only when every dilation * (k - 1) is even
            total = [d * (k - 1) for d, k in zip(_pair(m.dilation), _pair(m.kernel_size))]
            if any(t % 2 for t in total):
                raise _refuse(node, m, "uses padding='same' with an even kernel (uneven padding)",
                              "the NNA pads the same on both sides; give an explicit padding")
            padding = tuple(t // 2 for t in total)
    return {"stride": _pair(m.stride), "padding": _pair(padding), "dilation": _pair(m.dilation), "groups": m.groups}


def _pool_attrs(node, m, kind, kernel_size, stride, padding, ceil_mode, dilation=1, count_include_pad=True,
                divisor_override=None, return_indices=False):
    if ceil_mode:
        raise _refuse(node, m, "uses ceil_mode=True", "the NNA pools with ceil_mode=False")
    if return_indices:
        raise _refuse(node, m, "returns indices", "the NNA pools values only (return_indices=False)")
    if _pair(dilation) != (1, 1):
        raise _refuse(node, m, f"has dilation={dilation}", "the NNA pools with dilation=1")
    if divisor_override is not None:
        raise _refuse(node, m, f"sets divisor_override={divisor_override}",
                      "the NNA divides by the window size (divisor_override=None)")
    if not count_include_pad and _pair(padding) != (0, 0):
        raise _refuse(node, m, "uses count_include_pad=False with padding",
                      "the NNA averages padded windows over the full window (count_include_pad=True)")
    kernel_size = _pair(kernel_size)
    stride = kernel_size if stride is None or stride == [] or stride == () else _pair(stride)
    return {"kernel_size": kernel_size, "stride": stride, "padding": _pair(padding)}


def _activation_range(node, m, lo, hi):
    lo = None if lo is None or math.isinf(lo) else float(lo)
    hi = None if hi is None or math.isinf(hi) else float(hi)
    if lo is not None and hi is not None and lo > hi:
        raise _refuse(node, m, f"clamps to an empty range [{lo}, {hi}]", "Hardtanh needs min_val <= max_val")
    return {"range": (lo, hi)}


def _module_op(node, m, shape_nodes):
    ins = _tensor_inputs(node, shape_nodes)
    name = str(node.target)

    def op(kind, **attrs):
        return Op(node, kind, name, ins, m, attrs)

    if is_act_quantiser(m):
        return op("quantise")
    if isinstance(m, nn.Conv2d):
        return op("conv2d", **_conv_attrs(node, m))
    if isinstance(m, nn.Linear):
        return op("linear")
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats or m.running_var is None:
            raise _refuse(node, m, "has no running statistics to fold",
                          "batch norm is folded with its running mean and variance (track_running_stats=True)")
        return op("batchnorm")
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return op("activation", **_activation_range(node, m, m.min_val, m.max_val))
    if isinstance(m, nn.ReLU):
        return op("activation", range=(0.0, None))
    if isinstance(m, nn.MaxPool2d):
        return op("maxpool2d", **_pool_attrs(node, m, "maxpool2d", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                             m.dilation, return_indices=m.return_indices))
    if isinstance(m, nn.AvgPool2d):
        return op("avgpool2d", **_pool_attrs(node, m, "avgpool2d", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                             count_include_pad=m.count_include_pad,
                                             divisor_override=m.divisor_override))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return op("avgpool2d", output_size=m.output_size)
    if isinstance(m, nn.Flatten):
        return op("flatten", start_dim=m.start_dim, end_dim=m.end_dim)
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)):
        return op("identity")
    raise _refuse(node, m, "is not supported")


_RELUS = {F.relu: (0.0, None), torch.relu: (0.0, None), F.relu6: (0.0, 6.0)}
_ADDS = (operator.add, operator.iadd, torch.add)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, torch.dropout)


def _function_op(node, shape_nodes):
    f, ins, name = node.target, _tensor_inputs(node, shape_nodes), node.name

    def op(kind, **attrs):
        return Op(node, kind, name, ins, None, attrs)

    def node_arg(i, key, default=None):
        return _arg(node, i, key, default)

    if f in _ADDS:
        a, b = node_arg(0, "input"), node_arg(1, "other")
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a in shape_nodes or b in shape_nodes:
            raise _refuse(node, None, "adds a constant", "the NNA adds two tensors (a residual connection)")
        if node.kwargs.get("alpha", 1) != 1:
            raise _refuse(node, None, f"scales its second operand (alpha={node.kwargs['alpha']})",
                          "the NNA adds two tensors, alpha=1")
        return op("add", operands=(a, b))
    if f in _CATS:
        tensors = node_arg(0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise _refuse(node, None, "concatenates something other than a list of tensors")
        dim = node_arg(1, "dim", 0)
        if dim == 0:
            raise _refuse(node, None, "concatenates along the batch (dim=0)", "the NNA concatenates channels (dim=1)")
        return op("cat", dim=dim, operands=tuple(tensors))
    if f in _RELUS:
        return op("activation", range=_RELUS[f])
    if f is F.hardtanh:
        return op("activation", **_activation_range(node, None, node_arg(1, "min_val", -1.0),
                                                    node_arg(2, "max_val", 1.0)))
    if f in (F.max_pool2d, torch.max_pool2d):
        return op("maxpool2d", **_pool_attrs(node, None, "maxpool2d", node_arg(1, "kernel_size"),
                                             node_arg(2, "stride"), node_arg(3, "padding", 0),
                                             node_arg(5, "ceil_mode", False), node_arg(4, "dilation", 1),
                                             return_indices=node_arg(6, "return_indices", False)))
    if f in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        return op("avgpool2d", **_pool_attrs(node, None, "avgpool2d", node_arg(1, "kernel_size"),
                                             node_arg(2, "stride"), node_arg(3, "padding", 0),
                                             node_arg(4, "ceil_mode", False),
                                             count_include_pad=node_arg(5, "count_include_pad", True),
                                             divisor_override=node_arg(6, "divisor_override")))
    if f is F.adaptive_avg_pool2d:
        return op("avgpool2d", output_size=node_arg(1, "output_size"))
    if f is torch.mean:
        return _mean_op(node, node_arg(1, "dim"), node_arg(2, "keepdim", False), ins)
    if f is torch.flatten:
        return op("flatten", start_dim=node_arg(1, "start_dim", 0), end_dim=node_arg(2, "end_dim", -1))
    if f is torch.reshape:
        return op("flatten", shape_args=node_arg(1, "shape"))
    if f in _DROPOUTS:
        return op("identity")
    if f in (getattr, operator.getitem) and node.args and node.args[0] in shape_nodes | _shape_sources(node):
        return op("shape")
    raise _refuse(node, None, "is not supported")


def _shape_sources(node):
    """{the tensor node} when ``node`` is ``getattr(x, "shape")``, else empty."""
    if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
        return {node.args[0]}
    return set()


def _mean_op(node, dims, keepdim, ins):
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if sorted(d % 4 if d < 0 else d for d in dims) != [2, 3]:
        raise _refuse(node, None, f"averages over dims {dims}",
                      "the NNA averages over height and width: mean((2, 3)) or mean((-2, -1))")
    return Op(node, "avgpool2d", node.name, ins, None, {"output_size": (1, 1), "mean": True, "keepdim": bool(keepdim)})


def _method_op(node, shape_nodes):
    name, ins = node.target, _tensor_inputs(node, shape_nodes)

    def op(kind, **attrs):
        return Op(node, kind, node.name, ins, None, attrs)

    if name in ("size", "dim"):
        return op("shape")
    if name in ("view", "reshape"):
        return op("flatten", shape_args=tuple(node.args[1:]) or node.kwargs.get("shape"))
    if name == "flatten":
        return op("flatten", start_dim=_arg(node, 1, "start_dim", 0), end_dim=_arg(node, 2, "end_dim", -1))
    if name == "add":
        other = _arg(node, 1, "other")
        if not isinstance(other, fx.Node) or other in shape_nodes:
            raise _refuse(node, None, "adds a constant", "the NNA adds two tensors (a residual connection)")
        if node.kwargs.get("alpha", 1) != 1:
            raise _refuse(node, None, "scales its second operand (alpha != 1)", "the NNA adds two tensors, alpha=1")
        return op("add", operands=(node.args[0], other))
    if name == "relu":
        return op("activation", range=(0.0, None))
    if name == "mean":
        return _mean_op(node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), ins)
    if name == "contiguous":
        return op("identity")
    raise _refuse(node, None, "is not supported")


def classify_module(node: fx.Node, module: nn.Module) -> Op:
    """Classify one ``call_module`` node calling ``module`` (see :func:`classify`).

    Raises:
        GraphError: a module nnlab does not support, or unsupported settings of one it does.
    """
    return _module_op(node, module, set())


def classify(gm: fx.GraphModule) -> dict:
    """Classify every node of a traced model.

    Args:
        gm: from :func:`trace`.

    Returns:
        dict ``node -> Op`` covering every node of the graph, in graph order.

    Raises:
        GraphError: a node nnlab does not support (the message names the
            node, its operation and what is supported), or a model with more
            than one input or output.
    """
    ops, shape_nodes = {}, set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"{type(gm).__name__}.forward takes {len(placeholders)} inputs "
                         f"({', '.join(n.name for n in placeholders)}); nnlab supports models with one input tensor")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            op = Op(node, "input", node.name)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise GraphError(f"the model returns {type(out).__name__} {out!r}; nnlab supports models that "
                                 f"return one tensor (the logits)")
            op = Op(node, "output", "output", (out,))
        elif node.op == "call_module":
            op = _module_op(node, gm.get_submodule(node.target), shape_nodes)
        elif node.op == "call_function":
            op = _function_op(node, shape_nodes)
        elif node.op == "call_method":
            op = _method_op(node, shape_nodes)
        else:  # get_attr: a parameter or buffer used outside a module
            raise _refuse(node, None, "uses a parameter or buffer outside a module",
                          "weights must live in Conv2d/Linear modules so that they can be quantised")
        if op.kind == "shape":
            shape_nodes.add(node)
        ops[node] = op
    return ops


# ----------------------------------------------------------------------------- fusion
@dataclass
class Step:
    """One layer the NNA runs: a node and what fuses into it.

    Attributes:
        kind: the first node's kind (:data:`KINDS`).
        ops: the fused :class:`Op` s in data-flow order: the producer, then
            [batch norm] and any activations and at most one max pool.
        batchnorm: the folded batch norm's Op, or None.
        activation: the intersection of the fused clamps, ``(low, high)``
            (None for unbounded), or None when nothing clamps.
        maxpool: the fused max pool's Op (applied after rounding), or None.
    """

    kind: str
    ops: list
    batchnorm: Op | None = None
    activation: tuple | None = None
    maxpool: Op | None = None

    @property
    def head(self) -> Op:
        """The producer (the first op)."""
        return self.ops[0]

    @property
    def tail(self) -> fx.Node:
        """The node whose value the step outputs: where the NNA stores a tensor."""
        return self.ops[-1].node

    @property
    def name(self) -> str:
        return self.head.name

    @property
    def inputs(self) -> tuple:
        return self.head.inputs


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _intersect(a, b):
    if a is None:
        return b
    lo = b[0] if a[0] is None else a[0] if b[0] is None else max(a[0], b[0])
    hi = b[1] if a[1] is None else a[1] if b[1] is None else min(a[1], b[1])
    return (lo, hi)


def fuse(ops: dict) -> list:
    """Group classified nodes into the layers the NNA runs.

    A producer (:data:`PRODUCERS`) takes, while each is the only user of the
    value before it: a batch norm (after Conv2d/Linear only), then any
    number of activations and at most one max pool, in any order.  Every
    other node is a step of its own.

    Args:
        ops: from :func:`classify`.

    Returns:
        The steps in graph (execution) order; every node is in exactly one.

    Raises:
        GraphError: a batch norm that does not directly follow a Conv2d/Linear
            whose output only it reads, or an activation that follows nothing
            it can fuse into.
    """
    steps, taken = [], set()
    for node, op in ops.items():
        if node in taken:
            continue
        if op.kind in PRODUCERS:
            step, cur = Step(op.kind, [op]), node
            nxt = _sole_user(cur)
            if op.kind in ("conv2d", "linear") and nxt is not None and ops[nxt].kind == "batchnorm":
                step.batchnorm = ops[nxt]
                step.ops.append(ops[nxt])
                cur = nxt
            while (nxt := _sole_user(cur)) is not None and (
                    ops[nxt].kind == "activation" or (ops[nxt].kind == "maxpool2d" and step.maxpool is None)):
                if ops[nxt].kind == "activation":
                    step.activation = _intersect(step.activation, ops[nxt].attrs["range"])
                else:
                    step.maxpool = ops[nxt]
                step.ops.append(ops[nxt])
                cur = nxt
        elif op.kind == "batchnorm":
            raise GraphError(f"batch norm {op.name!r} must directly follow a Conv2d or Linear layer whose output "
                             f"only it reads, so that it can be folded into the weights")
        elif op.kind == "activation":
            raise GraphError(f"node {op.name!r} ({op.what}) must directly follow a Conv2d/Linear (and its batch "
                             f"norm), an add, a concat or an average pool whose output only it reads: the NNA "
                             f"applies it as a clamp of that layer's output range")
        else:
            step = Step(op.kind, [op])
        taken.update(o.node for o in step.ops)
        steps.append(step)
    missing = [n.name for n in ops if n not in taken]
    if missing:  # cannot happen: every node starts a step or joins one
        raise AssertionError(f"nodes left out of every step: {missing}")
    return steps


# ----------------------------------------------------------------------------- graph facts
_PASS_THROUGH = ("flatten", "identity")


def reaches_output_only(node: fx.Node, ops: dict) -> bool:
    """True when every use of ``node`` leads to the model's output through reshapes and identities only."""
    users = list(node.users)
    if not users:
        return False
    for u in users:
        kind = ops[u].kind
        if kind == "output":
            continue
        if kind not in _PASS_THROUGH or not reaches_output_only(u, ops):
            return False
    return True


def nonnegative(ops: dict) -> dict:
    """For every tensor node: is its value known to be >= 0 (after a ReLU-like clamp)?

    Activations with a lower bound >= 0 make values non-negative; add,
    concat, pooling, reshapes and quantisers keep the property of their
    inputs; everything else (the input, Conv2d, Linear, batch norm) may be
    negative.  Quantisers after non-negative values get unsigned grids with
    zero point 0, the others grids with a zero point.
    """
    result = {}
    for node, op in ops.items():
        if op.kind == "activation":
            lo = op.attrs["range"][0]
            result[node] = (lo is not None and lo >= 0) or all(result.get(i, False) for i in op.inputs)
        elif op.kind in ("add", "cat", "maxpool2d", "avgpool2d", "flatten", "identity", "quantise"):
            result[node] = bool(op.inputs) and all(result.get(i, False) for i in op.inputs)
        else:
            result[node] = False
    return result


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.shapes, self.failure = {}, None

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as exc:
            self.failure = self._explain(n, exc)
            raise
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out

    def _explain(self, n, exc):
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        ins = [self.shapes[i][1:] for i in n.all_input_nodes if i in self.shapes]
        where = f"layer {node_label(n)!r} ({node_operation(n, module)})"
        if isinstance(module, nn.Linear) and ins:
            return (f"{where} expects {module.in_features} input features but receives shape {ins[0]}; "
                    f"check input_shape")
        if isinstance(module, nn.Conv2d) and ins:
            return (f"{where} expects ({module.in_channels}, H, W) inputs but receives {ins[0]}; "
                    f"check input_shape")
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (f"{where} fails on inputs of shape {', '.join(map(str, ins)) or '?'} (batch left out): "
                f"{type(exc).__name__}: {first}; check input_shape")


@torch.no_grad()
def node_shapes(gm: fx.GraphModule, input_shape, device=None, batch: int = 2) -> dict:
    """Run the graph once on zeros and record the shape of every tensor node.

    Args:
        gm: from :func:`trace`.
        input_shape: one input's shape, without the batch.
        device: where to run (default: where the model's parameters are).
        batch: the batch size of the probe (2, so that a reshape that mixes
            the batch with the features is caught).

    Returns:
        dict node -> shape tuple, batch included.

    Raises:
        GraphError: a node fails on these shapes (names it).
    """
    device = resolve_device(device, gm)
    recorder = _ShapeRecorder(gm)
    was_training = gm.training
    gm.eval()
    try:
        recorder.run(torch.zeros((batch, *input_shape), device=device))
    except Exception as exc:
        if recorder.failure is None:
            raise
        raise GraphError(recorder.failure) from exc
    finally:
        gm.train(was_training)
    return recorder.shapes
