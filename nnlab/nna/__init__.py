"""Deploy: a NumPy simulator of a neural network accelerator (METHOD.md step 3).

Three separate things, as in SCALE-Sim and Timeloop:

* the **hardware**, :mod:`nnlab.nna.config`: :class:`NNAConfig` (MACs per
  clock by bit-depth, clock, DRAM bandwidth, buffer, accumulator width,
  packing, sparse formats) and the Horowitz 2014 :class:`EnergyTable`;
  presets :data:`SERIES2NX` and :data:`FP32_BASELINE`;
* the **workload**, a :class:`Program`: a graph of integer layers, each on
  its :class:`~nnlab.quant.Grid` (:mod:`nnlab.nna.program`), made by the
  compiler (:mod:`nnlab.nna.compiler`) from the traced graph of a model
  quantised with :mod:`nnlab.quant` (:func:`compile_model`) or
  by PyTorch's own int8 flow, eager or FX (:func:`compile_torch_int8`, with
  :func:`quantise_torch_int8` from :mod:`nnlab.nna.torch_int8`), run by the
  integer engine (:mod:`nnlab.nna.engine`: :func:`run`), packed and stored
  (:mod:`nnlab.nna.packing`, :mod:`nnlab.nna.storage`: :func:`save`, :func:`load`);
* the **report** (:mod:`nnlab.nna.report`: :func:`report`), a pandas table per
  layer and in total against the fp32 dense network.

:mod:`nnlab.nna.verify` checks the simulator against PyTorch.

Example:
    >>> qmodel = nnlab.quant.pretrained_quantised("lenet5", weight_bits=4, sparsity=0.9)
    >>> program = nnlab.nna.compile_model(qmodel)
    >>> nnlab.nna.run(program, images).predictions
    >>> nnlab.nna.report(program, nnlab.nna.SERIES2NX)
"""

from .compiler import (compile_model, compile_torch_int8, output_shapes, requantise_weights, torch_conv_kernel,
                       torch_linear_kernel)
from .config import FP32_BASELINE, PACKINGS, PRESETS, SERIES2NX, SPARSE_FORMATS, EnergyTable, NNAConfig
from .engine import MODES, Result, predict, run
from .packing import bit_layout, decode_weights, encode_weights, pack, packed_bytes, unpack
from .program import AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer, describe
from .report import layer_costs, report, summary
from .storage import load, read_header, save, storage_bytes
from .torch_int8 import layer_outputs, quantise_torch_int8
from .verify import agreement, compare_modes, compare_torch_int8

__all__ = [
    "NNAConfig", "EnergyTable", "SERIES2NX", "FP32_BASELINE", "PRESETS", "PACKINGS", "SPARSE_FORMATS",
    "Program", "describe", "InputLayer", "WeightLayer", "PoolLayer", "FlattenLayer", "AddLayer", "ConcatLayer",
    "compile_model", "compile_torch_int8", "requantise_weights", "output_shapes", "torch_conv_kernel",
    "torch_linear_kernel",
    "quantise_torch_int8", "layer_outputs",
    "run", "predict", "Result", "MODES",
    "pack", "unpack", "packed_bytes", "bit_layout", "encode_weights", "decode_weights",
    "save", "load", "read_header", "storage_bytes",
    "report", "layer_costs", "summary",
    "agreement", "compare_modes", "compare_torch_int8",
]
