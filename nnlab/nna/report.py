"""The cost report: bytes, MACs, memory traffic, energy and time per inference, per layer and in total.

:func:`report` costs a program on an :class:`~nnlab.nna.config.NNAConfig`
and, in the same table, the fp32 dense network on the same accelerator
(:meth:`NNAConfig.as_fp32`).  The model (one image per inference), stated
once here:

* **Storage**: encoded weights plus parameters (:mod:`nnlab.nna.storage`);
  fp32: 4 bytes per weight and per bias.
* **MACs**: ``positions * weights`` for a dense layer (``positions`` = output
  pixels of a convolution, 1 for a linear layer); with zero skipping only the
  non-zero weights count.
* **DRAM traffic**: every layer's stored weights and parameters are read once
  per inference (the on-chip buffer holds activations, not the model); the
  input image is read and the output written once; when a layer's inputs
  (the outputs of the layers it reads: two for an add, several for a concat)
  and its output do not fit in the buffer together, the output spills: it is
  written to DRAM and read back (twice its size).  A tensor a skip connection
  reads later is assumed to wait in the buffer.
* **SRAM traffic**: each weight, parameter and output activation crosses the
  buffer's port once per layer, and so does each input activation of a
  Conv2d/Linear layer (ideal reuse in the MAC array); a flatten is free.
* **Energy** (pJ, :class:`~nnlab.nna.config.EnergyTable`): MACs x (multiply
  at the operands' bit-depths + add at the accumulator width), or fp32
  multiply + add; SRAM per 64 bits at the buffer's size; DRAM per 64 bits.
  Pooling, adds, concats and requantisation are neglected (a few operations
  per output, against tens to hundreds of MACs).
* **Overflow**: costs do not depend on the data, but whether the sums fit
  in the accumulator does.  Given the :class:`~nnlab.nna.engine.Result`
  of a run (``saturations=``), the table adds ``saturated`` (sums that
  overflowed the accumulator and were saturated, per layer and in total)
  and ``sum_bits`` (bits of the widest sum; the total row: the widest of
  all), so an overflow shows in the same table as the costs.
* **Time** (roofline): ``compute cycles = MACs / macs_per_cycle(bits)``,
  ``memory cycles = DRAM bytes / bytes per cycle``; a layer takes the larger
  (compute and transfers overlap) and is "compute"- or "memory"-bound.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .._deprecated import renamed
from .compiler import output_shapes
from .config import SERIES2NX, NNAConfig
from .program import FlattenLayer, InputLayer, Program, WeightLayer
from .storage import encode_layer, parameter_bytes

__all__ = ["report", "layer_costs", "headline", "COLUMNS", "OVERFLOW_COLUMNS"]

#: Deprecated names (old -> new), served with a DeprecationWarning until the next release: ``summary``
#: (``nnlab.models.summary`` is a per-layer table of a model).
RENAMED = {"summary": "headline"}

#: The columns :func:`report` adds when given a run's saturation counts.
OVERFLOW_COLUMNS = ["saturated", "sum_bits"]
#: The columns of :func:`report`.
COLUMNS = ["layer", "op", "w_bits", "a_bits", "density", "format", "payload_B", "index_B", "params_B",
           "padding_B", "storage_B", "fp32_B", "compression", "macs_dense", "macs", "dram_B", "sram_B",
           "energy_mac_nJ", "energy_sram_nJ", "energy_dram_nJ", "energy_nJ", "fp32_energy_nJ", "energy_ratio",
           "cycles_compute", "cycles_memory", "cycles", "bound", "latency_us", "fp32_latency_us"]


def _prod(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def layer_costs(program: Program, config: NNAConfig = SERIES2NX) -> pd.DataFrame:
    """Per-layer costs of ``program`` on ``config`` (no baseline, no total row).

    With an fp32 config (``arithmetic="fp32"``) the layers are costed dense
    in float32, whatever their integer bit-depths.

    Args:
        program: a compiled program.
        config: the accelerator.

    Returns:
        DataFrame: ``layer``, ``op``, ``w_bits``, ``a_bits``, ``density``,
        ``format``, ``payload_B``, ``index_B``, ``params_B``, ``padding_B``,
        ``storage_B``, ``macs_dense``, ``macs``, ``dram_B``, ``sram_B``,
        ``energy_mac_nJ``, ``energy_sram_nJ``, ``energy_dram_nJ``,
        ``energy_nJ``, ``cycles_compute``, ``cycles_memory``, ``cycles``,
        ``bound``, ``latency_us``.
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a nnlab.nna Program, got {type(program).__name__}")
    if not isinstance(config, NNAConfig):
        raise TypeError(f"config must be an NNAConfig, got {type(config).__name__}")
    fp32 = config.arithmetic == "fp32"
    e = config.energy
    shapes = output_shapes(program)
    bits = {}  # layer name -> bits per output value
    rows = []
    last = program.output
    for layer in program.layers:
        out_shape = shapes[layer.name]
        out_bits = 32 if fp32 or layer.out_grid is None else layer.out_grid.bits  # int32 sums (or fp32 logits)
        in_values = [(_prod(shapes[name]), bits[name]) for name in layer.inputs]
        row = {"layer": layer.name, "op": layer.op, "w_bits": np.nan, "a_bits": np.nan, "density": np.nan,
               "format": "", "payload_B": 0.0, "index_B": 0.0, "params_B": 0.0, "padding_B": 0.0,
               "macs_dense": 0, "macs": 0, "energy_mac_nJ": 0.0}
        dram_bytes = sram_bits = 0.0
        if isinstance(layer, InputLayer):
            dram_bytes += _prod(out_shape) * out_bits / 8  # the image, read once
            row["a_bits"] = out_bits
        elif isinstance(layer, WeightLayer):
            positions = _prod(out_shape[1:]) if layer.op == "conv2d" else 1
            nnz = int(np.count_nonzero(layer.weight))
            a_bits = 32 if fp32 else layer.in_grid.bits
            row.update(a_bits=a_bits, density=nnz / layer.weight.size, macs_dense=positions * layer.weight.size)
            row["macs"] = positions * nnz if config.skip_zeros else row["macs_dense"]
            if fp32:
                row.update(w_bits=32, format="dense", payload_B=4.0 * layer.weight.size,
                           params_B=4.0 * layer.out_channels)
                mac_pj = e.fp32_mult + e.fp32_add
                per_cycle = config.macs_per_cycle(32, 32)
            else:
                enc = encode_layer(layer, config)
                fmt = enc.format + (f"/{enc.index_bits}b" if enc.index_bits else "")  # e.g. "runlength/4b"
                row.update(w_bits=layer.weight_bits, format=fmt,
                           payload_B=enc.payload_bits / 8, index_B=enc.index_bits_total / 8,
                           padding_B=enc.padding_bits / 8, params_B=float(parameter_bytes(layer)))
                mac_pj = e.mult(layer.weight_bits, a_bits) + e.add(config.accumulator_bits)
                per_cycle = config.macs_per_cycle(layer.weight_bits, a_bits)
            weights_bytes = row["payload_B"] + row["index_B"] + row["padding_B"] + row["params_B"]
            dram_bytes += weights_bytes
            in_act = sum(count for count, _ in in_values) * a_bits
            sram_bits += 8 * weights_bytes + in_act
            row["energy_mac_nJ"] = row["macs"] * mac_pj / 1000
            row["cycles_compute"] = row["macs"] / per_cycle
        if not isinstance(layer, InputLayer):
            in_bits_total = sum(count * b for count, b in in_values)
            out_bits_total = _prod(out_shape) * out_bits
            if isinstance(layer, FlattenLayer):
                out_bits_total = 0  # a reshape, in place
            elif (in_bits_total + out_bits_total) / 8 > config.buffer_bytes:
                dram_bytes += 2 * out_bits_total / 8  # spill: written out, read back
            sram_bits += out_bits_total
            if layer is last:
                dram_bytes += out_bits_total / 8  # the result leaves the chip
        row["storage_B"] = row["payload_B"] + row["index_B"] + row["params_B"] + row["padding_B"]
        row["dram_B"] = dram_bytes
        row["sram_B"] = sram_bits / 8
        row["energy_sram_nJ"] = sram_bits / 64 * e.sram_read(config.buffer_bytes) / 1000
        row["energy_dram_nJ"] = dram_bytes * 8 / 64 * e.dram_64b / 1000
        row["energy_nJ"] = row["energy_mac_nJ"] + row["energy_sram_nJ"] + row["energy_dram_nJ"]
        row["cycles_compute"] = row.get("cycles_compute", 0.0)
        row["cycles_memory"] = dram_bytes / config.dram_bytes_per_cycle
        row["cycles"] = max(row["cycles_compute"], row["cycles_memory"])
        row["bound"] = "" if row["cycles"] == 0 else (
            "compute" if row["cycles_compute"] >= row["cycles_memory"] else "memory")
        row["latency_us"] = row["cycles"] / config.clock_hz * 1e6
        rows.append(row)
        bits[layer.name] = out_bits
    return pd.DataFrame(rows)


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
    from .engine import Result

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
