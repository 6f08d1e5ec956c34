"""Canonical Huffman coding of small integer symbols: the entropy coder of the ``"huffman"`` weight format.

Huffman coding gives frequent symbols short codes and rare ones long codes.
After pruning and quantisation most stored symbols are few and skewed: a
4-bit weight takes one of 16 values, but a handful of them (the small
magnitudes) cover most non-zeros; the gap before a non-zero weight (the
number of zeros skipped) is a run length, whose distribution falls off
geometrically, so short gaps are common and long ones rare.  A fixed-width
field spends the same bits on every symbol; a Huffman code spends about
``-log2(p)`` bits on a symbol of probability ``p``, which is never more and
often much less (Deep Compression, Han et al., ICLR 2016, saves 20-30% more
this way).

The code is *canonical*: it is fully determined by each symbol's code
length.  Codes are handed out in order of (length, symbol), each the
previous one plus one, shifted left when the length grows.  So a stored
stream needs only the table of code lengths, and the decoder rebuilds the
codes from it.  Code bits are written most significant bit first into one
continuous bitstream.

A coded stream is stored as two byte arrays:

* the *table* (:func:`table_bytes` bytes): 1 byte ``w`` (bits per length
  field; 0 for an empty stream), 4 bytes (uint32, little-endian) ``n``
  (entries: the highest symbol that occurs plus one), then ``n`` code
  lengths of ``w`` bits each (0 for a symbol that does not occur), packed;
* the *codes*: the concatenated codes, ``ceil(sum of code lengths / 8)`` bytes.

Decoding is sequential in hardware (where a symbol ends is known only once
it is decoded): about one symbol per clock for a table-driven decoder,
which is what :mod:`nnlab.nna.report` charges for it.
"""

from __future__ import annotations

import heapq

import numpy as np

from .._args import check_int

__all__ = ["huffman_code_lengths", "canonical_codes", "table_bytes", "coded_bits", "encode", "decode"]

#: Bytes of the table before the packed code lengths: the field width (1) and the entry count (4).
TABLE_PREFIX = 5


def huffman_code_lengths(counts) -> np.ndarray:
    """The code length of every symbol in an optimal prefix code for these counts (Huffman's algorithm).

    The two least frequent subtrees are merged repeatedly into one (ties
    broken by the order of creation, so the result is deterministic); a
    symbol's code length is the depth of its leaf in the final tree.

    Args:
        counts: 1-D array of non-negative integers, ``counts[s]`` = how
            often symbol ``s`` occurs.

    Returns:
        An int64 array of the same length: the code length of each symbol,
        0 for a symbol that does not occur.  A lone symbol gets length 1
        (it still takes one bit per occurrence, so that the stream says how
        many there are); no symbol at all gives all zeros.

    Raises:
        ValueError: ``counts`` is not 1-D or holds a negative number.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or (counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0)):
        raise ValueError(f"counts must be a 1-D array of non-negative integers, got shape {counts.shape} and "
                         f"dtype {counts.dtype}")
    lengths = np.zeros(counts.size, np.int64)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    # Nodes 0 .. m-1 are the leaves (the used symbols); each merge creates the next node.
    heap = [(int(counts[s]), node) for node, s in enumerate(used)]
    heapq.heapify(heap)
    parent = [0] * max(2 * used.size - 1, 0)
    new = used.size
    while len(heap) > 1:
        count_a, a = heapq.heappop(heap)
        count_b, b = heapq.heappop(heap)
        parent[a] = parent[b] = new
        heapq.heappush(heap, (count_a + count_b, new))
        new += 1
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # the root is the last node; a parent comes after its children
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[: used.size]
    return lengths


def canonical_codes(lengths) -> np.ndarray:
    """The canonical code of every symbol from the code lengths alone.

    Symbols are ordered by (length, symbol); the first gets code 0, each next
    one the previous code plus one, shifted left by the growth in length.

    Args:
        lengths: 1-D int array of code lengths (0: the symbol has no code).

    Returns:
        An int64 array: the code of each symbol (its ``lengths[s]`` low bits),
        0 where ``lengths`` is 0.
    """
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        codes[s] = code
        code, previous = code + 1, int(lengths[s])
    return codes


def _field_width(lengths) -> int:
    return int(lengths.max()).bit_length() if lengths.size and lengths.max() > 0 else 0


def _trimmed(lengths) -> np.ndarray:
    """The lengths up to the highest symbol that has a code (the table stores no trailing zeros)."""
    used = np.flatnonzero(lengths)
    return lengths[: used[-1] + 1] if used.size else lengths[:0]


def table_bytes(lengths) -> int:
    """Bytes of the code-length table that lets the decoder rebuild the code (see the module docstring).

    Args:
        lengths: the code lengths (from :func:`huffman_code_lengths`).

    Returns:
        ``5 + ceil(n * w / 8)`` bytes, ``n`` the entries, ``w`` the bits of one length field.
    """
    lengths = _trimmed(np.asarray(lengths, np.int64))
    return TABLE_PREFIX + (lengths.size * _field_width(lengths) + 7) // 8


def coded_bits(counts, lengths) -> int:
    """Bits of the coded stream: each symbol's count times its code length."""
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


def _pack_table(lengths) -> np.ndarray:
    lengths = _trimmed(lengths)
    width = _field_width(lengths)
    head = np.array([width], np.uint8).tobytes() + np.array([lengths.size], "<u4").tobytes()
    if width == 0:
        return np.frombuffer(head, np.uint8).copy()
    fields = ((lengths[:, None] >> np.arange(width)) & 1).astype(np.uint8)  # little-endian, as nnlab.nna.pack
    return np.concatenate([np.frombuffer(head, np.uint8), np.packbits(fields.reshape(-1), bitorder="little")])


def _unpack_table(table) -> np.ndarray:
    table = np.asarray(table, np.uint8)
    if table.size < TABLE_PREFIX:
        raise ValueError(f"a Huffman table needs at least {TABLE_PREFIX} bytes, got {table.size}")
    width, n = int(table[0]), int(table[1:5].view("<u4")[0])
    need = TABLE_PREFIX + (n * width + 7) // 8
    if table.size != need or (width == 0) != (n == 0):
        raise ValueError(f"a Huffman table of {n} lengths of {width} bits takes {need} bytes, got {table.size}")
    if n == 0:
        return np.zeros(0, np.int64)
    bits = np.unpackbits(table[TABLE_PREFIX:], count=n * width, bitorder="little").reshape(n, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


def encode(symbols, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """Huffman-code a sequence of symbols.

    Args:
        symbols: 1-D array of integers in ``[0, alphabet)``.
        alphabet: number of possible symbols (``2**bits`` for ``bits``-bit values).

    Returns:
        ``(table, codes)``: two uint8 arrays, the code-length table and the
        coded bitstream (see the module docstring).

    Raises:
        ValueError: a symbol outside ``[0, alphabet)``.
    """
    check_int("alphabet", alphabet, minimum=1)
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}); got {symbols.min()}..{symbols.max()}")
    lengths = huffman_code_lengths(np.bincount(symbols, minlength=alphabet))
    codes = canonical_codes(lengths)
    sym_len, sym_code = lengths[symbols], codes[symbols]
    starts = np.cumsum(sym_len) - sym_len
    total = int(sym_len.sum())
    # Bit j of a code of length L is its bit L-1-j: most significant first.
    which = np.repeat(np.arange(symbols.size), sym_len)
    shift = sym_len[which] - 1 - (np.arange(total) - starts[which])
    bits = ((sym_code[which] >> shift) & 1).astype(np.uint8)
    return _pack_table(lengths), np.packbits(bits)


def decode(table, codes, count: int) -> np.ndarray:
    """Decode ``count`` symbols from a table and a coded stream made by :func:`encode`.

    The code is rebuilt from the table's lengths.  Every bit position gets
    the symbol a code starting there would give (NumPy, all positions at
    once: a canonical code is recognised at length ``L`` when the first
    ``L`` bits are below the first code of that length plus the number of
    codes of that length); then the codes are followed from bit 0, each
    ending where the next begins.

    Args:
        table, codes: uint8 arrays (or bytes) from :func:`encode`.
        count: number of symbols to decode.

    Returns:
        An int64 array of ``count`` symbols.

    Raises:
        ValueError: the table or the stream is damaged (a code that is not
            in the table, a stream shorter or longer than ``count`` codes).
    """
    check_int("count", count, minimum=0)
    lengths = _unpack_table(np.frombuffer(bytes(table), np.uint8))
    codes = np.frombuffer(bytes(codes), np.uint8)
    if count == 0:
        if codes.size:
            raise ValueError(f"damaged Huffman stream: 0 symbols take no bytes, got {codes.size}")
        return np.zeros(0, np.int64)
    if not lengths.any():
        raise ValueError(f"cannot decode {count} symbols with an empty Huffman table")
    longest = int(lengths.max())
    order = sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (lengths[s], s))  # canonical order
    sorted_symbols = np.array(order, np.int64)
    per_length = np.bincount(lengths[lengths > 0], minlength=longest + 1)
    word = np.int32 if longest < 31 else np.int64  # halves the memory of the per-bit arrays below
    bits = np.unpackbits(codes).astype(word)
    n_bits = bits.size
    padded = np.concatenate([bits, np.zeros(longest, word)])
    window = np.zeros(n_bits, word)  # the `longest` bits starting at each position
    for j in range(longest):
        window = (window << 1) | padded[j: j + n_bits]
    symbol_at = np.full(n_bits, -1, np.int64)
    length_at = np.zeros(n_bits, np.int8)
    first, offset = 0, 0  # first code of this length; codes of shorter lengths
    for length in range(1, longest + 1):
        prefix = window >> (longest - length)
        hit = (length_at == 0) & (prefix - first < per_length[length]) & (prefix >= first)
        symbol_at[hit] = sorted_symbols[offset + prefix[hit] - first]
        length_at[hit] = length
        offset += int(per_length[length])
        first = (first + int(per_length[length])) << 1
    step = length_at.tolist()
    starts = np.empty(count, np.int64)
    p = 0
    for k in range(count):
        if p >= n_bits or step[p] == 0:
            raise ValueError(f"damaged Huffman stream: symbol {k} of {count} has no valid code at bit {p} "
                             f"(the stream has {n_bits} bits)")
        starts[k] = p
        p += step[p]
    if p > n_bits or n_bits - p >= 8:
        raise ValueError(f"damaged Huffman stream: {count} symbols end at bit {p}, the stream has {n_bits} bits")
    return symbol_at[starts]
