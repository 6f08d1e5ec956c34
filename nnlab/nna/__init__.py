"""Deploy: a NumPy simulator of a neural network accelerator.

The course's last step, after elimination (pruning) and reduction (quantisation): the compressed network runs
in integer arithmetic on packed low-bit weights, and its bytes, traffic, energy and latency are reported.

Three separate things, as in SCALE-Sim and Timeloop:

* the **hardware**, :mod:`nnlab.nna.config`: :class:`NNAConfig` (MACs per
  clock by bit-depth, clock, DRAM bandwidth, buffer, accumulator width,
  packing, weight formats, Huffman decoder) and the Horowitz 2014
  :class:`EnergyTable`; presets :data:`SERIES2NX`, :data:`SERIES2NX_HUFFMAN`
  (weights may also be Huffman-coded) and :data:`FP32_BASELINE`;
* the **workload**, a :class:`Program`: a graph of integer layers, each on
  its :class:`~nnlab.quant.Grid`, made from a model quantised with
  :mod:`nnlab.quant` (:func:`compile_model`) or by PyTorch's own int8 flow,
  eager or FX (:func:`compile_torch_int8`, with :func:`quantise_torch_int8`),
  run by the integer engine (:func:`run`), packed or entropy-coded and stored
  (:func:`save`, :func:`load`);
* the **costs** (:func:`report`), a pandas table per layer and in total
  against the fp32 dense network.

One subject per module:

* :mod:`~nnlab.nna.config`: the accelerator and its energy table;
* :mod:`~nnlab.nna.program`: the program's layers and their integer numbers;
* :mod:`~nnlab.nna.compiler`: nnlab's quantised models -> a program (trace, fuse, emit); the names it held
  before the split (PyTorch's int8 import, shapes, what-if) still import from it;
* :mod:`~nnlab.nna.torch_int8`: PyTorch's int8 flow, eager or FX: convert a float model, record its integers;
* :mod:`~nnlab.nna.import_torch`: a model converted by PyTorch -> a program, with the CPU's int8 kernels;
* :mod:`~nnlab.nna.shapes`: every layer's output shape, checked (NumPy only);
* :mod:`~nnlab.nna.whatif`: re-quantise a program's weights to other bit-depths and sparsities;
* :mod:`~nnlab.nna.engine`: run a program in integer arithmetic;
* :mod:`~nnlab.nna.packing`: integer codes packed into bits, dense, sparse and Huffman-coded weight formats;
* :mod:`~nnlab.nna.entropy`: Huffman coding of weight codes and index gaps (encode, decode);
* :mod:`~nnlab.nna.storage`: a layer's stored bytes and ``.nna`` files (save, load);
* :mod:`~nnlab.nna.costs`: the cost model, one function per cost, and :func:`report`
  (``nnlab.nna.report``, the module's old name, still imports it);
* :mod:`~nnlab.nna.verify`: checks the simulator against PyTorch.

Example:
    >>> qmodel = nnlab.quant.pretrained_quantised("lenet5", weight_bits=4, sparsity=0.9)
    >>> program = nnlab.nna.compile_model(qmodel)
    >>> nnlab.nna.run(program, images).predictions
    >>> nnlab.nna.report(program, nnlab.nna.SERIES2NX)

The names below load on first use, each from its module: ``from nnlab.nna
import NNAConfig, PRESETS`` (the hardware description) needs neither PyTorch
nor pandas, so the command line checks a bit-depth against the accelerator
before loading them.
"""

from __future__ import annotations

import importlib
import sys
import types

from .._deprecated import warn_renamed

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "config": ("NNAConfig", "EnergyTable", "SERIES2NX", "FP32_BASELINE", "PRESETS", "PACKINGS", "SPARSE_FORMATS",
               "WEIGHT_FORMATS", "SERIES2NX_HUFFMAN"),
    "program": ("Program", "describe", "InputLayer", "WeightLayer", "PoolLayer", "FlattenLayer", "AddLayer",
                "ConcatLayer"),
    "compiler": ("compile_model",),
    "import_torch": ("compile_torch_int8", "torch_conv_kernel", "torch_linear_kernel"),
    "shapes": ("output_shapes",),
    "whatif": ("requantise_weights",),
    "torch_int8": ("quantise_torch_int8", "layer_outputs"),
    "engine": ("run", "predict", "Result", "MODES", "AccumulatorOverflowWarning", "overflow_message"),
    "entropy": ("huffman_code_lengths",),
    "packing": ("pack", "unpack", "packed_bytes", "bit_layout", "encode_weights", "decode_weights"),
    "storage": ("save", "load", "read_header", "storage_bytes", "ProgramFileError"),
    "costs": ("report", "layer_costs", "headline"),
    "verify": ("agreement", "compare_modes", "compare_torch_int8"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = set(_EXPORTS)
#: Deprecated public names (old -> new), served with a DeprecationWarning until the next release.
_RENAMED = {"summary": "headline"}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    # Load the defining submodule on first use (``nnlab.nna.run``), and keep the name.
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    if name in _RENAMED:
        # A deprecated name: warns, naming the new one; not kept, so it warns each time.
        warn_renamed(__name__, name, _RENAMED[name])
        return __getattr__(_RENAMED[name])
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


class _Package(types.ModuleType):
    """``nnlab.nna.report`` is the function, even once the old module of the same name (now :mod:`nnlab.nna.costs`)
    has been imported: the import system then sets the package's attribute to the module."""

    def __setattr__(self, name, value):
        if name == "report" and isinstance(value, types.ModuleType) and hasattr(value, "report"):
            value = value.report
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
