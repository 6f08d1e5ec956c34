"""The cost model: bytes, MACs, memory traffic, energy and time per inference, per layer and in total.

One image per inference.  Each cost is one small function on one layer,
with its formula in its docstring:

* :func:`storage_cost`: the bytes stored, encoded weights plus parameters
  (:mod:`nnlab.nna.storage`); fp32: 4 bytes per weight and per bias;
* :func:`compute_cost`: the MACs, ``positions * weights`` (only the non-zero
  weights with zero skipping);
* :func:`traffic_cost`: the bytes moved to and from DRAM and through the
  on-chip buffer's (SRAM) port;
* :func:`energy_cost`: pJ per MAC, per 64 bits of SRAM and of DRAM
  (:class:`~nnlab.nna.config.EnergyTable`, Horowitz 2014);
* :func:`time_cost`: the roofline, the larger of compute and memory cycles;
* :func:`decode_cost`: decoding Huffman-coded weights, one variable-length
  code after the other, before the layer computes (its cycles and energy
  are added to the layer's; other formats decode for free).

:func:`layer_costs` assembles them into one row per layer, and
:func:`report` puts them next to the same costs of the fp32 dense network
on the same accelerator (:meth:`NNAConfig.as_fp32`), with a total row.

Costs do not depend on the data, but whether the sums fit in the
accumulator does.  Given the :class:`~nnlab.nna.engine.Result` of a run
(``saturations=``), :func:`report` adds ``saturated`` (sums that overflowed
the accumulator and were saturated, per layer and in total) and
``sum_bits`` (bits of the widest sum; the total row: the widest of all), so
an overflow shows in the same table as the costs.

This module was called ``nnlab.nna.report``, the name of its main function;
``from nnlab.nna.report import layer_costs`` still works.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .._deprecated import renamed
from .config import SERIES2NX, NNAConfig
from .engine import Result
from .program import FlattenLayer, InputLayer, Program, WeightLayer
from .shapes import output_shapes
from .storage import encode_layer, parameter_bytes

__all__ = ["report", "layer_costs", "headline", "storage_cost", "compute_cost", "traffic_cost", "energy_cost",
           "time_cost", "decode_cost", "decode_costs", "operand_bits", "output_bits", "COLUMNS", "LAYER_COLUMNS",
           "OVERFLOW_COLUMNS", "DECODE_COLUMNS"]

#: Deprecated names (old -> new), served with a DeprecationWarning until the next release: ``summary``
#: (``nnlab.models.summary`` is a per-layer table of a model).
RENAMED = {"summary": "headline"}
#: The columns of :func:`layer_costs`.
LAYER_COLUMNS = ["layer", "op", "w_bits", "a_bits", "density", "format", "payload_B", "index_B", "params_B",
                 "padding_B", "storage_B", "macs_dense", "macs", "dram_B", "sram_B", "energy_mac_nJ",
                 "energy_sram_nJ", "energy_dram_nJ", "decode_symbols", "cycles_decode", "energy_decode_nJ", "energy_nJ",
                 "cycles_compute", "cycles_memory", "cycles", "bound", "latency_us"]
#: The columns of :func:`decode_cost`, also in :func:`layer_costs` and :func:`report`.
DECODE_COLUMNS = ["decode_symbols", "cycles_decode", "energy_decode_nJ"]
#: The columns :func:`report` adds when given a run's saturation counts.
OVERFLOW_COLUMNS = ["saturated", "sum_bits"]
#: The columns of :func:`report`.
COLUMNS = ["layer", "op", "w_bits", "a_bits", "density", "format", "payload_B", "index_B", "params_B",
           "padding_B", "storage_B", "fp32_B", "compression", "macs_dense", "macs", "dram_B", "sram_B",
           "energy_mac_nJ", "energy_sram_nJ", "energy_dram_nJ", "decode_symbols", "cycles_decode",
           "energy_decode_nJ", "energy_nJ", "fp32_energy_nJ", "energy_ratio",
           "cycles_compute", "cycles_memory", "cycles", "bound", "latency_us", "fp32_latency_us"]


def _prod(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _fp32(config: NNAConfig) -> bool:
    return config.arithmetic == "fp32"


def operand_bits(layer, config: NNAConfig) -> tuple:
    """``(w_bits, a_bits)``: the bit-depths a layer multiplies, NaN where it has none.

    A Conv2d/Linear layer multiplies its weights (``w_bits``) by its input
    activations (``a_bits``); the input layer's ``a_bits`` are the image's.
    With an fp32 config both are 32, whatever the program's grids.
    """
    if isinstance(layer, WeightLayer):
        return (32, 32) if _fp32(config) else (layer.weight_bits, layer.in_grid.bits)
    if isinstance(layer, InputLayer):
        return np.nan, output_bits(layer, config)
    return np.nan, np.nan


def output_bits(layer, config: NNAConfig) -> int:
    """Bits per output value: the output grid's, 32 for the last layer's int32 sums and in fp32."""
    return 32 if _fp32(config) or layer.out_grid is None else layer.out_grid.bits


def storage_cost(layer, config: NNAConfig = SERIES2NX) -> dict:
    """The bytes the accelerator stores for one layer: its encoded weights plus its parameters.

    ``storage_B = payload_B + index_B + padding_B + params_B``, in bytes:
    the weight codes at ``w_bits`` bits each in the smallest format the
    config allows (payload; only the non-zero codes in a sparse format), the
    sparse format's index (index), the bits the packing leaves unused to keep
    words whole (padding), and per output channel the int32 bias and float32
    scale, plus the float32 bias of a PyTorch int8 model (params); see
    :func:`nnlab.nna.storage.encode_layer` and
    :func:`~nnlab.nna.storage.parameter_bytes`.  In fp32: 4 bytes per weight
    (payload) and per bias (params).  Layers without weights store nothing.

    Args:
        layer: a program layer.
        config: the accelerator (packing, sparse formats, arithmetic).

    Returns:
        dict ``format`` (e.g. ``"runlength/4b"``: the format and its index
        bits), ``payload_B``, ``index_B``, ``params_B``, ``padding_B``, ``storage_B``.

    Raises:
        ValueError: bit-depths outside the config's ``min_bits..max_bits``.
    """
    row = {"format": "", "payload_B": 0.0, "index_B": 0.0, "params_B": 0.0, "padding_B": 0.0}
    if isinstance(layer, WeightLayer) and _fp32(config):
        row.update(format="dense", payload_B=4.0 * layer.weight.size, params_B=4.0 * layer.out_channels)
    elif isinstance(layer, WeightLayer):
        enc = encode_layer(layer, config)
        fmt = enc.format + (f"/{enc.index_bits}b" if enc.index_bits else "")  # e.g. "runlength/4b"
        row.update(format=fmt, payload_B=enc.payload_bits / 8, index_B=enc.index_bits_total / 8,
                   padding_B=enc.padding_bits / 8, params_B=float(parameter_bytes(layer)))
    row["storage_B"] = row["payload_B"] + row["index_B"] + row["params_B"] + row["padding_B"]
    return row


def compute_cost(layer, out_shape: tuple, config: NNAConfig = SERIES2NX) -> dict:
    """The multiply-accumulates (MACs) of one layer for one image.

    ``macs_dense = positions * weights``: every weight meets the input once
    per output position (``positions`` = output pixels H x W of a
    convolution, 1 for a linear layer).  With zero skipping
    (``config.skip_zeros``) only the non-zero weights cost a MAC:
    ``macs = positions * non-zero weights``; otherwise ``macs = macs_dense``.
    Only Conv2d/Linear layers count: pools, adds, concats and requantisation
    are a few operations per output, against tens to hundreds of MACs.

    Args:
        layer: a program layer.
        out_shape: its output shape for one image (:func:`~nnlab.nna.shapes.output_shapes`).
        config: the accelerator.

    Returns:
        dict ``density`` (share of non-zero weights; NaN without weights), ``macs_dense``, ``macs``.
    """
    if not isinstance(layer, WeightLayer):
        return {"density": np.nan, "macs_dense": 0, "macs": 0}
    positions = _prod(out_shape[1:]) if layer.op == "conv2d" else 1
    nnz = int(np.count_nonzero(layer.weight))
    macs_dense = positions * layer.weight.size
    return {"density": nnz / layer.weight.size, "macs_dense": macs_dense,
            "macs": positions * nnz if config.skip_zeros else macs_dense}


def traffic_cost(layer, inputs: list, output: tuple, storage_B: float, is_output: bool,
                 config: NNAConfig = SERIES2NX) -> dict:
    """The bytes one layer moves per image: to and from DRAM, and through the on-chip buffer's (SRAM) port.

    DRAM, ``dram_B``: the layer's stored weights and parameters
    (``storage_B``) are read once per inference (the buffer holds
    activations, not the model); the input layer reads the image once; the
    network's last layer writes its output once; and when a layer's inputs
    (the outputs of the layers it reads: two for an add, several for a
    concat) and its output do not fit in the buffer together
    (``config.buffer_bytes``), the output spills: it is written to DRAM and
    read back, twice its size.  A tensor a skip connection reads later is
    assumed to wait in the buffer.

    SRAM, ``sram_B``: each stored weight and parameter and each output
    activation crosses the buffer's port once, and so does each input
    activation of a Conv2d/Linear layer (ideal reuse in the MAC array, at
    ``a_bits`` bits); a flatten is a reshape in place and moves nothing.

    Args:
        layer: a program layer.
        inputs: ``(values, bits per value)`` of each tensor it reads (one image).
        output: ``(values, bits per value)`` of its output.
        storage_B: its stored bytes (:func:`storage_cost`).
        is_output: it is the network's last layer.
        config: the accelerator.

    Returns:
        dict ``dram_B``, ``sram_B`` (bytes).
    """
    count, bits = output
    dram_bytes = sram_bits = 0.0
    if isinstance(layer, InputLayer):
        return {"dram_B": dram_bytes + count * bits / 8, "sram_B": sram_bits / 8}  # the image, read once
    if isinstance(layer, WeightLayer):
        dram_bytes += storage_B
        sram_bits += 8 * storage_B + sum(n for n, _ in inputs) * operand_bits(layer, config)[1]
    in_bits_total = sum(n * b for n, b in inputs)
    out_bits_total = count * bits
    if isinstance(layer, FlattenLayer):
        out_bits_total = 0  # a reshape, in place
    elif (in_bits_total + out_bits_total) / 8 > config.buffer_bytes:
        dram_bytes += 2 * out_bits_total / 8  # spill: written out, read back
    sram_bits += out_bits_total
    if is_output:
        dram_bytes += out_bits_total / 8  # the result leaves the chip
    return {"dram_B": dram_bytes, "sram_B": sram_bits / 8}


def energy_cost(layer, macs: int, sram_B: float, dram_B: float, config: NNAConfig = SERIES2NX) -> dict:
    """The energy of one layer for one image, in nJ: MACs, SRAM and DRAM (``config.energy``, in pJ).

    ``energy_mac_nJ = macs * (multiply + add)``: an integer multiply at the
    operands' bit-depths (``w_bits x a_bits``) and an add at the
    accumulator's width, or an fp32 multiply and add in fp32;
    ``energy_sram_nJ`` = pJ per 64-bit access of an SRAM of the buffer's
    size, per 64 bits of ``sram_B``; ``energy_dram_nJ`` = pJ per 64 bits of
    DRAM, per 64 bits of ``dram_B``; ``energy_nJ`` their sum.  Pooling,
    adds, concats and requantisation are neglected.

    Args:
        layer: a program layer.
        macs, sram_B, dram_B: its costs (:func:`compute_cost`, :func:`traffic_cost`).
        config: the accelerator.

    Returns:
        dict ``energy_mac_nJ``, ``energy_sram_nJ``, ``energy_dram_nJ``, ``energy_nJ``.
    """
    e = config.energy
    mac_nj = 0.0
    if isinstance(layer, WeightLayer):
        w_bits, a_bits = operand_bits(layer, config)
        mac_pj = e.fp32_mult + e.fp32_add if _fp32(config) else e.mult(w_bits, a_bits) + e.add(config.accumulator_bits)
        mac_nj = macs * mac_pj / 1000
    sram_nj = sram_B * 8 / 64 * e.sram_read(config.buffer_bytes) / 1000
    dram_nj = dram_B * 8 / 64 * e.dram_64b / 1000
    return {"energy_mac_nJ": mac_nj, "energy_sram_nJ": sram_nj, "energy_dram_nJ": dram_nj,
            "energy_nJ": mac_nj + sram_nj + dram_nj}


def time_cost(layer, macs: int, dram_B: float, config: NNAConfig = SERIES2NX) -> dict:
    """The time of one layer for one image, by the roofline model.

    ``cycles_compute = macs / MACs per cycle`` at the operands' bit-depths
    (:meth:`~nnlab.nna.config.NNAConfig.macs_per_cycle`), ``cycles_memory =
    dram_B / DRAM bytes per cycle``; compute and transfers overlap, so the
    layer takes the larger (``cycles``) and is ``"compute"``- or
    ``"memory"``-bound (``""`` when it takes no time);
    ``latency_us = cycles / clock`` in microseconds.

    Args:
        layer: a program layer.
        macs, dram_B: its costs (:func:`compute_cost`, :func:`traffic_cost`).
        config: the accelerator.

    Returns:
        dict ``cycles_compute``, ``cycles_memory``, ``cycles``, ``bound``, ``latency_us``.
    """
    compute = macs / config.macs_per_cycle(*operand_bits(layer, config)) if isinstance(layer, WeightLayer) else 0.0
    memory = dram_B / config.dram_bytes_per_cycle
    cycles = max(compute, memory)
    bound = "" if cycles == 0 else ("compute" if compute >= memory else "memory")
    return {"cycles_compute": compute, "cycles_memory": memory, "cycles": cycles, "bound": bound,
            "latency_us": cycles / config.clock_hz * 1e6}


def decode_cost(layer, config: NNAConfig = SERIES2NX) -> dict:
    """What decoding a layer's Huffman-coded weights costs for one image (zero for every other format).

    The decoder reads one variable-length code after the other (where a code
    ends is known only once it is decoded), so it handles
    ``config.decode_symbols_per_cycle`` symbols per clock, each at
    ``config.energy.decode_symbol`` pJ.  Every stored value and, for a layer
    with an index, every stored gap is one symbol
    (:attr:`~nnlab.nna.packing.EncodedWeights.decoded_symbols`):
    ``cycles_decode = decode_symbols / decode_symbols_per_cycle``,
    ``energy_decode_nJ = decode_symbols * decode_symbol / 1000``.  The decoder
    runs before the layer computes, so :func:`layer_costs` adds its cycles
    to the roofline's and its energy to the layer's.

    Args:
        layer: a program layer.
        config: the accelerator (an fp32 config decodes nothing).

    Returns:
        dict ``decode_symbols``, ``cycles_decode``, ``energy_decode_nJ``.
    """
    symbols = 0
    if isinstance(layer, WeightLayer) and not _fp32(config) and "huffman" in config.sparse_formats:
        symbols = encode_layer(layer, config).decoded_symbols
    return {"decode_symbols": symbols, "cycles_decode": symbols / config.decode_symbols_per_cycle,
            "energy_decode_nJ": symbols * config.energy.decode_symbol / 1000}


def decode_costs(program: Program, config: NNAConfig = SERIES2NX) -> pd.DataFrame:
    """:func:`decode_cost` of every layer of ``program``: ``layer`` and :data:`DECODE_COLUMNS`."""
    return pd.DataFrame([{"layer": layer.name, **decode_cost(layer, config)} for layer in program.layers],
                        columns=["layer"] + DECODE_COLUMNS)


def _with_decoding(energy: dict, time: dict, decode: dict, config: NNAConfig) -> tuple:
    """``energy`` and ``time`` with the decoder's energy and cycles added (it runs before the layer computes)."""
    energy = {**energy, "energy_nJ": energy["energy_nJ"] + decode["energy_decode_nJ"]}
    cycles = time["cycles"] + decode["cycles_decode"]
    bound = "decode" if decode["cycles_decode"] > max(time["cycles_compute"], time["cycles_memory"]) else time["bound"]
    return energy, {**time, "cycles": cycles, "bound": bound, "latency_us": cycles / config.clock_hz * 1e6}


def layer_costs(program: Program, config: NNAConfig = SERIES2NX) -> pd.DataFrame:
    """Per-layer costs of ``program`` on ``config`` (no baseline, no total row).

    Each row puts together :func:`storage_cost`, :func:`compute_cost`,
    :func:`traffic_cost`, :func:`energy_cost` and :func:`time_cost` of one
    layer.  With an fp32 config (``arithmetic="fp32"``) the layers are costed
    dense in float32, whatever their integer bit-depths.

    Args:
        program: a compiled program.
        config: the accelerator.

    Returns:
        DataFrame with the columns :data:`LAYER_COLUMNS`: ``layer``, ``op``,
        ``w_bits``, ``a_bits``, ``density``, ``format``, ``payload_B``,
        ``index_B``, ``params_B``, ``padding_B``, ``storage_B``,
        ``macs_dense``, ``macs``, ``dram_B``, ``sram_B``, ``energy_mac_nJ``,
        ``energy_sram_nJ``, ``energy_dram_nJ``, the :data:`DECODE_COLUMNS`
        of :func:`decode_cost`, ``energy_nJ``, ``cycles_compute``,
        ``cycles_memory``, ``cycles``, ``bound``, ``latency_us`` (the last
        four with the decoding included).

    Raises:
        TypeError: ``program`` is not a Program or ``config`` not an NNAConfig.
        ValueError: bit-depths the config does not support.
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a nnlab.nna Program, got {type(program).__name__}")
    if not isinstance(config, NNAConfig):
        raise TypeError(f"config must be an NNAConfig, got {type(config).__name__}")
    shapes = output_shapes(program)
    bits = {}  # layer name -> bits per output value
    rows = []
    for layer in program.layers:
        bits[layer.name] = output_bits(layer, config)
        inputs = [(_prod(shapes[name]), bits[name]) for name in layer.inputs]
        w_bits, a_bits = operand_bits(layer, config)
        storage = storage_cost(layer, config)
        compute = compute_cost(layer, shapes[layer.name], config)
        traffic = traffic_cost(layer, inputs, (_prod(shapes[layer.name]), bits[layer.name]), storage["storage_B"],
                               layer is program.output, config)
        energy = energy_cost(layer, compute["macs"], traffic["sram_B"], traffic["dram_B"], config)
        time = time_cost(layer, compute["macs"], traffic["dram_B"], config)
        decode = decode_cost(layer, config)
        energy, time = _with_decoding(energy, time, decode, config)
        rows.append({"layer": layer.name, "op": layer.op, "w_bits": w_bits, "a_bits": a_bits, **storage, **compute,
                     **traffic, **decode, **energy, **time})
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def _total(table: pd.DataFrame, label="total") -> dict:
    row = {c: table[c].sum() for c in table.columns if table[c].dtype.kind in "if"}
    row.update(layer=label, op="", format="", bound="")
    weight_rows = table["macs_dense"] > 0
    for c in ("w_bits", "a_bits"):
        row[c] = np.nan
    macs_dense = table.loc[weight_rows, "macs_dense"].sum()
    row["density"] = table.loc[weight_rows, "macs"].sum() / macs_dense if macs_dense else np.nan
    return row


def _overflow(program: Program, config: NNAConfig, saturations):
    """``(counts, sum_bits, accumulator_bits)`` per layer from a run's Result, or from a dict of counts."""
    if isinstance(saturations, Result):
        if saturations.accumulator_bits != config.accumulator_bits:
            raise ValueError(f"saturations come from a run with a {saturations.accumulator_bits}-bit accumulator, but "
                             f"config {config.name!r} has {config.accumulator_bits} bits; run with config=config")
        counts, widths, bits = saturations.saturations, saturations.sum_bits, saturations.accumulator_bits
    elif isinstance(saturations, dict):
        counts, widths, bits = saturations, {}, config.accumulator_bits
    else:
        raise TypeError(f"saturations must be the Result of nnlab.nna.run (or a dict layer -> count), got "
                        f"{type(saturations).__name__}")
    names = {layer.name for layer in program.weight_layers}
    for name, count in counts.items():
        if name not in names:
            raise ValueError(f"saturations name layer {name!r}, which is not a weight layer of program "
                             f"{program.name!r}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"saturations[{name!r}] must be a count (an integer >= 0), got {count!r}")
    return counts, widths, bits


def report(program: Program, config: NNAConfig = SERIES2NX, baseline: NNAConfig | None = None, *,
           saturations=None) -> pd.DataFrame:
    """Per-layer and total costs of ``program`` on ``config``, next to the fp32 dense network.

    Args:
        program: a compiled program.
        config: the accelerator (default: the Series2NX-like preset).
        baseline: the reference config (default ``config.as_fp32()``: the
            same accelerator in fp32, dense).
        saturations: optionally the :class:`~nnlab.nna.engine.Result` of
            ``nnlab.nna.run(program, images, config=config)`` (or a dict
            layer name -> saturated sums): adds the columns ``saturated`` and
            ``sum_bits`` (see the module docstring).

    Returns:
        DataFrame with :data:`COLUMNS` (and :data:`OVERFLOW_COLUMNS` when
        ``saturations`` is given), one row per layer and a ``"total"``
        row.  ``fp32_*`` columns are the baseline's; ``compression`` and
        ``energy_ratio`` are baseline / program.  ``attrs["headline"]`` holds
        the headline figures (:func:`headline`), with ``saturated`` and
        ``accumulator_bits`` when ``saturations`` is given.  In the total row
        ``density`` is the share of MACs left after zero skipping.

    Raises:
        TypeError, ValueError: a bad ``saturations`` (a run with another
            accumulator width, or layers the program does not have).
    """
    baseline = config.as_fp32() if baseline is None else baseline
    overflow = None if saturations is None else _overflow(program, config, saturations)
    ours = layer_costs(program, config)
    base = layer_costs(program, baseline)
    table = ours.copy()
    table["fp32_B"] = base["storage_B"]
    table["fp32_energy_nJ"] = base["energy_nJ"]
    table["fp32_latency_us"] = base["latency_us"]
    total = _total(table)
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["compression"] = np.where(table["storage_B"] > 0, table["fp32_B"] / table["storage_B"], np.nan)
        table["energy_ratio"] = np.where(table["energy_nJ"] > 0, table["fp32_energy_nJ"] / table["energy_nJ"], np.nan)
    columns = list(COLUMNS)
    if overflow is not None:
        counts, widths, _ = overflow
        layers = table["layer"].iloc[:-1]
        table["saturated"] = [int(counts.get(name, 0)) for name in layers] + [int(sum(counts.values()))]
        table["sum_bits"] = [widths.get(name, np.nan) for name in layers] + [max(widths.values(), default=np.nan)]
        columns += OVERFLOW_COLUMNS
    table = table[columns]
    t = table.iloc[-1]
    table.attrs["headline"] = {
        "config": config.name, "baseline": baseline.name,
        "storage_bytes": int(round(t["storage_B"])), "fp32_bytes": int(round(t["fp32_B"])),
        "compression": float(t["compression"]),
        "macs_dense": int(t["macs_dense"]), "macs": int(t["macs"]),
        "dram_bytes": float(t["dram_B"]),
        "energy_uj": float(t["energy_nJ"]) / 1000, "fp32_energy_uj": float(t["fp32_energy_nJ"]) / 1000,
        "energy_ratio": float(t["energy_ratio"]),
        "latency_us": float(t["latency_us"]), "fp32_latency_us": float(t["fp32_latency_us"]),
        "speedup": float(t["fp32_latency_us"] / t["latency_us"]) if t["latency_us"] else math.nan,
    }
    if overflow is not None:
        table.attrs["headline"].update(saturated=int(t["saturated"]), accumulator_bits=overflow[2])
    return table


def headline(table: pd.DataFrame) -> dict:
    """The headline figures of a :func:`report` table (storage, energy and latency against fp32).

    Args:
        table: a table returned by :func:`report`.

    Returns:
        dict of the figures ``report`` stored in ``table.attrs["headline"]``.

    Raises:
        ValueError: ``table`` did not come from :func:`report`.
    """
    if "headline" not in table.attrs:
        raise ValueError("table has no headline figures; pass a table returned by nnlab.nna.report")
    return dict(table.attrs["headline"])


__getattr__ = renamed(__name__, RENAMED, globals())
