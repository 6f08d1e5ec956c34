"""Packing integers at their real bit-depth, and storing sparse weights compactly.

A 5-bit weight takes 5 bits of memory, not 8 or 32.  Two layouts
(:data:`nnlab.nna.config.PACKINGS`):

* ``"dense"``: one continuous little-endian bitstream; value ``i`` occupies
  bits ``i*bits .. i*bits + bits - 1`` of the stream (it may straddle bytes);
* ``"word16"``: ``16 // bits`` values per 16-bit word, so none crosses a word
  (a 5-bit layer stores 3 values per word and wastes 1 bit in 16).

Signed values are stored in two's complement on ``bits`` bits.  Where a
function takes ``bits`` and ``signed``, a :class:`~nnlab.quant.Grid` (or
:class:`~nnlab.quant.QuantSpec`) may stand for both: its bit-depth and sign
are what is stored.

Four weight formats (:data:`nnlab.nna.config.WEIGHT_FORMATS`), all in the
weight's row-major order:

* ``"dense"``: every weight, zeros included;
* ``"bitmask"``: one presence bit per weight, then the non-zero values;
* ``"runlength"``: the non-zero values, each with the number of zeros before
  it in an ``index_bits``-bit field (the relative index of Deep Compression
  and EIE); a gap longer than ``2**index_bits - 1`` costs a filler entry (a
  stored zero with the largest gap).  Trailing zeros need no entry.
* ``"huffman"``: entropy-coded (:mod:`nnlab.nna.entropy`).  With an index
  width ``index_bits`` of 1..16, the run-length entries above, whose gaps
  and values are each Huffman-coded (two code-length tables, two coded
  streams: ``"index_table"``, ``"index"``, ``"values_table"``,
  ``"values"``); with ``index_bits`` 0, every weight Huffman-coded (no
  index; for dense layers).  A value ``v`` is coded as its zigzag symbol
  (0, -1, 1, -2, 2 ... become 0, 1, 2, 3, 4 ...), so that small magnitudes
  are small symbols and the code-length table ends early.  The streams are bitstreams whatever the packing
  policy, and the tables count as index information.

The first three are the *fixed-width* formats (:data:`nnlab.nna.config.SPARSE_FORMATS`):
an accelerator reads them with shifts and masks.  Huffman codes have
variable lengths and must be decoded one after the other before the MACs
use them (see :mod:`nnlab.nna.report` for what that costs).

:func:`encode_weights` tries every allowed format (and every index width:
1 to 8 bits for ``"runlength"``, 0 and 1 to the widest gap's width, at most
16, for ``"huffman"``) and keeps the smallest; :func:`decode_weights`
inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._args import check_choice, check_int
from . import entropy
from .config import PACKINGS, SPARSE_FORMATS, WEIGHT_FORMATS

__all__ = ["pack", "unpack", "packed_bytes", "bit_layout", "EncodedWeights", "encode_weights",
           "decode_weights", "runlength_gaps", "INDEX_BITS"]

#: Index widths tried for the run-length format.
INDEX_BITS = range(1, 9)
#: The widest gap field of the Huffman format (its code-length table grows with the alphabet).
HUFFMAN_MAX_INDEX_BITS = 16


def _bits_signed(bits, signed):
    """``(bits, signed)`` from an int and a bool, or from a Grid/QuantSpec's spec."""
    spec = getattr(bits, "spec", bits)
    if hasattr(spec, "bits") and hasattr(spec, "signed"):
        return spec.bits, spec.signed
    return bits, signed


def _check_bits_policy(bits, policy):
    check_int("bits", bits, minimum=1, maximum=16)
    check_choice("policy", policy, PACKINGS)


def _value_range(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_bytes(count: int, bits: int, policy: str = "dense") -> int:
    """Bytes that ``count`` values of ``bits`` bits take when packed.

    Args:
        count: number of values.
        bits: bits per value (1..16).
        policy: ``"dense"`` (``ceil(count * bits / 8)``) or ``"word16"``
            (``2 * ceil(count / (16 // bits))``).

    Returns:
        The size in bytes.
    """
    _check_bits_policy(bits, policy)
    check_int("count", count, minimum=0)
    if policy == "dense":
        return (count * bits + 7) // 8
    per_word = 16 // bits
    return 2 * (-(-count // per_word))


def pack(values, bits, signed: bool = True, policy: str = "dense") -> np.ndarray:
    """Pack integers at ``bits`` bits each into bytes.

    Args:
        values: integer array (any shape; flattened in row-major order).
        bits: bits per value, 1..16 (or a Grid/QuantSpec: its bits and sign).
        signed: values are two's complement in ``[-2**(bits-1), 2**(bits-1) - 1]``
            (True) or unsigned in ``[0, 2**bits - 1]`` (False).
        policy: ``"dense"`` bitstream or ``"word16"`` (see the module docstring).

    Returns:
        A uint8 array of :func:`packed_bytes` bytes.

    Raises:
        ValueError: a value does not fit in ``bits`` bits, or a bad bits/policy.
        TypeError: values are not integers.
    """
    bits, signed = _bits_signed(bits, signed)
    _check_bits_policy(bits, policy)
    values = np.asarray(values)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"values must be an integer array, got dtype {values.dtype}")
    v = values.reshape(-1).astype(np.int64)
    lo, hi = _value_range(bits, signed)
    if v.size and (v.min() < lo or v.max() > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values must fit in {bits} {kind} bits ({lo}..{hi}); got {v.min()}..{v.max()}")
    u = (v & ((1 << bits) - 1)).astype(np.uint32)  # two's complement on `bits` bits
    if policy == "dense":
        bit_matrix = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        return np.packbits(bit_matrix.reshape(-1), bitorder="little")
    per_word = 16 // bits
    u = np.concatenate([u, np.zeros(-len(u) % per_word, np.uint32)]).reshape(-1, per_word)
    words = (u << (np.arange(per_word, dtype=np.uint32) * bits)).sum(axis=1).astype("<u2")
    return words.view(np.uint8)


def unpack(data, count: int, bits, signed: bool = True, policy: str = "dense") -> np.ndarray:
    """Read ``count`` integers of ``bits`` bits back from packed bytes (the inverse of :func:`pack`).

    Args:
        data: uint8 array (or bytes) from :func:`pack`.
        count: how many values to read.
        bits, signed, policy: as given to :func:`pack`.

    Returns:
        An int32 array of ``count`` values.

    Raises:
        ValueError: ``data`` is shorter than ``count`` values need.
    """
    bits, signed = _bits_signed(bits, signed)
    _check_bits_policy(bits, policy)
    check_int("count", count, minimum=0)
    data = np.frombuffer(bytes(data), np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    need = packed_bytes(count, bits, policy)
    if data.dtype != np.uint8 or data.size < need:
        raise ValueError(f"data must be at least {need} uint8 bytes for {count} values of {bits} bits "
                         f"({policy}); got {data.size} of dtype {data.dtype}")
    if policy == "dense":
        bit_matrix = np.unpackbits(data[:need], count=count * bits, bitorder="little").reshape(count, bits)
        u = bit_matrix.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
    else:
        per_word = 16 // bits
        words = data[:need].view("<u2").astype(np.int64)
        u = ((words[:, None] >> (np.arange(per_word) * bits)) & ((1 << bits) - 1)).reshape(-1)[:count]
    if signed:
        u = u - ((u >> (bits - 1)) & 1) * (1 << bits)  # sign extension
    return u.astype(np.int32)


def bit_layout(values, bits, signed: bool = True, policy: str = "dense"):
    """Where each value's bits land in memory: a table for looking inside a packed array.

    Args:
        values: a few integers (say up to 16).
        bits, signed, policy: as for :func:`pack`.

    Returns:
        A pandas DataFrame, one row per value: ``value``, ``bits`` (its
        two's-complement bit string, most significant bit first), ``word``
        (byte for ``"dense"``, 16-bit word for ``"word16"``) and ``offset``
        of its first bit in it; ``attrs["bytes"]`` holds the packed bytes as hex.
    """
    bits, signed = _bits_signed(bits, signed)
    values = np.asarray(values).reshape(-1)
    packed = pack(values, bits, signed, policy)
    rows = []
    for i, v in enumerate(values.tolist()):
        code = format(v & ((1 << bits) - 1), f"0{bits}b")
        if policy == "dense":
            word, offset = divmod(i * bits, 8)
        else:
            word, slot = divmod(i, 16 // bits)
            offset = slot * bits
        rows.append({"value": v, "bits": code, "word": word, "offset": offset})
    table = pd.DataFrame(rows)
    table.attrs["bytes"] = packed.tobytes().hex(" ")
    return table


def runlength_gaps(flat: np.ndarray, index_bits: int):
    """Relative-index form of a 1-D weight array: the stored entries and the zeros before each.

    Args:
        flat: 1-D integer array.
        index_bits: width of the gap field; gaps above ``2**index_bits - 1``
            are split with filler entries (value 0).

    Returns:
        ``(gaps, values)``: two int64 arrays of the same length, one entry
        per stored value (fillers included).
    """
    check_int("index_bits", index_bits, minimum=1, maximum=16)
    positions = np.flatnonzero(flat)
    gaps = np.diff(np.concatenate([[-1], positions])) - 1  # zeros before each non-zero
    top = (1 << index_bits) - 1
    fillers = gaps // (top + 1)  # a gap g needs g // (top + 1) fillers of gap `top` first
    n = len(positions) + int(fillers.sum())
    out_gaps = np.full(n, top, np.int64)
    out_values = np.zeros(n, np.int64)
    ends = np.cumsum(fillers + 1) - 1  # where each non-zero lands after its fillers
    out_gaps[ends] = gaps - fillers * (top + 1)
    out_values[ends] = flat[positions]
    return out_gaps, out_values


@dataclass
class EncodedWeights:
    """A layer's weights as stored in memory.

    Attributes:
        format: ``"dense"``, ``"bitmask"``, ``"runlength"`` or ``"huffman"``.
        bits: bits per weight value (two's complement).
        index_bits: gap field width (``"runlength"``; for ``"huffman"``
            the largest gap symbol's width, 0 when every weight is coded), else 0.
        count: number of weights in the layer.
        entries: number of values stored (all weights, the non-zeros, or
            non-zeros plus fillers).
        streams: name -> uint8 array, in file order: ``"mask"`` or
            ``"index"`` (if any), then ``"values"``; ``"huffman"`` puts
            each coded stream after its code-length table
            (``"index_table"``, ``"index"``, ``"values_table"``, ``"values"``).
        payload_bits: bits of weight values actually stored.
        index_bits_total: bits of index information (mask or gaps; for
            ``"huffman"`` also both code-length tables).
        padding_bits: bits of packing waste (ends of bytes or words).
    """

    format: str
    bits: int
    index_bits: int
    count: int
    entries: int
    streams: dict
    payload_bits: int
    index_bits_total: int
    padding_bits: int

    @property
    def nbytes(self) -> int:
        """Total bytes of all streams."""
        return sum(s.size for s in self.streams.values())

    @property
    def decoded_symbols(self) -> int:
        """Huffman symbols the hardware decodes to read the layer: every value and every gap (0 unless ``"huffman"``)."""
        if self.format != "huffman":
            return 0
        return self.entries * (2 if self.index_bits else 1)


def _huffman_symbols(flat, bits, index_bits):
    """``(gaps, value symbols)`` the Huffman format codes: gaps None when ``index_bits`` is 0 (every weight)."""
    if index_bits == 0:
        gaps, values = None, flat
    else:
        gaps, values = runlength_gaps(flat, index_bits)
    return gaps, (values << 1) ^ (values >> 63)  # zigzag: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ... (< 2**bits)


def _coded_sizes(symbols, alphabet):
    """``(table bytes, coded bits)`` of one Huffman-coded stream, from the symbol counts alone."""
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = entropy.huffman_code_lengths(counts)
    return entropy.table_bytes(lengths), entropy.coded_bits(counts, lengths)


def _huffman_size(flat, bits, index_bits):
    """Bytes of the Huffman format without building it: tables plus coded streams."""
    size = 0
    for symbols, alphabet in zip(_huffman_symbols(flat, bits, index_bits), (1 << index_bits, 1 << bits)):
        if symbols is not None:
            table, coded = _coded_sizes(symbols, alphabet)
            size += table + (coded + 7) // 8
    return size


def _huffman_index_widths(flat):
    """Index widths worth trying: 0 (no index), and 1 up to the widest gap's width (wider changes nothing)."""
    positions = np.flatnonzero(flat)
    if positions.size == 0:
        return (0, 1)
    widest = int((np.diff(np.concatenate([[-1], positions])) - 1).max())
    return (0,) + tuple(range(1, min(max(widest.bit_length(), 1), HUFFMAN_MAX_INDEX_BITS) + 1))


def _encode_huffman(flat, bits, index_bits):
    gaps, values = _huffman_symbols(flat, bits, index_bits)
    streams, index_total = {}, 0
    if gaps is not None:
        streams["index_table"], streams["index"] = entropy.encode(gaps, 1 << index_bits)
        index_total = 8 * streams["index_table"].size + _coded_sizes(gaps, 1 << index_bits)[1]
    streams["values_table"], streams["values"] = entropy.encode(values, 1 << bits)
    index_total += 8 * streams["values_table"].size
    payload = _coded_sizes(values, 1 << bits)[1]
    total = 8 * sum(s.size for s in streams.values())
    return EncodedWeights("huffman", bits, index_bits, flat.size, values.size, streams, payload, index_total,
                          total - payload - index_total)


def _encode(flat, fmt, bits, index_bits, policy):
    if fmt == "huffman":
        return _encode_huffman(flat, bits, index_bits)
    if fmt == "dense":
        streams = {"values": pack(flat, bits, True, policy)}
        entries, index_total = flat.size, 0
    elif fmt == "bitmask":
        nz = flat[flat != 0]
        streams = {"mask": pack((flat != 0).astype(np.int64), 1, False, policy), "values": pack(nz, bits, True, policy)}
        entries, index_total = nz.size, flat.size
    else:
        gaps, values = runlength_gaps(flat, index_bits)
        streams = {"index": pack(gaps, index_bits, False, policy), "values": pack(values, bits, True, policy)}
        entries, index_total = values.size, values.size * index_bits
    payload = entries * bits
    total = 8 * sum(s.size for s in streams.values())
    return EncodedWeights(fmt, bits, index_bits if fmt == "runlength" else 0, flat.size, entries, streams,
                          payload, index_total, total - payload - index_total)


def _size(flat, nnz, fmt, bits, index_bits, policy):
    """Bytes of a format without building it (the search below tries many)."""
    if fmt == "huffman":
        return _huffman_size(flat, bits, index_bits)
    if fmt == "dense":
        return packed_bytes(flat.size, bits, policy)
    if fmt == "bitmask":
        return packed_bytes(flat.size, 1, policy) + packed_bytes(nnz, bits, policy)
    positions = np.flatnonzero(flat)
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    entries = nnz + int((gaps >> index_bits).sum())
    return packed_bytes(entries, index_bits, policy) + packed_bytes(entries, bits, policy)


def encode_weights(codes, bits, formats=SPARSE_FORMATS, policy: str = "dense") -> EncodedWeights:
    """Store a layer's integer weights in the smallest allowed format.

    Args:
        codes: integer weight array (signed, fits in ``bits`` bits).
        bits: bits per weight (1..16), or the weights' Grid (a signed one).
        formats: formats allowed (a subset of :data:`~nnlab.nna.config.WEIGHT_FORMATS`:
            ``"dense"``, ``"bitmask"``, ``"runlength"``, ``"huffman"``); default
            the fixed-width three.
        policy: ``"dense"`` or ``"word16"`` packing.

    Returns:
        The smallest :class:`EncodedWeights` (ties: the earlier format in
        ``formats``, the smaller index width).

    Raises:
        ValueError: an unknown format, an unsigned grid, a bad bits/policy.
    """
    if isinstance(formats, str) or not formats:
        raise ValueError(f"formats must be a non-empty tuple drawn from {WEIGHT_FORMATS}, got {formats!r}")
    for f in formats:
        check_choice("formats entry", f, WEIGHT_FORMATS)
    bits, signed = _bits_signed(bits, True)
    if not signed:
        raise ValueError("weights are stored signed; got an unsigned grid")
    _check_bits_policy(bits, policy)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    nnz = int(np.count_nonzero(flat))
    best = None
    widths = {"runlength": INDEX_BITS, "huffman": _huffman_index_widths(flat) if "huffman" in formats else ()}
    for fmt in formats:
        for ib in widths.get(fmt, (0,)):
            size = _size(flat, nnz, fmt, bits, ib, policy)
            if best is None or size < best[0]:
                best = (size, fmt, ib)
    return _encode(flat, best[1], bits, best[2], policy)


def decode_weights(enc: EncodedWeights, shape, policy: str = "dense") -> np.ndarray:
    """Rebuild the integer weights from their stored form (the inverse of :func:`encode_weights`).

    Args:
        enc: an :class:`EncodedWeights`.
        shape: the weight's shape.
        policy: the packing used.

    Returns:
        An int32 array of ``shape``.
    """
    n = enc.count
    if enc.format == "huffman":
        return _decode_huffman(enc).reshape(shape)
    values = unpack(enc.streams["values"], enc.entries, enc.bits, True, policy).astype(np.int32)
    if enc.format == "dense":
        flat = values
    elif enc.format == "bitmask":
        mask = unpack(enc.streams["mask"], n, 1, False, policy).astype(bool)
        flat = np.zeros(n, np.int32)
        flat[mask] = values
    else:
        gaps = unpack(enc.streams["index"], enc.entries, enc.index_bits, False, policy).astype(np.int64)
        positions = np.cumsum(gaps + 1) - 1
        flat = np.zeros(n, np.int32)
        flat[positions] = values  # fillers write a zero, harmlessly
    return flat.reshape(shape)


def _decode_huffman(enc: EncodedWeights) -> np.ndarray:
    """The flat int32 weights of a ``"huffman"`` layer: decode the value symbols (and gaps), sign-extend, scatter."""
    u = entropy.decode(enc.streams["values_table"], enc.streams["values"], enc.entries)
    if u.size and u.max() >= 1 << enc.bits:
        raise ValueError(f"damaged Huffman stream: a value symbol {int(u.max())} does not fit in {enc.bits} bits")
    values = ((u >> 1) ^ -(u & 1)).astype(np.int32)  # zigzag back: 0, 1, 2, 3 ... -> 0, -1, 1, -2 ...
    if enc.index_bits == 0:
        if values.size != enc.count:
            raise ValueError(f"a Huffman layer without index holds every weight: {enc.count}, got {values.size}")
        return values
    gaps = entropy.decode(enc.streams["index_table"], enc.streams["index"], enc.entries)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= enc.count:
        raise ValueError(f"damaged Huffman stream: the gaps reach weight {int(positions[-1])} of {enc.count}")
    flat = np.zeros(enc.count, np.int32)
    flat[positions] = values  # fillers write a zero, harmlessly
    return flat
