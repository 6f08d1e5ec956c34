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

Three weight formats (:data:`nnlab.nna.config.SPARSE_FORMATS`), all in the
weight's row-major order:

* ``"dense"``: every weight, zeros included;
* ``"bitmask"``: one presence bit per weight, then the non-zero values;
* ``"runlength"``: the non-zero values, each with the number of zeros before
  it in an ``index_bits``-bit field (the relative index of Deep Compression
  and EIE); a gap longer than ``2**index_bits - 1`` costs a filler entry (a
  stored zero with the largest gap).  Trailing zeros need no entry.

:func:`encode_weights` tries every allowed format (and every index width from
1 to 8 bits) and keeps the smallest; :func:`decode_weights` inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._args import check_choice, check_int
from .config import PACKINGS, SPARSE_FORMATS

__all__ = ["pack", "unpack", "packed_bytes", "bit_layout", "EncodedWeights", "encode_weights",
           "decode_weights", "runlength_gaps", "INDEX_BITS"]

#: Index widths tried for the run-length format.
INDEX_BITS = range(1, 9)


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
    import pandas as pd

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
        format: ``"dense"``, ``"bitmask"`` or ``"runlength"``.
        bits: bits per weight value (two's complement).
        index_bits: gap field width (``"runlength"``), else 0.
        count: number of weights in the layer.
        entries: number of values stored (all weights, the non-zeros, or
            non-zeros plus fillers).
        streams: name -> uint8 array, in file order: ``"mask"`` or
            ``"index"`` (if any), then ``"values"``.
        payload_bits: bits of weight values actually stored.
        index_bits_total: bits of index information (mask or gaps).
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


def _encode(flat, fmt, bits, index_bits, policy):
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
        formats: formats allowed (a subset of ``("dense", "bitmask", "runlength")``).
        policy: ``"dense"`` or ``"word16"`` packing.

    Returns:
        The smallest :class:`EncodedWeights` (ties: the earlier format in
        ``formats``, the smaller index width).
    """
    for f in formats:
        check_choice("formats entry", f, SPARSE_FORMATS)
    bits, signed = _bits_signed(bits, True)
    if not signed:
        raise ValueError("weights are stored signed; got an unsigned grid")
    _check_bits_policy(bits, policy)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    nnz = int(np.count_nonzero(flat))
    best = None
    for fmt in formats:
        for ib in (INDEX_BITS if fmt == "runlength" else (0,)):
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
