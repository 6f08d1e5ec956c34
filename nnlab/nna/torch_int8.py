"""PyTorch's own 8-bit flows (x86/fbgemm backend): the reference the simulator must match exactly.

:func:`quantise_torch_int8` runs one of PyTorch's two standard recipes:

* ``flow="eager"`` (an ``nn.Sequential`` only): wrap the network between
  ``QuantStub`` and ``DeQuantStub``, fuse conv+ReLU and linear+ReLU (and
  conv+BN+ReLU) with ``fuse_modules``, ``prepare`` with
  ``get_default_qconfig(engine)``, calibrate, ``convert``;
* ``flow="fx"`` (any model ``torch.fx`` can trace: residual blocks,
  depthwise convolutions, ReLU6, concatenations, global average pooling):
  ``prepare_fx`` with ``get_default_qconfig_mapping(engine)`` (which fuses
  conv+BN(+ReLU), linear+ReLU and add+ReLU itself), calibrate,
  ``convert_fx``.  The result is a ``torch.fx.GraphModule`` whose nodes are
  ``quantize_per_tensor``, quantized Conv2d/Linear modules,
  ``torch.ops.quantized.add``/``add_relu``, ``torch.cat``, ReLU6, pools,
  ``flatten`` ... on quantized tensors, and a ``dequantize`` at the end.

The x86 qconfig observes activations with ``reduce_range`` (7-bit ranges,
0..127) and quantises weights per channel, symmetric, int8.  Both flows
calibrate on the first ``calibration_batches`` training batches.

:func:`layer_outputs` runs a converted model (either flow) node by node and
records the integers (``int_repr()``) of every node that outputs a
quantized tensor, for the per-layer comparison in :mod:`nnlab.nna.verify`.
:func:`int8_graph` and :func:`node_labels` give the graph and the names the
importer (:mod:`nnlab.nna.import_torch`) and the comparison share.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.fx as fx
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch import nn
from torch.nn.utils import parametrize

from .. import graph
from .._args import check_choice, check_positive_int
from ..base import loader_of
from ..distributed import unwrap
from ..quant.modules import ActQuantiser

__all__ = ["Int8Model", "FLOWS", "quantise_torch_int8", "fusion_groups", "layer_outputs", "int8_graph",
           "node_labels", "ENGINE_KEY"]

#: The two conversion recipes of :func:`quantise_torch_int8`.
FLOWS = ("eager", "fx")
#: Where :func:`quantise_torch_int8` records the quantized engine a model was converted under: an attribute
#: of an eager :class:`Int8Model`, a key of an FX GraphModule's ``meta``.
ENGINE_KEY = "nnlab_quantized_engine"


class Int8Model(nn.Module):
    """``QuantStub -> body -> DeQuantStub``: the wrapper PyTorch's eager flow needs."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.body = body
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


def fusion_groups(model: nn.Sequential) -> list:
    """Names of the module groups to fuse: Conv2d[+BatchNorm2d]+ReLU and Linear+ReLU.

    Args:
        model: an ``nn.Sequential``.

    Returns:
        A list of name lists for ``torch.ao.quantization.fuse_modules``.
    """
    names = list(model._modules)
    mods = list(model._modules.values())
    groups, i = [], 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            j = i + 1
            if isinstance(m, nn.Conv2d) and j < len(mods) and isinstance(mods[j], nn.BatchNorm2d):
                j += 1
            if j < len(mods) and isinstance(mods[j], nn.ReLU):
                j += 1
            if j - i > 1:
                groups.append(names[i:j])
            i = j
        else:
            i += 1
    return groups


def _calibrate(model, data, batches):
    for i, (x, _) in enumerate(loader_of(data, "train")):
        model(x)
        if i + 1 >= batches:
            break


def _check_float(model):
    for name, m in model.named_modules():
        if isinstance(m, ActQuantiser) or parametrize.is_parametrized(m):
            raise ValueError(f"model is already quantised by nnlab (module {name!r} is a {type(m).__name__}); "
                             f"PyTorch's int8 flow starts from the float model")


def _eager(model, data, calibration_batches, engine):
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential for flow='eager' (as nnlab's models are), got "
                        f"{type(model).__name__}; use flow='fx' for any traceable model")
    body = copy.deepcopy(model).cpu().eval()
    groups = fusion_groups(body)
    if groups:
        torch.ao.quantization.fuse_modules(body, groups, inplace=True)
    wrapped = Int8Model(body).eval()
    wrapped.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch announces the eager flow's future deprecation
        torch.ao.quantization.prepare(wrapped, inplace=True)
        _calibrate(wrapped, data, calibration_batches)
        torch.ao.quantization.convert(wrapped, inplace=True)
    setattr(wrapped, ENGINE_KEY, engine)
    return wrapped


def _fx(model, data, calibration_batches, engine):
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    example = next(iter(loader_of(data, "train")))[0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping(engine), example_inputs=(example,))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise graph.GraphError(
                f"cannot prepare {type(model).__name__} with torch.ao.quantization.quantize_fx.prepare_fx: "
                f"{type(exc).__name__}: {first}. The FX flow traces the model with torch.fx, so forward must run "
                f"the same operations for every input (no if/for/while on tensor values)") from exc
        _calibrate(prepared, data, calibration_batches)
        converted = convert_fx(prepared)
    converted.meta[graph.MODEL_CLASS] = type(model).__name__
    converted.meta[ENGINE_KEY] = engine
    return converted


@torch.no_grad()
def quantise_torch_int8(model: nn.Module, data, calibration_batches: int = 8, *, engine: str = "x86",
                        flow: str = "eager") -> nn.Module:
    """Quantise a float network to int8 with PyTorch's eager-mode or graph-mode (FX) flow.

    Args:
        model: a trained float network (left unchanged): an ``nn.Sequential``
            for ``flow="eager"``, any model ``torch.fx`` can trace for ``flow="fx"``.
        data: DataBundle (its train loader calibrates) or a DataLoader.
        calibration_batches: batches for the observers.
        engine: ``"x86"`` (default), ``"fbgemm"`` or ``"onednn"``; it is set as
            ``torch.backends.quantized.engine`` and stays set, because the
            converted model must run under the engine it was converted for.
            (:func:`nnlab.nna.compile_torch_int8` refuses ``"onednn"`` models.)
        flow: ``"eager"`` (default) or ``"fx"`` (see the module docstring).

    Returns:
        The converted model (eval mode, CPU): an :class:`Int8Model` (eager;
        layers named ``quant``, ``body.<layer>`` ...) or a
        ``torch.fx.GraphModule`` (FX; layers keep the model's own names).
        The engine is recorded on it (:data:`ENGINE_KEY`).

    Raises:
        ValueError: bad ``engine``, ``flow`` or ``calibration_batches``, or a
            model already quantised by nnlab.
        TypeError: ``flow="eager"`` with a model that is not an ``nn.Sequential``.
        nnlab.graph.GraphError: ``flow="fx"`` with a model torch.fx cannot trace.
    """
    check_choice("engine", engine, ("x86", "fbgemm", "onednn"))
    check_choice("flow", flow, FLOWS)
    check_positive_int("calibration_batches", calibration_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_float(model)
    torch.backends.quantized.engine = engine
    return (_eager if flow == "eager" else _fx)(model, data, calibration_batches, engine)


# ----------------------------------------------------------------------------- the converted graph
def int8_graph(qmodel: nn.Module) -> fx.GraphModule:
    """The graph of a converted model: an FX model's own, an eager model's traced by :func:`nnlab.graph.trace`.

    Raises:
        TypeError: ``qmodel`` is not an ``nn.Module``.
        nnlab.graph.GraphError: an eager model torch.fx cannot trace.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    if isinstance(qmodel, fx.GraphModule):
        return qmodel
    return graph.trace(qmodel)


def node_labels(gm: fx.GraphModule) -> dict:
    """The name of every node: a module's qualified name (``"layer1.0.conv1"``), else the node's name.

    A module called more than once (one ReLU module used twice) would give
    two nodes one name: those nodes keep their own node names.
    """
    calls = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return {n: (str(n.target) if n.op == "call_module" and calls[n.target] == 1 else n.name) for n in gm.graph.nodes}


class QuantizedRecorder(fx.Interpreter):
    """Runs a converted graph node by node, keeping what every quantized node outputs.

    Attributes:
        outputs: node -> the integers (int64 NumPy array, ``int_repr()``) of each quantized output.
        tensors: node -> the output tensor itself (only with ``keep=True``).
        failed: the node that raised, if one did.
    """

    def __init__(self, gm: fx.GraphModule, keep: bool = False):
        super().__init__(gm)
        self.keep, self.outputs, self.tensors, self.failed = keep, {}, {}, None

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        if isinstance(out, torch.Tensor):
            if self.keep:
                self.tensors[n] = out
            if out.is_quantized:
                self.outputs[n] = out.int_repr().numpy().astype(np.int64)
        return out


@torch.no_grad()
def layer_outputs(qmodel: nn.Module, x: torch.Tensor) -> dict:
    """The integers every quantized node of ``qmodel`` outputs for ``x``.

    Args:
        qmodel: a converted model, eager or FX (e.g. from :func:`quantise_torch_int8`).
        x: float input batch.

    Returns:
        dict node name (:func:`node_labels`: ``"quant"``, ``"body.conv1"``,
        ``"add_1"`` ...) -> int64 NumPy array of ``int_repr()``, for every node
        whose output is a quantized tensor (the input's quantisation, each
        convolution, add, concat, clamp, pool and reshape), in execution order.

    Raises:
        TypeError: ``qmodel`` is not an ``nn.Module``.
    """
    gm = int8_graph(qmodel)
    labels = node_labels(gm)
    recorder = QuantizedRecorder(gm.eval())
    recorder.run(x)
    return {labels[n]: q for n, q in recorder.outputs.items()}
