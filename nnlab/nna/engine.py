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
   zero padding, dilation and groups, depthwise included), computed by BLAS
   in floating point on integer-valued arrays: exact as long as every
   partial sum stays below 2**24 (float32) or 2**53 (float64);
   :func:`exact_dtype` picks the cheaper one that is exact for the layer's
   worst case.  A batch norm was folded into the weight scales and the bias
   by the compiler.
2. **add the bias** (int32, with ``bias_frac_bits`` fractional bits) and
   check the accumulator width (``NNAConfig.accumulator_bits``): sums
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
     each scale in turn; see :func:`requantise_torch`);
   * ``"integer"``: integers only, as an accelerator does it: the multiplier
     ``M = in_scale * weight_scale / out_scale`` becomes ``m0 * 2**-shift``
     with an integer ``m0``, and ``q = (acc * m0 + 2**(shift-1)) >> shift``
     (round half up), see :func:`fixed_point_multiplier`.

   Then add the output zero point and clamp to the output range: the fused
   activation (ReLU, ReLU6, Hardtanh) is a clamp of the real output, so on
   the grid it is a clamp of the integers to
   :meth:`~nnlab.quant.Grid.clamp_range` (a ReLU clamps at the zero point).

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

__all__ = ["MODES", "Result", "AccumulatorOverflowWarning", "overflow_message", "sum_width", "accumulator_width",
           "MAX_ACCUMULATOR_BITS", "run", "predict", "quantise_input", "im2col", "conv2d", "linear", "accumulate_bias",
           "requantise", "requantise_torch", "requantise_integer", "fixed_point_multiplier", "maxpool2d",
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
    """

    logits: np.ndarray
    outputs: dict = field(default_factory=dict)
    saturations: dict = field(default_factory=dict)
    sum_bits: dict = field(default_factory=dict)
    accumulator_bits: int = 32

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


def _clamp(q: np.ndarray, layer) -> np.ndarray:
    """Clamp integers to the layer's output range, its fused activation included, as int32."""
    lo, hi = layer.out_grid.clamp_range(getattr(layer, "activation", None))
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
    worst = layer.fan_in * ((1 << layer.in_grid.bits) - 1) * int(np.abs(layer.weight).max(initial=0))
    if worst < 2 ** 24:
        return np.float32
    if worst < 2 ** 53:
        return np.float64
    raise ValueError(f"layer {layer.name!r}: sums may reach {worst}, beyond what float64 holds exactly (2**53)")


def im2col(x: np.ndarray, kh: int, kw: int, stride, dilation=(1, 1)) -> np.ndarray:
    """``(C, N, H, W)`` to the matrix ``(C*kh*kw, N*Ho*Wo)``: one column per output pixel, its receptive field.

    One slice copy per kernel offset ``(i, j)`` (``kh * kw`` of them, never
    one per pixel or channel); tap ``(i, j)`` reads row ``i * dilation[0]``
    and column ``j * dilation[1]`` of the window.
    """
    c, n, h, w = x.shape
    (sh, sw), (dh, dw) = stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((c, kh, kw, n, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(c * kh * kw, n * ho * wo)


def conv2d(q: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Exact integer convolution sums (no bias): ``(C, N, H, W)`` ints to ``(out, N, Ho, Wo)`` int64.

    ``acc[g] = W[g] @ im2col(q - in_zero_point)[g]`` for each of the
    ``groups`` groups of channels, ``W[g]`` the ``(out / groups, C / groups * kh * kw)``
    weight matrix of group ``g``; output channels are group-major, as in
    PyTorch.  The input is shifted by its zero point first, so zero padding
    pads with real zero, as PyTorch pads a quantized tensor.
    """
    dtype = exact_dtype(layer)
    (ph, pw), (c, n, h, w) = layer.padding, q.shape
    x = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype)  # padding: real zero
    np.subtract(q, int(layer.in_grid.zero_point), out=x[:, :, ph: ph + h, pw: pw + w], casting="unsafe")
    kh, kw = layer.weight.shape[2:]
    cols = im2col(x, kh, kw, layer.stride, layer.dilation)
    g, out = layer.groups, layer.out_channels
    if g == 1:
        acc = layer.weight.reshape(out, -1).astype(dtype) @ cols
    else:  # one product per group: (groups, out / groups, C / groups * kh * kw) @ (groups, ..., N*Ho*Wo)
        acc = np.matmul(layer.weight.reshape(g, out // g, -1).astype(dtype), cols.reshape(g, -1, cols.shape[1]))
    (dh, dw), (sh, sw) = layer.dilation, layer.stride
    ho, wo = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    return acc.astype(np.int64).reshape(out, n, ho, wo)


def linear(q: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Exact integer sums (no bias): ``(in, N)`` ints to ``(out, N)`` int64, ``acc = W @ (q - in_zero_point)``."""
    dtype = exact_dtype(layer)
    x = q.astype(dtype) - dtype(layer.in_grid.zero_point)
    return (layer.weight.astype(dtype) @ x).astype(np.int64)


def _per_channel(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Per-channel values shaped to broadcast along the first (channel) axis of ``like``."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def accumulate_bias(acc: np.ndarray, layer: WeightLayer, accumulator_bits: int, stats: dict | None = None):
    """Add the int32 bias and saturate to the accumulator width.

    The bias has ``F = layer.bias_frac_bits`` fractional bits, so the sum is
    kept with them: ``total = acc * 2**F + bias`` (``acc + bias`` for ``F = 0``).

    Args:
        acc: exact int64 sums, channel on the first axis.
        layer: the weight layer.
        accumulator_bits: accumulator width (of the integer part).
        stats: if given, receives ``"sum_bits"``: the bits of the widest sum
            before saturation (:func:`sum_width`).

    Returns:
        ``(total, saturated)``: int64 sums whose integer part is clipped to
        ``[-2**(b-1), 2**(b-1) - 1]``, and how many were clipped (``acc``
        is clipped too, in place).
    """
    f = layer.bias_frac_bits
    lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
    total = np.left_shift(acc, f) if f else acc.copy()
    total += _per_channel(layer.bias.astype(np.int64), acc)
    low, high = (int(total.min()), int(total.max())) if total.size else (0, 0)
    if stats is not None:
        stats["sum_bits"] = sum_width(low, high, f)
    if lo << f <= low and high <= hi << f:  # the usual case, checked cheaply
        return total, 0
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
        total: int64 sums (channel first), within ``accumulator_bits``.
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
    return (total * m0 + (np.int64(1) << (shift - 1))) >> shift


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
        total: int64 sums with the int32 bias added (:func:`accumulate_bias`).
        acc: int64 sums without bias (used when ``layer.bias_float`` is set).
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


def requantise(total: np.ndarray, acc: np.ndarray, layer: WeightLayer, mode: str, accumulator_bits: int):
    """Map a weight layer's sums onto its output grid: requantise, add the zero point, clamp (fused activation).

    In ``"integer"`` mode with a fractional bias (``F = bias_frac_bits > 0``)
    the bias goes through the multiplier on its own:
    ``(acc * m0 + ((bias * m0) >> F) + 2**(shift-1)) >> shift``, so that
    neither product leaves int64.

    Args:
        total: int64 sums with bias (channel first); acc: the same without bias.
        layer: the weight layer; ``out_grid`` None returns ``total`` (the logits' integers,
            with ``bias_frac_bits`` fractional bits), clamped at 0 by a fused ReLU.
        mode: ``"torch"`` or ``"integer"``.
        accumulator_bits: accumulator width.

    Returns:
        int32 array on the output grid (int64 sums for the last layer).
    """
    if layer.out_grid is None:
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
            q = (acc * m0 + ((bias * m0) >> layer.bias_frac_bits) + (np.int64(1) << (shift - 1))) >> shift
    q += q.dtype.type(layer.out_grid.zero_point)
    return _clamp(q, layer)


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


def add(a: np.ndarray, b: np.ndarray, layer: AddLayer, mode: str = "torch") -> np.ndarray:
    """Residual add of two integer tensors on different grids, onto the output grid.

    * ``"torch"``: exactly PyTorch's ``quantized::add`` (and ``add_relu``) on
      the CPU: each input dequantised in float32, ``da = f32(a - a_zp) * f32(a_scale)``
      (likewise ``db``), ``c = da + db`` in float32, then
      ``rint(c * f32(1 / out_scale)) + out_zp`` clamped to the range.  A
      nnlab fake-quantised model computes the same: the sum of two
      fake-quantised tensors, fake-quantised again.
    * ``"integer"``: each difference times the fixed-point multiplier of
      ``scale / out_scale``, both aligned on one shift, summed, rounded half up.

    A fused ReLU (or other clamp) clamps on the output grid (PyTorch's
    ``add_relu`` takes ``max(c, 0)`` before rounding: the same integers).
    """
    (ga, gb), out = layer.in_grids, layer.out_grid
    da, db = a.astype(np.int64) - int(ga.zero_point), b.astype(np.int64) - int(gb.zero_point)
    if mode == "torch":
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


def _step(layer, ins, x, mode, accumulator_bits, saturations, sum_bits):
    """Run one layer on its inputs' integers."""
    if isinstance(layer, InputLayer):
        return quantise_input(x, layer)
    if isinstance(layer, WeightLayer):
        acc = conv2d(ins[0], layer) if layer.op == "conv2d" else linear(ins[0], layer)
        stats = {}
        total, saturations[layer.name] = accumulate_bias(acc, layer, accumulator_bits, stats)
        sum_bits[layer.name] = stats["sum_bits"]
        return requantise(total, acc, layer, mode, accumulator_bits)
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
    and an output is dropped once its last reader has run.

    Args:
        program: from :func:`nnlab.nna.compile_model` or :func:`nnlab.nna.compile_torch_int8`.
        x: float images ``(N, *input shape)`` (NumPy array or torch tensor), finite.
        mode: requantisation ``"torch"`` (PyTorch's float32 rounding) or
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
    outputs, saturations, sum_bits, values = {}, {}, {}, {}
    last_use = program.last_uses()
    for i, layer in enumerate(program.layers):
        q = _step(layer, [values[name] for name in layer.inputs], x, mode, width, saturations, sum_bits)
        values[layer.name] = q
        if trace:
            outputs[layer.name] = channel_first(q)
        for name in layer.inputs:
            if last_use[name] == i:
                values.pop(name, None)
    return Result(output_logits(values[program.output.name], program), outputs, saturations, sum_bits, width)


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
