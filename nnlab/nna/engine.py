"""The engine: integer-only inference of a compiled :class:`~nnlab.nna.program.Program` in NumPy.

The pipeline: :func:`run` quantises the image onto the input grid (the one
floating-point step), then runs the program's layers in order, each on the
outputs of the layers it names (a residual add or a concat reads an earlier
layer's output; an output is kept only until its last reader has run), and
maps the last layer's integers back to real logits.

One short function per operation.  Tensors are integer arrays kept
channel-major, ``(C, N, H, W)`` for feature maps and ``(F, N)`` for vectors,
the layout of a GEMM-based accelerator: every layer computes
``acc = W @ columns`` with one row of ``W`` per output channel, and the
result is again channel-major.  :func:`run` hands outputs back in
PyTorch's ``(N, C, H, W)`` order.

A weight layer (:func:`conv2d` or :func:`linear`) does three things:

1. **accumulate** exactly: ``acc = sum((q_in - in_zero_point) * weight)``.
   im2col turns a convolution into one matrix product per group (stride,
   zero padding, dilation and groups), computed by BLAS in floating point
   on integer-valued arrays: exact as long as every partial sum stays below
   2**24 (float32) or 2**53 (float64); :func:`exact_dtype` picks the cheaper
   one that is exact for the layer's worst case.  A 1x1 convolution of
   stride 1 needs no im2col copy, and a depthwise one of stride 1
   accumulates one multiply per kernel offset instead (:func:`depthwise_conv2d`).  A batch
   norm was folded into the weight scales and the bias by the compiler.
2. **add the bias** (int32, with ``bias_frac_bits`` fractional bits), still
   in the narrowest exact type (float32, float64, or int64 when neither
   holds every sum), and check the accumulator width (``NNAConfig.accumulator_bits``): sums
   outside it are counted and saturated, as hardware would.  Every run
   reports, per weight layer, how many sums saturated
   (``Result.saturations``) and how many bits the widest sum needed
   (``Result.sum_bits``); :func:`predict` warns
   (:class:`AccumulatorOverflowWarning`) when any sum saturated, naming the
   layers and the accumulator width that would hold them.
3. **requantise** to the output grid, in one of two modes:

   * ``"torch"``: float32 arithmetic rounded half to even, exactly as
     PyTorch's quantized CPU kernels do it (fbgemm:
     ``rint(float(acc + bias) * (in_scale * weight_scale / out_scale))``;
     the oneDNN variant for convolutions on AVX512-VNNI CPUs multiplies by
     each scale in turn; see :func:`requantise_torch`).  For a layer whose
     ``kernel`` is ``"fbgemm_avx2"`` the sums are first corrected for
     fbgemm's AVX2 arithmetic, which adds neighbouring products in pairs
     that saturate at int16 (:func:`int16_pair_saturation`; it only happens
     for inputs beyond the range PyTorch calibrated);
   * ``"integer"``: integers only, as an accelerator does it: the multiplier
     ``M = in_scale * weight_scale / out_scale`` becomes ``m0 * 2**-shift``
     with an integer ``m0``, and ``q = (acc * m0 + 2**(shift-1)) >> shift``
     (round half up), see :func:`fixed_point_multiplier`.

   Then add the output zero point and clamp to the output range: the fused
   activation (ReLU, ReLU6, Hardtanh) is a clamp of the real output, so on
   the grid it is a clamp of the integers to
   :meth:`~nnlab.quant.Grid.clamp_range` (a ReLU clamps at the zero point).

:func:`run` takes the images in chunks (:func:`chunk_size`) small enough
for every layer's arrays to stay in the processor's cache, so that
throughput holds up at large batches; the counts are summed over chunks.

The other operations (:func:`maxpool2d`, :func:`avgpool2d`, :func:`flatten`,
:func:`add`, :func:`concat`) state in their docstrings exactly what they
compute in each mode, and which PyTorch quantized kernel the ``"torch"``
mode reproduces to the integer (measured on an x86 CPU with AVX2).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .._args import check_choice, check_int
from .config import SERIES2NX, NNAConfig
from .program import AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer
from .shapes import output_shapes

__all__ = ["MODES", "Result", "AccumulatorOverflowWarning", "overflow_message", "sum_width", "accumulator_width",
           "MAX_ACCUMULATOR_BITS", "CHUNK_BYTES", "chunk_size", "run", "predict", "quantise_input", "im2col", "conv2d", "depthwise_conv2d", "linear", "accumulate_bias",
           "int16_pair_saturation", "requantise", "requantise_torch", "requantise_integer", "fixed_point_multiplier",
           "maxpool2d",
           "avgpool2d", "flatten", "add", "concat", "exact_dtype", "output_logits", "channel_first"]

MODES = ("torch", "integer")
f32 = np.float32


class AccumulatorOverflowWarning(UserWarning):
    """Sums overflowed the accumulator and were saturated: the simulated network computed something else."""


@dataclass
class Result:
    """What :func:`run` returns.

    Attributes:
        logits: float64 ``(N, classes)``: the last layer's integers mapped back to real values.
        outputs: layer name -> integer output (channel-first), when ``trace=True``.
        saturations: weight layer name -> number of sums that overflowed the
            accumulator and were saturated (0 when none did; every weight layer has an entry).
        sum_bits: weight layer name -> bits a signed accumulator needs to hold
            the widest sum the layer computed in this run (its integer part),
            before saturation.
        accumulator_bits: the accumulator width the run used.
        int16_saturations: weight layer name -> number of pair sums that saturated at int16, for the
            weight layers whose ``kernel`` is ``"fbgemm_avx2"``, in ``"torch"`` mode
            (see :func:`int16_pair_saturation`).
    """

    logits: np.ndarray
    outputs: dict = field(default_factory=dict)
    saturations: dict = field(default_factory=dict)
    sum_bits: dict = field(default_factory=dict)
    accumulator_bits: int = 32
    int16_saturations: dict = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        """Top-1 class of each image."""
        return self.logits.argmax(axis=1)

    @property
    def saturated(self) -> int:
        """Sums saturated in all layers and images."""
        return int(sum(self.saturations.values()))

    @property
    def accumulator_bits_needed(self) -> int:
        """The widest sum of the run, in bits: the narrowest accumulator that would hold every sum of this run.

        After a saturated layer the later layers computed on saturated
        inputs, so rerun with this width to confirm (:func:`run` with
        ``config=config.replace(accumulator_bits=...)``).
        """
        return max(self.sum_bits.values(), default=1)

    def overflow_message(self, images: int | None = None) -> str | None:
        """One line describing the saturated sums, or None when no sum saturated."""
        return overflow_message(self.saturations, self.accumulator_bits, self.accumulator_bits_needed,
                                images=len(self.logits) if images is None else images)


def overflow_message(saturations: dict, accumulator_bits: int, needed_bits: int, images: int | None = None):
    """The warning for saturated sums: how many, in which layers, and the accumulator width that would hold them.

    Args:
        saturations: layer name -> saturated sums.
        accumulator_bits: the width that overflowed.
        needed_bits: the width of the widest sum.
        images: how many images were run (for the message), or None.

    Returns:
        A one-line message, or None when no sum saturated.
    """
    total = int(sum(saturations.values()))
    if total == 0:
        return None
    layers = ", ".join(f"{name}: {count:,}" for name, count in saturations.items() if count)
    on = f" on {images:,} image{'s' if images != 1 else ''}" if images is not None else ""
    return (f"accumulator overflow: {total:,} sum{'s' if total != 1 else ''} saturated the {accumulator_bits}-bit "
            f"accumulator{on} ({layers}), so the simulated network computed something other than the "
            f"trained one; the sums need {needed_bits} bits: use an accumulator of at least {needed_bits} bits "
            f"(NNAConfig(accumulator_bits={needed_bits})) or fewer weight or activation bits")


def sum_width(low: int, high: int, frac_bits: int = 0) -> int:
    """Bits of the narrowest signed accumulator holding every sum in ``[low, high]`` (integer part).

    The sums carry ``frac_bits`` fractional bits: a ``b``-bit accumulator
    holds ``-2**(b-1) * 2**frac_bits <= s <= (2**(b-1) - 1) * 2**frac_bits``.
    """
    unit = 1 << frac_bits
    width = 1
    if high > 0:
        width = max(width, (-(-int(high) // unit)).bit_length() + 1)
    if low < 0:
        width = max(width, ((-(int(low)) + unit - 1) // unit - 1).bit_length() + 1)
    return width


def _constant(memo: dict | None, layer, key: str, compute):
    """``compute()``, kept in ``memo`` under ``(layer, key)`` when a memo is given.

    :func:`run` passes one memo for all the chunks of a batch, so that a
    layer's constants (its weights as a float matrix, the exact types, the
    clamp range) are computed once per run, not once per chunk.
    """
    if memo is None:
        return compute()
    k = (id(layer), key)  # the layers live as long as the run: their ids are unique in it
    if k not in memo:
        memo[k] = compute()
    return memo[k]


def _clamp(q: np.ndarray, layer, memo: dict | None = None) -> np.ndarray:
    """Clamp integers to the layer's output range, its fused activation included, as int32."""
    lo, hi = _constant(memo, layer, "range", lambda: layer.out_grid.clamp_range(getattr(layer, "activation", None)))
    return np.clip(q, lo, hi).astype(np.int32)


# ----------------------------------------------------------------------------- input
def quantise_input(x: np.ndarray, layer: InputLayer) -> np.ndarray:
    """Real images to integers: ``clamp(rint(x * float32(1 / scale)) + zero_point, qmin, qmax)``.

    The one floating-point step of the pipeline, done as PyTorch does it
    (float32, round half to even; :meth:`nnlab.quant.Grid.quantise`); on a
    device the camera delivers integers.

    Args:
        x: float array ``(N, *layer.shape)``.
        layer: the program's :class:`InputLayer`.

    Returns:
        int32 array, channel-major: ``(C, N, H, W)`` or ``(features, N)``.
    """
    q = layer.grid.quantise(x).astype(np.int32)
    return np.ascontiguousarray(q.swapaxes(0, 1))


# ----------------------------------------------------------------------------- weight layers
def exact_dtype(layer: WeightLayer) -> type:
    """float32 if every partial sum of the layer stays below 2**24 in magnitude, else float64 (below 2**53).

    The worst case is ``fan_in * (2**in_bits - 1) * max|weight|``; below
    those bounds every integer, and so every sum, is exact in that format.
    """
    worst = _worst_sum(layer)
    if worst < 2 ** 24:
        return np.float32
    if worst < 2 ** 53:
        return np.float64
    raise ValueError(f"layer {layer.name!r}: sums may reach {worst}, beyond what float64 holds exactly (2**53)")


def _worst_sum(layer: WeightLayer) -> int:
    """The largest ``|sum|`` the layer can compute: ``fan_in * (2**in_bits - 1) * max|weight|``."""
    return layer.fan_in * ((1 << layer.in_grid.bits) - 1) * int(np.abs(layer.weight).max(initial=0))


def _total_dtype(layer: WeightLayer) -> type:
    """The narrowest type holding ``sum * 2**bias_frac_bits + bias`` exactly: float32, float64 or int64."""
    worst = (_worst_sum(layer) << layer.bias_frac_bits) + int(np.abs(layer.bias.astype(np.int64)).max(initial=0))
    return np.float32 if worst < 2 ** 24 else np.float64 if worst < 2 ** 53 else np.int64


def im2col(x: np.ndarray, kh: int, kw: int, stride, dilation=(1, 1)) -> np.ndarray:
    """``(C, N, H, W)`` to the matrix ``(C*kh*kw, N*Ho*Wo)``: one column per output pixel, its receptive field.

    One slice copy per kernel offset ``(i, j)`` (``kh * kw`` of them, never
    one per pixel or channel); tap ``(i, j)`` reads row ``i * dilation[0]``
    and column ``j * dilation[1]`` of the window.  A 1x1 kernel of stride 1
    needs no copy: the input is its own matrix.
    """
    c, n, h, w = x.shape
    if kh == kw == 1 and tuple(stride) == (1, 1):
        return x.reshape(c, n * h * w)
    cols = np.empty((c, kh, kw, n) + _out_size(x.shape, (kh, kw), stride, dilation), x.dtype)
    for i, j in np.ndindex(kh, kw):
        cols[:, i, j] = _tap(x, i, j, cols.shape[4:], stride, dilation)
    return cols.reshape(c * kh * kw, -1)


def _out_size(shape, kernel, stride, dilation) -> tuple:
    """``(Ho, Wo)`` of a window sliding over an already padded ``(C, N, H, W)`` tensor."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    return (shape[2] - dh * (kh - 1) - 1) // sh + 1, (shape[3] - dw * (kw - 1) - 1) // sw + 1


def _tap(x: np.ndarray, i: int, j: int, size, stride, dilation) -> np.ndarray:
    """The view of ``x`` that kernel offset ``(i, j)`` reads for each of the ``(Ho, Wo)`` output pixels."""
    (ho, wo), (sh, sw), (dh, dw) = size, stride, dilation
    return x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def _shifted(q: np.ndarray, layer: WeightLayer, dtype) -> np.ndarray:
    """``q - in_zero_point`` in ``dtype``, zero-padded (real zero, as PyTorch pads a quantized tensor)."""
    (ph, pw), (c, n, h, w) = layer.padding, q.shape
    zp = int(layer.in_grid.zero_point)
    if not (ph or pw):
        return np.subtract(q, zp, dtype=dtype) if zp else q.astype(dtype)
    x = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype)
    np.subtract(q, zp, out=x[:, :, ph: ph + h, pw: pw + w], casting="unsafe")
    return x


def _is_depthwise(layer: WeightLayer) -> bool:
    """A depthwise convolution of stride 1 (one input channel per output channel): :func:`depthwise_conv2d`."""
    out, cg = layer.weight.shape[:2]
    return layer.groups > 1 and cg == 1 and out == layer.groups and tuple(layer.stride) == (1, 1)


def _uses_im2col(layer: WeightLayer) -> bool:
    """Whether :func:`conv2d` copies the layer's input to an im2col matrix (not depthwise, nor 1x1 stride 1)."""
    kh, kw = layer.weight.shape[2:]
    return not _is_depthwise(layer) and not (kh == kw == 1 and tuple(layer.stride) == (1, 1))


def conv2d(q: np.ndarray, layer: WeightLayer, memo: dict | None = None) -> np.ndarray:
    """Exact integer convolution sums (no bias): ``(C, N, H, W)`` ints to ``(out, N, Ho, Wo)`` integer values.

    ``acc[g] = W[g] @ im2col(q - in_zero_point)[g]`` for each of the
    ``groups`` groups of channels, ``W[g]`` the ``(out / groups, C / groups * kh * kw)``
    weight matrix of group ``g``; output channels are group-major, as in
    PyTorch.  The input is shifted by its zero point first, so zero padding
    pads with real zero, as PyTorch pads a quantized tensor.  A depthwise
    convolution of stride 1 (one input channel per output channel) skips
    im2col and accumulates one multiply per kernel offset
    (:func:`depthwise_conv2d`).

    The sums are integers held in :func:`exact_dtype` (float32 or float64,
    exact for the layer's worst case): BLAS multiplies them at full speed.
    ``memo``: see :func:`_constant`.
    """
    dtype = _constant(memo, layer, "dtype", lambda: exact_dtype(layer))
    x = _shifted(q, layer, dtype)
    out, cg, kh, kw = layer.weight.shape
    g, n = layer.groups, q.shape[1]
    ho, wo = _out_size(x.shape, (kh, kw), layer.stride, layer.dilation)
    if _is_depthwise(layer):
        return depthwise_conv2d(x, _constant(memo, layer, "weight", lambda: layer.weight.astype(dtype)),
                                layer.stride, layer.dilation)
    cols = im2col(x, kh, kw, layer.stride, layer.dilation)
    weight = _constant(memo, layer, "weight", lambda: layer.weight.reshape(g, out // g, -1).astype(dtype))
    if g == 1:
        acc = weight[0] @ cols
    else:  # one product per group: (groups, out / groups, C / groups * kh * kw) @ (groups, ..., N*Ho*Wo)
        acc = np.matmul(weight, cols.reshape(g, -1, cols.shape[1]))
    return acc.reshape(out, n, ho, wo)


def depthwise_conv2d(x: np.ndarray, weight: np.ndarray, stride, dilation) -> np.ndarray:
    """Depthwise sums of a padded, zero-point-shifted ``(C, N, H, W)`` tensor: one multiply-add per kernel offset.

    ``acc[c] = sum over (i, j) of weight[c, 0, i, j] * x[c, :, r + i*dh, s + j*dw]``.
    With each channel's images flattened to one row, tap ``(i, j)`` is the
    row shifted by ``i*dh*W + j*dw``: a contiguous slice, so every
    multiply-add runs over long rows.  The sums are computed at every pixel
    of the padded grid (those whose window leaves the image are dropped),
    then the outputs are read at the stride.  Every partial sum is an
    integer within the layer's worst case, so exact in ``x``'s float type.

    Returns:
        ``(C, N, Ho, Wo)`` (a strided view).
    """
    c, n, h, w = x.shape
    kh, kw = weight.shape[2:]
    (dh, dw), (sh, sw) = dilation, stride
    rows = x.reshape(c, n * h * w)
    length = rows.shape[1] - (kh - 1) * dh * w - (kw - 1) * dw  # past it, every window leaves its image
    acc = np.zeros_like(rows)
    term = np.empty((c, length), x.dtype)
    for i, j in np.ndindex(kh, kw):
        shift = i * dh * w + j * dw
        acc[:, :length] += np.multiply(rows[:, shift: shift + length], weight[:, :, i, j], out=term)
    ho, wo = _out_size(x.shape, (kh, kw), stride, dilation)
    return acc.reshape(c, n, h, w)[:, :, : sh * (ho - 1) + 1: sh, : sw * (wo - 1) + 1: sw]


def linear(q: np.ndarray, layer: WeightLayer, memo: dict | None = None) -> np.ndarray:
    """Exact integer sums (no bias): ``(in, N)`` ints to ``(out, N)``, ``acc = W @ (q - in_zero_point)``.

    The sums are integers held in :func:`exact_dtype`, as for :func:`conv2d`.
    """
    dtype = _constant(memo, layer, "dtype", lambda: exact_dtype(layer))
    weight = _constant(memo, layer, "weight", lambda: layer.weight.astype(dtype))
    return weight @ np.subtract(q, int(layer.in_grid.zero_point), dtype=dtype)


#: The int16 range that AVX2's ``vpmaddubsw`` saturates a pair sum to.
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def _pair_weights(layer: WeightLayer):
    """The weights as ``(groups, out / groups, K)`` in fbgemm's reduction order, ``K`` padded to even."""
    w = layer.weight.astype(np.int64)
    if layer.op == "conv2d":
        out, cg, kh, kw = w.shape
        g = layer.groups
        w = w.reshape(g, out // g, cg, kh, kw).transpose(0, 1, 3, 4, 2).reshape(g, out // g, kh * kw * cg)
    else:
        w = w[None]
    if w.shape[2] % 2:
        w = np.concatenate([w, np.zeros(w.shape[:2] + (1,), np.int64)], axis=2)
    return w


def int16_pair_saturation(q: np.ndarray, layer: WeightLayer):
    """What fbgemm's AVX2 kernels lose to int16 saturation: the correction to add to the exact sums.

    PyTorch's int8 kernels on x86 (fbgemm) multiply the raw unsigned input
    integers ``q`` (zero point not subtracted) by the signed weights with
    AVX2's ``vpmaddubsw``, which adds each two neighbouring products in
    int16 with saturation, ``sat16(q[k] * w[k] + q[k+1] * w[k+1])`` for even
    ``k``, before summing in int32 (the zero point's share, ``zp * sum(w)``,
    is subtracted afterwards, exactly).  The order ``k`` runs in is the
    im2col order of a channels-last tensor: kernel row, kernel column, input
    channel, within each group (padding holds the input's zero point); for a
    Linear layer, the input features.  An odd last product pairs with 0.
    Measured on an AVX2 CPU on every fbgemm convolution path (im2col,
    1x1, depthwise 3x3/5x5, grouped) and on Linear: exact to the integer.

    A pair can saturate only when ``q`` exceeds 127: the x86 qconfig
    observes activations with ``reduce_range`` (0..127) for that reason, but
    quantising clamps to the dtype's range (0..255), so inputs beyond the
    calibrated range reach it.  CPUs with AVX512-VNNI sum in int32
    (``vpdpbusd``) and never saturate, except in fbgemm's depthwise kernels
    (AVX2 code on every CPU); the compiler marks the layers that saturate
    with ``kernel="fbgemm_avx2"``.

    Args:
        q: the layer's input integers, channel-major: ``(C, N, H, W)`` or ``(F, N)``.
        layer: a conv2d or linear :class:`WeightLayer`.

    Returns:
        ``(correction, count)``: int64 array shaped like the layer's sums
        (``(out, N, Ho, Wo)`` or ``(out, N)``) to add to them, or None when no
        pair can saturate (the usual case, checked cheaply from the largest
        input and weights); and how many pair sums saturated.
    """
    w = _pair_weights(layer)
    groups, og, k2 = w.shape
    pairs = w.reshape(groups, og, k2 // 2, 2)
    conv = layer.op == "conv2d"
    zp = int(layer.in_grid.zero_point)
    top = max(int(q.max(initial=0)), zp if conv and any(layer.padding) else 0)
    reach = np.abs(pairs).max(axis=1)  # (groups, pairs, 2): the largest |weight| of each product
    hot = np.argwhere(top * reach.sum(axis=2) > INT16_MAX)
    if hot.size == 0:
        return None, 0
    if conv:
        (ph, pw), (sh, sw), (dh, dw) = layer.padding, layer.stride, layer.dilation
        _, cg, kh, kw = layer.weight.shape
        x = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=zp)
        ho, wo = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        shape, depth = (layer.out_channels, q.shape[1], ho, wo), kh * kw * cg

        def column(g, k):  # the raw inputs that product k of group g reads, one per output position
            r, s, c = k // (kw * cg), k // cg % kw, k % cg
            return x[g * cg + c, :, r * dh: r * dh + sh * (ho - 1) + 1: sh, s * dw: s * dw + sw * (wo - 1) + 1: sw]
    else:
        x, shape, depth = q.astype(np.int64), (layer.out_channels, q.shape[1]), q.shape[0]

        def column(g, k):
            return x[k]
    correction, count = None, 0
    for g, j in hot:
        u = [column(g, k).reshape(-1) if k < depth else None for k in (2 * j, 2 * j + 1)]
        bound = u[0] * reach[g, j, 0] + (0 if u[1] is None else u[1] * reach[g, j, 1])
        rows = np.flatnonzero(bound > INT16_MAX)
        if rows.size == 0:
            continue
        p = u[0][rows, None] * pairs[g, :, j, 0]
        if u[1] is not None:
            p += u[1][rows, None] * pairs[g, :, j, 1]
        lost = np.clip(p, INT16_MIN, INT16_MAX) - p
        count += int(np.count_nonzero(lost))
        if correction is None:
            correction = np.zeros((shape[0], int(np.prod(shape[1:]))), np.int64)
        correction[g * og: (g + 1) * og, rows] += lost.T
    return (None if correction is None else correction.reshape(shape)), count


def _per_channel(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Per-channel values shaped to broadcast along the first (channel) axis of ``like``."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def accumulate_bias(acc: np.ndarray, layer: WeightLayer, accumulator_bits: int, stats: dict | None = None,
                    memo: dict | None = None):
    """Add the int32 bias and saturate to the accumulator width.

    The bias has ``F = layer.bias_frac_bits`` fractional bits, so the sum is
    kept with them: ``total = acc * 2**F + bias`` (``acc + bias`` for ``F = 0``),
    in the narrowest type that holds every such sum of the layer exactly
    (float32 below 2**24, float64 below 2**53, else int64).  When a sum
    saturates, the sums are clipped in int64.

    Args:
        acc: exact sums (integer values, any numeric dtype), channel on the first axis.
        layer: the weight layer.
        accumulator_bits: accumulator width (of the integer part).
        stats: if given, receives ``"sum_bits"``: the bits of the widest sum
            before saturation (:func:`sum_width`).
        memo: see :func:`_constant`.

    Returns:
        ``(total, saturated)``: the sums (integer values) whose integer part
        is clipped to ``[-2**(b-1), 2**(b-1) - 1]``, and how many were
        clipped (``acc`` is clipped too, in place).
    """
    f = layer.bias_frac_bits
    lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
    dtype = _constant(memo, layer, "total_dtype", lambda: _total_dtype(layer)) if acc.dtype.kind == "f" else np.int64
    total = np.multiply(acc, dtype(1 << f), dtype=dtype) if f else acc.astype(dtype)
    total += _per_channel(_constant(memo, layer, f"bias {np.dtype(dtype)}", lambda: layer.bias.astype(dtype)), acc)
    low, high = (int(total.min()), int(total.max())) if total.size else (0, 0)
    if stats is not None:
        stats["sum_bits"] = sum_width(low, high, f)
    if lo << f <= low and high <= hi << f:  # the usual case, checked cheaply
        return total, 0
    total = total.astype(np.int64)
    saturated = int(np.count_nonzero((total < lo << f) | (total > hi << f)))
    np.clip(acc, lo, hi, out=acc)
    return np.clip(total, lo << f, hi << f), saturated


def fixed_point_multiplier(multiplier, frac_bits: int = 30):
    """Write real multipliers as ``m0 * 2**-shift`` with integer ``m0`` of ``frac_bits`` bits.

    Args:
        multiplier: positive float64 array (one per channel).
        frac_bits: precision of ``m0`` (``2**(frac_bits-1) <= m0 < 2**frac_bits``).

    Returns:
        ``(m0, shift)``: int64 arrays with ``m0 * 2**-shift ~= multiplier``.
    """
    mant, exp = np.frexp(np.asarray(multiplier, np.float64))  # multiplier = mant * 2**exp, 0.5 <= mant < 1
    m0 = np.rint(mant * (1 << frac_bits)).astype(np.int64)
    carry = m0 == (1 << frac_bits)  # mant rounded up to 1.0
    m0 = np.where(carry, m0 >> 1, m0)
    shift = frac_bits - exp - carry.astype(np.int64)
    too_far = shift > 62  # tiny multipliers: drop precision so the shift stays in int64
    m0 = np.where(too_far, m0 >> np.minimum(shift - 62, 63), m0)
    shift = np.minimum(shift, 62)
    if np.any(shift < 1):
        raise ValueError(f"requantisation multiplier too large for fixed point: {np.max(multiplier)}")
    return m0, shift.astype(np.int64)


def requantise_integer(total: np.ndarray, multiplier: np.ndarray, accumulator_bits: int) -> np.ndarray:
    """Integer requantisation ``(total * m0 + 2**(shift-1)) >> shift`` (round half up).

    Args:
        total: integer sums (channel first, any numeric dtype), within ``accumulator_bits``.
        multiplier: float64 ``(channels,)`` (or one) real multipliers.
        accumulator_bits: so that ``total * m0`` fits in int64.

    Returns:
        int64 array, not yet offset by the zero point.
    """
    m0, shift = fixed_point_multiplier(np.atleast_1d(multiplier), frac_bits=min(31, 62 - accumulator_bits))
    if m0.size > 1:
        m0, shift = _per_channel(m0, total), _per_channel(shift, total)
    else:
        m0, shift = m0[0], shift[0]
    return (total.astype(np.int64) * m0 + (np.int64(1) << (shift - 1))) >> shift


def requantise_torch(total: np.ndarray, acc: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """PyTorch's float32 requantisation (round half to even), before the zero point is added.

    * ``"fbgemm"``: ``atw = f32(in_scale) * f32(weight_scale)``,
      ``mult = atw / f32(out_scale)``, and
      ``rint((f32(acc) + f32(bias_float) / atw) * mult)`` (float bias, as
      PyTorch's quantized Linear/Conv pass it) or
      ``rint(f32(total) * mult * 2**-bias_frac_bits)`` (the int32 bias).
    * ``"onednn"``: ``v = f32(acc) * (1 / f32(1 / in_scale)) * f32(weight_scale) + f32(bias_float)``,
      ReLU (when the layer's activation starts at 0), then ``rint(v * f32(1 / out_scale))``.

    Args:
        total: integer sums with the int32 bias added (:func:`accumulate_bias`), any numeric dtype
            (an integer is rounded to float32 once, whatever type holds it exactly).
        acc: integer sums without bias (used when ``layer.bias_float`` is set).
        layer: the weight layer (with an output grid).

    Returns:
        float32 array of rounded values, not yet offset by the zero point.
    """
    ws = _per_channel(layer.weight_grid.scale, acc)
    in_scale, out_scale = layer.in_grid.scale, layer.out_grid.scale
    if layer.kernel == "onednn":
        src = f32(1.0) / f32(1.0 / float(in_scale))
        v = acc.astype(f32)
        v *= src
        v *= ws
        if layer.bias_float is not None:
            v += _per_channel(layer.bias_float.astype(f32), acc)
        if layer.activation is not None and layer.activation[0] == 0.0:
            np.maximum(v, f32(0), out=v)
        v *= f32(1.0 / float(out_scale))
        return np.rint(v, out=v)
    atw = in_scale * ws
    mult = atw / out_scale
    if layer.bias_float is not None:
        v = acc.astype(f32)
        v += _per_channel(layer.bias_float.astype(f32), acc) / atw
    else:
        v = total.astype(f32)
        if layer.bias_frac_bits:
            mult = mult * f32(2.0 ** -layer.bias_frac_bits)  # a power of two: exact
    v *= mult
    return np.rint(v, out=v)


def requantise(total: np.ndarray, acc: np.ndarray, layer: WeightLayer, mode: str, accumulator_bits: int,
               memo: dict | None = None):
    """Map a weight layer's sums onto its output grid: requantise, add the zero point, clamp (fused activation).

    In ``"integer"`` mode with a fractional bias (``F = bias_frac_bits > 0``)
    the bias goes through the multiplier on its own:
    ``(acc * m0 + ((bias * m0) >> F) + 2**(shift-1)) >> shift``, so that
    neither product leaves int64.

    Args:
        total: integer sums with bias (channel first, :func:`accumulate_bias`); acc: the same without bias.
        layer: the weight layer; ``out_grid`` None returns ``total`` (the logits' integers,
            with ``bias_frac_bits`` fractional bits), clamped at 0 by a fused ReLU.
        mode: ``"torch"`` or ``"integer"``.
        accumulator_bits: accumulator width.
        memo: see :func:`_constant`.

    Returns:
        int32 array on the output grid (int64 sums for the last layer).
    """
    if layer.out_grid is None:
        total = total.astype(np.int64)
        return np.maximum(total, 0) if layer.activation is not None else total
    if mode == "torch":
        q = requantise_torch(total, acc, layer)
    else:
        multiplier = (np.float64(layer.in_grid.scale) * layer.weight_grid.scale.astype(np.float64)
                      / np.float64(layer.out_grid.scale))
        if layer.bias_frac_bits == 0:
            q = requantise_integer(total, multiplier, accumulator_bits)
        else:
            m0, shift = fixed_point_multiplier(multiplier, frac_bits=min(31, 62 - accumulator_bits))
            m0, shift = _per_channel(m0, acc), _per_channel(shift, acc)
            bias = _per_channel(layer.bias.astype(np.int64), acc)
            q = (acc.astype(np.int64) * m0 + ((bias * m0) >> layer.bias_frac_bits) + (np.int64(1) << (shift - 1))) >> shift
    q += q.dtype.type(layer.out_grid.zero_point)
    return _clamp(q, layer, memo)


# ----------------------------------------------------------------------------- pooling and reshaping
def maxpool2d(q: np.ndarray, layer: PoolLayer) -> np.ndarray:
    """Max pooling of ``(C, N, H, W)`` integers; the grid is unchanged (padding never wins).

    PyTorch's quantized max pool computes the same (a maximum of integers).
    """
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    if ph or pw:
        q = np.pad(q, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=np.iinfo(q.dtype).min)
    h, w = q.shape[2:]
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = None
    for i in range(kh):  # the maximum over the kh*kw window offsets
        for j in range(kw):
            tap = q[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
            out = tap.copy() if out is None else np.maximum(out, tap, out=out)
    return out


def avgpool2d(q: np.ndarray, layer: PoolLayer, mode: str = "torch") -> np.ndarray:
    """Average pooling of ``(C, N, H, W)`` integers; every window divides by ``n = kh * kw`` (padding included).

    With ``S`` the window sum of ``q - in_zero_point`` (padding: real zero),
    ``R`` the window sum of the raw integers ``q`` (padding: the integer 0)
    and ``M = f32(in_scale / out_scale / n)`` (computed in float64), by
    ``layer.rounding``:

    * ``"requantise"`` (what the compiler emits for nnlab's models, whose
      fake-quantised average pool is followed by its own quantiser): the
      mean onto the output grid.  ``"torch"`` mode, as the fake-quantised
      model computes it in float32: ``v = f32(in_scale * S / n)``,
      ``q = rint(v * f32(1 / out_scale)) + out_zero_point``;
      ``"integer"`` mode: ``S`` times the fixed-point multiplier of
      ``in_scale / (n * out_scale)``, rounded half up, plus the zero point.

    The others are PyTorch's quantized CPU kernels, which keep the input's
    grid (measured to the integer, in both modes):

    * ``"scaled"``: ``rint(f32(S) * M) + zero_point``: ``avg_pool2d`` and
      ``adaptive_avg_pool2d`` of a channels-last (NHWC) tensor, such as a
      quantized convolution's or add's output;
    * ``"scaled_zp"``: ``rint(f32(f32(S) * M) + f32(zero_point))``:
      ``avg_pool2d`` of a contiguous (NCHW) tensor;
    * ``"raw_scaled"``: ``rint(f32(R) * M)``: ``adaptive_avg_pool2d`` of a
      contiguous tensor (the zero point is never subtracted);
    * ``"raw"``: ``rint(R / n)`` exactly: ``mean`` over H and W of a
      contiguous tensor.  (``mean`` of a channels-last tensor rounds in yet
      another way, which no rounding here reproduces.)

    ``rint`` rounds half to even.  A fused activation clamps the result on the output grid.
    """
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    n = kh * kw
    x = q.astype(np.int64)
    if layer.rounding not in ("raw_scaled", "raw"):
        x = x - int(layer.in_grid.zero_point)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    sums = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].sum(axis=(-2, -1))
    out, rounding = layer.out_grid, layer.rounding
    zp = int(out.zero_point)
    m = f32(np.float64(layer.in_grid.scale) / np.float64(out.scale) / n)
    if rounding == "requantise" and mode == "torch":
        mean = (np.float64(layer.in_grid.scale) * sums / n).astype(f32)
        v = np.rint(mean * (f32(1.0) / out.scale)) + zp
    elif rounding == "requantise":
        v = requantise_integer(sums, np.array([np.float64(layer.in_grid.scale) / (n * np.float64(out.scale))]), 40) + zp
    elif rounding == "scaled":
        v = np.rint(sums.astype(f32) * m) + zp
    elif rounding == "scaled_zp":
        v = np.rint(sums.astype(f32) * m + f32(zp))
    elif rounding == "raw_scaled":
        v = np.rint(sums.astype(f32) * m)
    else:  # "raw": float64 division of integers below 2**53, so a tie is an exact .5
        v = np.rint(sums / n)
    return _clamp(v, layer)


def flatten(q: np.ndarray, layer: FlattenLayer) -> np.ndarray:
    """``(C, N, H, W)`` to ``(C*H*W, N)``, features in PyTorch's order (channel, row, column)."""
    if q.ndim == 2:
        return q
    return q.transpose(0, 2, 3, 1).reshape(-1, q.shape[1])


# ----------------------------------------------------------------------------- joining tensors
def _rescale(q: np.ndarray, grid, out, mode: str) -> np.ndarray:
    """Integers on ``grid`` onto the grid ``out``, not yet clamped (int64 or integer-valued float32)."""
    d = q.astype(np.int64) - int(grid.zero_point)
    if mode == "torch":
        return np.rint(d.astype(f32) * grid.scale * (f32(1.0) / out.scale)) + int(out.zero_point)
    m = np.float64(grid.scale) / np.float64(out.scale)
    return requantise_integer(d, np.array([m]), 32) + int(out.zero_point)


def _dequantise_fma(q: np.ndarray, grid) -> np.ndarray:
    """``fma(q, scale, f32(-zero_point * scale))`` rounded once to float32, as PyTorch's vectorised kernels dequantise.

    In float64 ``q * scale`` is exact (8 by 24 bits) and so is its sum with the float32 ``-zero_point * scale``
    (their bits span fewer than 53), so one rounding to float32 gives the fused multiply-add.
    """
    premul = np.float64(f32(grid.scale) * f32(-int(grid.zero_point)))
    return (q.astype(np.float64) * np.float64(grid.scale) + premul).astype(f32)


def add(a: np.ndarray, b: np.ndarray, layer: AddLayer, mode: str = "torch") -> np.ndarray:
    """Residual add of two integer tensors on different grids, onto the output grid.

    * ``"torch"``: each input dequantised in float32, ``c = da + db`` in
      float32, then ``rint(c * f32(1 / out_scale)) + out_zp`` clamped to the
      range.  How the inputs are dequantised, by ``layer.rounding``:

      * ``"fake_quant"`` (what the compiler emits for nnlab's models):
        ``da = f32(a - a_zp) * f32(a_scale)`` (likewise ``db``): the sum of
        two fake-quantised tensors, fake-quantised again;
      * ``"qadd"`` (for PyTorch's int8 models): PyTorch's ``quantized::add``
        and ``add_relu`` on the CPU, whose vectorised loop dequantises with a
        fused multiply-add, ``da = fma(a, a_scale, f32(-a_zp * a_scale))``
        (:func:`_dequantise_fma`), measured exact on an AVX2 CPU.  One
        caveat: the elements at the end of each thread's share of the tensor
        that do not fill a whole vector step (fewer than 64 on AVX2) go
        through PyTorch's scalar loop, which dequantises as ``"fake_quant"``
        does; the two roundings give different integers for a small share of
        elements (0.07% in one measured add), so such a tail element can,
        rarely, differ by 1 (none did in the measured networks).

    * ``"integer"``: each difference times the fixed-point multiplier of
      ``scale / out_scale``, both aligned on one shift, summed, rounded half up.

    A fused ReLU (or other clamp) clamps on the output grid (PyTorch's
    ``add_relu`` takes ``max(c, 0)`` before rounding: the same integers).
    """
    (ga, gb), out = layer.in_grids, layer.out_grid
    da, db = a.astype(np.int64) - int(ga.zero_point), b.astype(np.int64) - int(gb.zero_point)
    if mode == "torch":
        if getattr(layer, "rounding", "fake_quant") == "qadd":
            c = _dequantise_fma(a, ga) + _dequantise_fma(b, gb)
        else:
            c = da.astype(f32) * ga.scale + db.astype(f32) * gb.scale
        v = np.rint(c * (f32(1.0) / out.scale))
    else:
        ma, sa = fixed_point_multiplier(np.array([np.float64(ga.scale) / np.float64(out.scale)]), 30)
        mb, sb = fixed_point_multiplier(np.array([np.float64(gb.scale) / np.float64(out.scale)]), 30)
        s = int(max(sa[0], sb[0]))  # a common shift: align both products
        v = (da * (ma[0] << (s - sa[0])) + db * (mb[0] << (s - sb[0])) + (1 << (s - 1))) >> s
    return _clamp(v + int(out.zero_point), layer)


def concat(qs: list, layer: ConcatLayer, mode: str = "torch") -> np.ndarray:
    """Channel concatenation of integer tensors, each rescaled from its grid onto the output grid.

    * ``"torch"``: exactly PyTorch's ``quantized::cat`` on the CPU: each
      input dequantised in float32, ``f32(q - zp) * f32(scale)``, then
      quantised, ``rint(x * f32(1 / out_scale)) + out_zp`` clamped to the
      range; an input already on the output grid is copied unchanged (that
      formula gives it back exactly).  A nnlab fake-quantised model computes
      the same: ``torch.cat`` of fake-quantised tensors, fake-quantised again.
    * ``"integer"``: ``q - zp`` times the fixed-point multiplier of
      ``scale / out_scale``, rounded half up (a copy for the same grid).

    A fused activation clamps on the output grid.
    """
    parts = []
    for q, grid in zip(qs, layer.in_grids):
        parts.append(q.astype(np.int64) if grid == layer.out_grid else _rescale(q, grid, layer.out_grid, mode))
    return _clamp(np.concatenate(parts, axis=0), layer)


# ----------------------------------------------------------------------------- the program
def output_logits(out: np.ndarray, program: Program) -> np.ndarray:
    """Real values of the program's output integers ``(features, N)``, as float64 ``(N, features)``.

    On the output's grid, ``(q - zero_point) * scale``; the int32 sums of a
    last weight layer (no output grid) times ``in_scale * weight_scale``.
    """
    layer = program.output
    while isinstance(layer, FlattenLayer) and layer.out_grid is None:
        layer = program.layer(layer.inputs[0])
    if isinstance(layer, WeightLayer) and layer.out_grid is None:
        scale = np.float64(layer.in_grid.scale) * layer.weight_grid.scale.astype(np.float64)
        scale = scale * 2.0 ** -layer.bias_frac_bits  # the sums carry the bias's fractional bits
        scale = np.repeat(scale, out.shape[0] // scale.size)  # a flattened conv output: channel-major features
        return (out.astype(np.float64) * _per_channel(scale, out)).T
    grid = layer.out_grid
    return ((out.astype(np.float64) - int(grid.zero_point)) * np.float64(grid.scale)).T


def channel_first(q: np.ndarray) -> np.ndarray:
    """Channel-major back to PyTorch's layout: ``(C, N, H, W)`` to ``(N, C, H, W)``, ``(F, N)`` to ``(N, F)``."""
    return q.swapaxes(0, 1)


def _check_input(program: Program, x):
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array or torch tensor of images, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must hold float images (normalised, as the data loaders yield them), "
                        f"got dtype {x.dtype}")
    shape = tuple(program.input.shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}) for program "
                         f"{program.name!r}, got {tuple(x.shape)}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = ~finite.reshape(len(x), -1).all(axis=1)
        nan = int(np.isnan(x).sum())
        raise ValueError(f"x (the input of program {program.name!r}) holds {nan} NaN and {int((~finite).sum()) - nan} "
                         f"infinite value(s), in {int(bad.sum())} of {len(x)} images (the first: image "
                         f"{int(np.argmax(bad))}); the accelerator quantises real numbers only: check the images")
    return x


def _step(layer, ins, x, mode, accumulator_bits, saturations, sum_bits, int16_saturations=None, memo=None):
    """Run one layer on its inputs' integers (``memo``: see :func:`_constant`)."""
    int16_saturations = {} if int16_saturations is None else int16_saturations
    if isinstance(layer, InputLayer):
        return quantise_input(x, layer)
    if isinstance(layer, WeightLayer):
        acc = conv2d(ins[0], layer, memo) if layer.op == "conv2d" else linear(ins[0], layer, memo)
        if mode == "torch" and layer.kernel == "fbgemm_avx2":
            correction, int16_saturations[layer.name] = int16_pair_saturation(ins[0], layer)
            if correction is not None:
                acc = acc.astype(np.int64) + correction
        stats = {}
        total, saturations[layer.name] = accumulate_bias(acc, layer, accumulator_bits, stats, memo)
        sum_bits[layer.name] = stats["sum_bits"]
        return requantise(total, acc, layer, mode, accumulator_bits, memo)
    if isinstance(layer, PoolLayer):
        return maxpool2d(ins[0], layer) if layer.op == "maxpool2d" else avgpool2d(ins[0], layer, mode)
    if isinstance(layer, FlattenLayer):
        return flatten(ins[0], layer)
    if isinstance(layer, AddLayer):
        return add(ins[0], ins[1], layer, mode)
    if isinstance(layer, ConcatLayer):
        return concat(ins, layer, mode)
    raise TypeError(f"layer {getattr(layer, 'name', '?')!r}: unknown layer type {type(layer).__name__}")


#: Accumulator widths the engine simulates (the integer requantisation keeps ``sum * multiplier`` in int64).
MAX_ACCUMULATOR_BITS = 48


def accumulator_width(config=None, accumulator_bits=None) -> int:
    """The accumulator width a run uses: ``accumulator_bits`` if given, else ``config.accumulator_bits``.

    Args:
        config: an integer :class:`~nnlab.nna.config.NNAConfig` (default the Series2NX-like preset).
        accumulator_bits: an explicit width, 8..48 (a shorthand for
            ``config.replace(accumulator_bits=...)``).

    Raises:
        TypeError: ``config`` is not an NNAConfig.
        ValueError: an fp32 config, a width outside 8..48, or both arguments given with different widths.
    """
    if config is not None:
        if not isinstance(config, NNAConfig):
            raise TypeError(f"config must be an nnlab.nna.NNAConfig, got {type(config).__name__}")
        if config.arithmetic != "int":
            raise ValueError(f"config {config.name!r} computes in fp32; the engine runs integer programs: pass an "
                             f"integer config such as nnlab.nna.SERIES2NX")
    if accumulator_bits is None:
        width = (SERIES2NX if config is None else config).accumulator_bits
        check_int("config.accumulator_bits", width, minimum=8, maximum=MAX_ACCUMULATOR_BITS)
        return width
    check_int("accumulator_bits", accumulator_bits, minimum=8, maximum=MAX_ACCUMULATOR_BITS)
    if config is not None and config.accumulator_bits != accumulator_bits:
        raise ValueError(f"accumulator_bits={accumulator_bits} contradicts config.accumulator_bits="
                         f"{config.accumulator_bits}; pass config=config.replace(accumulator_bits=...) alone")
    return accumulator_bits


def run(program: Program, x, mode: str = "torch", *, config: NNAConfig | None = None,
        accumulator_bits: int | None = None, trace: bool = False) -> Result:
    """Run a compiled program on a batch of images, in integer arithmetic.

    Layers run in order; each reads the outputs of the layers it names,
    and an output is dropped once its last reader has run.  The images run
    in chunks of :func:`chunk_size` (every chunk gives the same integers as
    the whole batch would); ``Result.saturations`` and
    ``Result.int16_saturations`` are summed over the chunks and
    ``Result.sum_bits`` is the widest of them.

    Args:
        program: from :func:`nnlab.nna.compile_model` or :func:`nnlab.nna.compile_torch_int8`.
        x: float images ``(N, *input shape)`` (NumPy array or torch tensor), finite.
        mode: requantisation ``"torch"`` (PyTorch's float32 rounding, and its
            kernels' int16 saturation where a layer's ``kernel`` says so) or
            ``"integer"`` (fixed-point multiplier and shift).
        config: the accelerator (default :data:`~nnlab.nna.config.SERIES2NX`); the run
            uses its ``accumulator_bits``: sums outside that width saturate and are counted.
        accumulator_bits: shorthand for ``config.replace(accumulator_bits=...)`` (8..48).
        trace: keep every layer's integer output in ``Result.outputs``.

    Returns:
        A :class:`Result`; ``Result.saturations`` counts the saturated sums
        per layer (see also ``Result.overflow_message()``).

    Raises:
        TypeError, ValueError: wrong input type, dtype or shape, NaN or
            infinite input values, unknown mode, or a bad config.
    """
    check_choice("mode", mode, MODES)
    width = accumulator_width(config, accumulator_bits)
    x = _check_input(program, x)
    size = chunk_size(program)
    saturations, sum_bits, int16_saturations, outputs, last, memo = {}, {}, {}, {}, [], {}
    for start in range(0, max(len(x), 1), size):  # chunk by chunk, so that each layer's arrays stay in the cache
        out, part = _run_chunk(program, x[start: start + size], mode, width, trace, memo)
        last.append(out)
        add_counts((saturations, sum_bits, int16_saturations), part)
        for name, q in part.outputs.items():
            outputs.setdefault(name, []).append(q)
    outputs = {name: np.concatenate(qs) for name, qs in outputs.items()}
    out = np.concatenate(last, axis=1)  # channel-major: images on the second axis
    return Result(output_logits(out, program), outputs, saturations, sum_bits, width, int16_saturations)


def add_counts(totals: tuple, part: Result) -> None:
    """Add the counts of a run on some images to ``totals``, the counts of a run on more.

    ``totals`` is ``(saturations, sum_bits, int16_saturations)``, dicts keyed
    by layer name, updated in place: saturated sums add up, the widest sum
    is the widest of both.
    """
    saturations, sum_bits, int16_saturations = totals
    for name, count in part.saturations.items():
        saturations[name] = saturations.get(name, 0) + count
    for name, bits in part.sum_bits.items():
        sum_bits[name] = max(sum_bits.get(name, 1), bits)
    for name, count in part.int16_saturations.items():
        int16_saturations[name] = int16_saturations.get(name, 0) + count


def _run_chunk(program: Program, x: np.ndarray, mode: str, width: int, trace: bool, memo: dict):
    """:func:`run` on a batch small enough for the cache (checked input): the output integers and the counts."""
    outputs, saturations, sum_bits, int16_saturations, values = {}, {}, {}, {}, {}
    last_use = program.last_uses()
    for i, layer in enumerate(program.layers):
        q = _step(layer, [values[name] for name in layer.inputs], x, mode, width, saturations, sum_bits,
                  int16_saturations, memo)
        values[layer.name] = q
        if trace:
            outputs[layer.name] = channel_first(q)
        for name in layer.inputs:
            if last_use[name] == i:
                values.pop(name, None)
    return values[program.output.name], Result(None, outputs, saturations, sum_bits, width, int16_saturations)


#: Working memory one chunk of images may take in a layer, in bytes (:func:`chunk_size`).
CHUNK_BYTES = 1 << 25


def chunk_size(program: Program, chunk_bytes: int | None = None) -> int:
    """Images per chunk in :func:`run`: as many as keep every layer's arrays within ``chunk_bytes``.

    A layer's arrays per image are its input, its output (twice: the sums
    and the requantised values) and, for a convolution, its im2col matrix;
    at 8 bytes an element.  Throughput no longer falls as the batch grows
    past what the cache holds.

    Args:
        program: the program to run.
        chunk_bytes: the budget (default :data:`CHUNK_BYTES`).

    Returns:
        At least 1.
    """
    shapes = output_shapes(program)
    per_image = 1
    for layer in program.layers:
        size = int(np.prod(shapes[layer.name]))
        elements = 2 * size + sum(int(np.prod(shapes[name])) for name in layer.inputs)
        if isinstance(layer, WeightLayer) and layer.op == "conv2d" and _uses_im2col(layer):
            elements += size // layer.out_channels * layer.fan_in * layer.groups  # im2col: Ho*Wo * C*kh*kw
        per_image = max(per_image, 8 * elements)
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_image)


def predict(program: Program, x, mode: str = "torch", *, config: NNAConfig | None = None,
            accumulator_bits: int | None = None) -> np.ndarray:
    """Top-1 class of each image (int64 array), warning when sums overflowed the accumulator.

    Args:
        program, x, mode, config, accumulator_bits: as for :func:`run`.

    Returns:
        The predicted classes.  When any sum saturated, an
        :class:`AccumulatorOverflowWarning` says how many, in which layers,
        and the accumulator width that would hold them; call :func:`run`
        for the counts themselves (``Result.saturations``).
    """
    result = run(program, x, mode, config=config, accumulator_bits=accumulator_bits)
    message = result.overflow_message()
    if message:
        warnings.warn(message, AccumulatorOverflowWarning, stacklevel=2)
    return result.predictions
