"""The hardware description: what the accelerator can do and what each operation costs.

An :class:`NNAConfig` describes one accelerator, in the spirit of SCALE-Sim
and Timeloop/Accelergy: the compiled network (the workload) and the cost
report are separate objects.  Two presets:

* :data:`SERIES2NX`: an accelerator like Imagination's PowerVR Series2NX
  (2017): up to 2,048 8-bit MACs per clock, about 4.1 TOPS, weights and
  activations of 4 to 16 bits chosen per layer and packed in memory;
* :data:`FP32_BASELINE`: the same accelerator computing in 32-bit floating
  point on dense weights, the reference every saving is measured against.

Energy table
------------
:class:`EnergyTable` holds the figures of M. Horowitz, "Computing's energy
problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V:

===========================  ==========
operation                    energy
===========================  ==========
8-bit integer add            0.03 pJ
32-bit integer add           0.1 pJ
8-bit integer multiply       0.2 pJ
32-bit integer multiply      3.1 pJ
32-bit float add             0.9 pJ
32-bit float multiply        3.7 pJ
64-bit SRAM read, 8 KB       10 pJ
64-bit SRAM read, 32 KB      20 pJ
64-bit SRAM read, 1 MB       100 pJ
64-bit DRAM access           1.3-2.6 nJ
===========================  ==========

Formulas (pJ), documented where they are computed:

* integer multiply of a ``bw``-bit weight by an ``ba``-bit activation:
  ``0.2 * (bw * ba) / (8 * 8)``: an array multiplier's area and energy grow
  with the product of its operand widths (the 32x32 figure this predicts,
  3.2 pJ, agrees with the measured 3.1 pJ);
* integer add of width ``b``: the straight line through the two measured
  points, ``0.03 + (b - 8) * (0.1 - 0.03) / 24`` (an adder grows linearly);
* SRAM read of 64 bits from a buffer of ``S`` bytes: interpolated in
  ``log(S)`` between the three measured sizes (constant outside them);
* DRAM access of 64 bits: the middle of Horowitz's range, 1.95 nJ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .._args import check_choice, check_float, check_int, check_positive_int

__all__ = ["EnergyTable", "NNAConfig", "PACKINGS", "SPARSE_FORMATS", "WEIGHT_FORMATS", "SERIES2NX",
           "SERIES2NX_HUFFMAN", "FP32_BASELINE", "PRESETS", "HOROWITZ_2014"]

#: How values are laid out in memory: ``"dense"`` is one continuous bitstream (a 5-bit value may
#: straddle two bytes); ``"word16"`` packs ``16 // bits`` values into each 16-bit word, so no
#: value crosses a word boundary (simpler hardware, some padding bits).
PACKINGS = ("dense", "word16")
#: How a layer's weights may be stored: every weight (``"dense"``), a 1-bit-per-weight presence
#: mask plus the non-zero values (``"bitmask"``), or the non-zero values each with the number of
#: zeros before it (``"runlength"``, the relative index of Deep Compression and EIE).
SPARSE_FORMATS = ("dense", "bitmask", "runlength")
#: Every weight storage format: the fixed-width ones above, and ``"huffman"``: the weight codes
#: and the run-length gaps entropy-coded (canonical Huffman, :mod:`nnlab.nna.entropy`), smaller
#: but decoded symbol by symbol before the MACs can use them.  A config lists those it may use
#: in ``sparse_formats``; the presets other than :data:`SERIES2NX_HUFFMAN` leave Huffman out.
WEIGHT_FORMATS = SPARSE_FORMATS + ("huffman",)


@dataclass(frozen=True)
class EnergyTable:
    """Energy of each elementary operation, in picojoules (pJ).

    Defaults: Horowitz, ISSCC 2014, 45 nm (see the module docstring).

    Attributes:
        int8_add, int32_add: integer additions (pJ).
        int8_mult, int32_mult: integer multiplications (pJ).
        fp32_add, fp32_mult: 32-bit floating-point addition and multiplication (pJ).
        sram_8kb, sram_32kb, sram_1mb: reading 64 bits from an SRAM of 8 KB, 32 KB, 1 MB (pJ).
        dram_64b: reading or writing 64 bits of DRAM (pJ); Horowitz gives 1.3-2.6 nJ, we take the middle.
        decode_symbol: decoding one Huffman symbol (pJ): a table-driven decoder does one lookup
            in its code table per symbol, costed as one 64-bit read of an 8 KB SRAM (Horowitz's
            smallest memory, so an upper bound for a table of a few hundred entries).
        source: where the figures come from.
    """

    int8_add: float = 0.03
    int32_add: float = 0.1
    int8_mult: float = 0.2
    int32_mult: float = 3.1
    fp32_add: float = 0.9
    fp32_mult: float = 3.7
    sram_8kb: float = 10.0
    sram_32kb: float = 20.0
    sram_1mb: float = 100.0
    dram_64b: float = 1950.0
    decode_symbol: float = 10.0
    source: str = "M. Horowitz, Computing's energy problem (and what we can do about it), ISSCC 2014, 45 nm"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "source":
                check_float(f.name, getattr(self, f.name), low=0.0, low_open=True)

    def mult(self, weight_bits: int, act_bits: int) -> float:
        """Energy (pJ) of one integer multiply: ``int8_mult * (weight_bits * act_bits) / 64``.

        Args:
            weight_bits, act_bits: operand bit-depths.

        Returns:
            pJ per multiplication.
        """
        return self.int8_mult * (weight_bits * act_bits) / 64.0

    def add(self, bits: int) -> float:
        """Energy (pJ) of one integer add of width ``bits``: linear through the 8- and 32-bit figures.

        Args:
            bits: adder width (the accumulator width for a MAC).

        Returns:
            pJ per addition.
        """
        return self.int8_add + (bits - 8) * (self.int32_add - self.int8_add) / 24.0

    def sram_read(self, buffer_bytes: int) -> float:
        """Energy (pJ) of reading 64 bits from an on-chip SRAM of ``buffer_bytes``.

        Interpolated in ``log2(size)`` between 8 KB, 32 KB and 1 MB; the end
        figures are used outside that range.

        Args:
            buffer_bytes: SRAM size in bytes.

        Returns:
            pJ per 64-bit read.
        """
        points = [(8 * 1024, self.sram_8kb), (32 * 1024, self.sram_32kb), (1024 * 1024, self.sram_1mb)]
        if buffer_bytes <= points[0][0]:
            return points[0][1]
        if buffer_bytes >= points[-1][0]:
            return points[-1][1]
        for (s0, e0), (s1, e1) in zip(points, points[1:]):
            if buffer_bytes <= s1:
                t = (math.log2(buffer_bytes) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
                return e0 + t * (e1 - e0)
        raise AssertionError("unreachable")


HOROWITZ_2014 = EnergyTable()


@dataclass(frozen=True)
class NNAConfig:
    """An accelerator: datapath, memories, packing, sparse formats and energy table.

    Every default is the Series2NX-like preset; see :data:`SERIES2NX` for
    the sources.  The model is deliberately simple (each assumption is
    stated where it is used in :mod:`nnlab.nna.costs`).

    Attributes:
        name: shown in reports.
        macs_per_cycle_8bit: multiply-accumulates per clock with 8-bit
            weights and activations.
        native_bits: width of one multiplier lane; narrower operands are
            computed at this width (no speed-up below it), wider ones take
            several lanes (see :meth:`macs_per_cycle`).
        clock_hz: clock frequency.
        dram_bytes_per_s: DRAM bandwidth.
        buffer_bytes: on-chip SRAM buffer for activations (and its read energy).
        accumulator_bits: width of the MAC accumulators (sums are checked
            against it and saturate).
        min_bits, max_bits: bit-depths the datapath supports per layer.
        packing: ``"dense"`` or ``"word16"`` (see :data:`PACKINGS`).
        sparse_formats: weight storage formats it may use, the smallest chosen per layer
            (drawn from :data:`WEIGHT_FORMATS`; default the fixed-width :data:`SPARSE_FORMATS`).
        decode_symbols_per_cycle: Huffman symbols (weight codes and gaps) the decoder
            turns back into fixed-width values per clock, for layers stored ``"huffman"``;
            default 1, a single table-driven decoder (a code's end is known only once it is
            decoded, so one decoder is sequential).  The layer waits for its weights to be
            decoded: see :mod:`nnlab.nna.report`.
        skip_zeros: the MAC array skips zero weights (ideal: no cycle or
            energy is spent on them).
        arithmetic: ``"int"`` (integer MACs) or ``"fp32"`` (floating point,
            32-bit storage, no packing: the baseline).
        energy: the :class:`EnergyTable`.
    """

    name: str = "Series2NX-like NNA"
    macs_per_cycle_8bit: int = 2048
    native_bits: int = 8
    clock_hz: float = 1.0e9
    dram_bytes_per_s: float = 12.8e9
    buffer_bytes: int = 256 * 1024
    accumulator_bits: int = 32
    min_bits: int = 4
    max_bits: int = 16
    packing: str = "dense"
    sparse_formats: tuple = SPARSE_FORMATS
    decode_symbols_per_cycle: float = 1.0
    skip_zeros: bool = True
    arithmetic: str = "int"
    energy: EnergyTable = field(default_factory=EnergyTable)

    def __post_init__(self):
        check_positive_int("macs_per_cycle_8bit", self.macs_per_cycle_8bit)
        check_int("native_bits", self.native_bits, minimum=1, maximum=32)
        check_float("clock_hz", self.clock_hz, low=0.0, low_open=True)
        check_float("dram_bytes_per_s", self.dram_bytes_per_s, low=0.0, low_open=True)
        check_positive_int("buffer_bytes", self.buffer_bytes)
        check_int("accumulator_bits", self.accumulator_bits, minimum=8, maximum=64)
        check_int("min_bits", self.min_bits, minimum=1, maximum=32)
        check_int("max_bits", self.max_bits, minimum=self.min_bits, maximum=32)
        check_choice("packing", self.packing, PACKINGS)
        if isinstance(self.sparse_formats, str) or not self.sparse_formats:
            raise ValueError(f"sparse_formats must be a non-empty tuple drawn from {WEIGHT_FORMATS}, "
                             f"got {self.sparse_formats!r}")
        for f in self.sparse_formats:
            check_choice("sparse_formats entry", f, WEIGHT_FORMATS)
        check_float("decode_symbols_per_cycle", self.decode_symbols_per_cycle, low=0.0, low_open=True)
        object.__setattr__(self, "sparse_formats", tuple(self.sparse_formats))
        check_choice("arithmetic", self.arithmetic, ("int", "fp32"))
        if not isinstance(self.energy, EnergyTable):
            raise TypeError(f"energy must be an EnergyTable, got {type(self.energy).__name__}")

    def macs_per_cycle(self, weight_bits: int, act_bits: int) -> float:
        """MACs per clock for a layer with these operand bit-depths.

        Each operand takes ``ceil(bits / native_bits)`` lanes of the
        ``native_bits``-wide datapath, so
        ``macs_per_cycle_8bit / (lanes(weight_bits) * lanes(act_bits))``:
        2,048 at 4..8 bits, 1,024 at 16x8, 512 at 16x16 and 128 at 32x32
        (the fp32 baseline) on the Series2NX-like preset.

        Args:
            weight_bits, act_bits: operand bit-depths.

        Returns:
            MACs per cycle.
        """
        lanes = math.ceil(weight_bits / self.native_bits) * math.ceil(act_bits / self.native_bits)
        return self.macs_per_cycle_8bit / lanes

    @property
    def peak_tops(self) -> float:
        """Peak tera-operations per second at 8 bits (a MAC counts as 2 operations)."""
        return 2 * self.macs_per_cycle_8bit * self.clock_hz / 1e12

    @property
    def dram_bytes_per_cycle(self) -> float:
        """DRAM bytes per clock."""
        return self.dram_bytes_per_s / self.clock_hz

    def check_bits(self, bits: int, what: str) -> None:
        """Raise a ValueError naming ``what`` when ``bits`` is outside ``min_bits..max_bits`` (int only)."""
        if self.arithmetic == "int" and not self.min_bits <= bits <= self.max_bits:
            raise ValueError(f"{what} has {bits}-bit values but {self.name} supports {self.min_bits} to "
                             f"{self.max_bits} bits per layer; choose another bit-depth or a config with "
                             f"min_bits={bits}")

    def replace(self, **changes) -> "NNAConfig":
        """A copy with some fields changed, e.g. ``SERIES2NX.replace(packing="word16")`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_fp32(self) -> "NNAConfig":
        """The same accelerator computing in fp32 on dense weights: the baseline of every report."""
        return self.replace(name=f"fp32 dense on {self.name}", arithmetic="fp32", skip_zeros=False,
                            sparse_formats=("dense",), min_bits=32, max_bits=32)


#: A Series2NX-like accelerator.  Sources: Imagination Technologies, "PowerVR Series2NX" press
#: release and product brief (Sept. 2017): "up to 2,048 8-bit MACs per clock", "4.1 TOPS",
#: "bit depths from 16 down to 4 bits, chosen per layer", data stored packed in memory.
#: 4.1 TOPS = 2 x 2,048 MACs x clock, hence the 1 GHz clock.  Our assumptions (not published
#: figures): a 12.8 GB/s DRAM interface (32-bit LPDDR4-3200), a 256 KB on-chip buffer, 32-bit
#: accumulators, 8-bit multiplier lanes, dense bitstream packing and ideal zero skipping.
SERIES2NX = NNAConfig()

#: The Series2NX-like accelerator with a Huffman decoder in front of its MAC array: each layer's
#: weights are stored in the smallest of the fixed-width formats and the entropy-coded one
#: (``"huffman"``), at one decoded symbol per clock.  An assumption of nnlab, not a product.
SERIES2NX_HUFFMAN = SERIES2NX.replace(name="Series2NX-like NNA + Huffman", sparse_formats=WEIGHT_FORMATS)

#: The comparison point: the same memories and clock, 32-bit floating-point MACs on dense
#: weights stored as float32 (no packing, no zero skipping).
FP32_BASELINE = SERIES2NX.as_fp32()

#: The presets by name.
PRESETS = {"series2nx": SERIES2NX, "series2nx-huffman": SERIES2NX_HUFFMAN, "fp32": FP32_BASELINE}
