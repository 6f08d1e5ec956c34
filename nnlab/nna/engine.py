"""The engine: integer-only inference of a compiled :class:`~nnlab.nna.program.Program` in NumPy.

One short function per operation.  Tensors are integer arrays kept
channel-major, ``(C, N, H, W)`` for feature maps and ``(F, N)`` for vectors,
the layout of a GEMM-based accelerator: every layer computes
``acc = W @ columns`` with one row of ``W`` per output channel, and the
result is again channel-major.  :func:`run` hands outputs back in
PyTorch's ``(N, C, H, W)`` order.

A weight layer does three things:

1. **accumulate** exactly: ``acc = sum((q_in - in_zero_point) * weight)``.
   im2col turns a convolution into one matrix product, computed by BLAS in
   floating point on integer-valued arrays: exact as long as every partial
   sum stays below 2**24 (float32) or 2**53 (float64); :func:`exact_dtype`
   picks the cheaper one that is exact for the layer's worst case.
2. **add the bias** (int32) and check the accumulator width: sums outside
   ``accumulator_bits`` are counted and saturated, as hardware would.
3. **requantise** to the next layer's grid, in one of two modes:

   * ``"torch"``: float32 arithmetic rounded half to even, exactly as
     PyTorch's quantized CPU kernels do it (fbgemm:
     ``rint(float(acc + bias) * (in_scale * weight_scale / out_scale))``;
     the oneDNN variant for convolutions on AVX512-VNNI CPUs multiplies by
     each scale in turn; see :func:`requantise_torch`);
   * ``"integer"``: integers only, as an accelerator does it: the multiplier
     ``M = in_scale * weight_scale / out_scale`` becomes ``m0 * 2**-shift``
     with an integer ``m0``, and ``q = (acc * m0 + 2**(shift-1)) >> shift``
     (round half up), see :func:`fixed_point_multiplier`.

   Then add the output zero point and clamp to the output range (the fused
   ReLU clamps below at the zero point, i.e. at real 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .._args import check_choice, check_int
from .program import AddLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer

__all__ = ["MODES", "Result", "run", "predict", "quantise_input", "im2col", "conv2d", "linear", "accumulate_bias",
           "requantise", "requantise_torch", "requantise_integer", "fixed_point_multiplier", "maxpool2d",
           "avgpool2d", "flatten", "add", "exact_dtype", "output_logits", "channel_first"]

MODES = ("torch", "integer")
f32 = np.float32


@dataclass
class Result:
    """What :func:`run` returns.

    Attributes:
        logits: float64 ``(N, classes)``: the last layer's integers mapped back to real values.
        outputs: layer name -> integer output (channel-first), when ``trace=True``.
        saturations: layer name -> number of sums that overflowed the accumulator.
    """

    logits: np.ndarray
    outputs: dict = field(default_factory=dict)
    saturations: dict = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        """Top-1 class of each image."""
        return self.logits.argmax(axis=1)


# ----------------------------------------------------------------------------- input
def quantise_input(x: np.ndarray, layer: InputLayer) -> np.ndarray:
    """Real images to integers: ``clamp(rint(x * float32(1 / scale)) + zero_point, qmin, qmax)``.

    The one floating-point step of the pipeline, done as PyTorch does it
    (float32, round half to even); on a device the camera delivers integers.

    Args:
        x: float array ``(N, *layer.shape)``.
        layer: the program's :class:`InputLayer`.

    Returns:
        int32 array, channel-major: ``(C, N, H, W)`` or ``(features, N)``.
    """
    inv_scale = f32(1.0) / f32(layer.scale)
    q = np.rint(x.astype(f32) * inv_scale) + f32(layer.zero_point)
    q = np.clip(q, layer.qmin, layer.qmax).astype(np.int32)
    return np.ascontiguousarray(q.swapaxes(0, 1))


# ----------------------------------------------------------------------------- weight layers
def exact_dtype(layer: WeightLayer) -> type:
    """float32 if every partial sum of the layer stays below 2**24 in magnitude, else float64 (below 2**53).

    The worst case is ``fan_in * (2**in_bits - 1) * max|weight|``; below
    those bounds every integer, and so every sum, is exact in that format.
    """
    worst = layer.fan_in * ((1 << layer.in_bits) - 1) * int(np.abs(layer.weight).max(initial=0))
    if worst < 2 ** 24:
        return np.float32
    if worst < 2 ** 53:
        return np.float64
    raise ValueError(f"layer {layer.name!r}: sums may reach {worst}, beyond what float64 holds exactly (2**53)")


def im2col(x: np.ndarray, kh: int, kw: int, stride) -> np.ndarray:
    """``(C, N, H, W)`` to the matrix ``(C*kh*kw, N*Ho*Wo)``: one column per output pixel, its receptive field.

    One slice copy per kernel offset ``(i, j)`` (``kh * kw`` of them, never
    one per pixel or channel).
    """
    c, n, h, w = x.shape
    (sh, sw) = stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    cols = np.empty((c, kh, kw, n, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = x[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
    return cols.reshape(c * kh * kw, n * ho * wo)


def conv2d(q: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Exact integer convolution sums (no bias): ``(C, N, H, W)`` ints to ``(out, N, Ho, Wo)`` int64.

    ``acc = W @ im2col(q - in_zero_point)`` with ``W`` the ``(out, C*kh*kw)``
    weight matrix.  The input is shifted by its zero point first, so zero
    padding pads with real zero, as PyTorch pads a quantized tensor.
    """
    dtype = exact_dtype(layer)
    (ph, pw), (c, n, h, w) = layer.padding, q.shape
    x = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype)  # padding: real zero
    np.subtract(q, layer.in_zero_point, out=x[:, :, ph: ph + h, pw: pw + w], casting="unsafe")
    kh, kw = layer.weight.shape[2:]
    n, h, w = x.shape[1:]
    ho, wo = (h - kh) // layer.stride[0] + 1, (w - kw) // layer.stride[1] + 1
    weights = layer.weight.reshape(layer.out_channels, -1).astype(dtype)
    acc = weights @ im2col(x, kh, kw, layer.stride)
    return acc.astype(np.int64).reshape(layer.out_channels, n, ho, wo)


def linear(q: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Exact integer sums (no bias): ``(in, N)`` ints to ``(out, N)`` int64, ``acc = W @ (q - in_zero_point)``."""
    dtype = exact_dtype(layer)
    x = q.astype(dtype) - dtype(layer.in_zero_point)
    return (layer.weight.astype(dtype) @ x).astype(np.int64)


def _per_channel(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Per-channel values shaped to broadcast along the first (channel) axis of ``like``."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def accumulate_bias(acc: np.ndarray, layer: WeightLayer, accumulator_bits: int):
    """Add the int32 bias and saturate to the accumulator width.

    Args:
        acc: exact int64 sums, channel on the first axis.
        layer: the weight layer.
        accumulator_bits: accumulator width.

    Returns:
        ``(total, saturated)``: int64 sums clipped to
        ``[-2**(b-1), 2**(b-1) - 1]`` and how many were clipped (``acc``
        is clipped too, in place).
    """
    lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
    total = acc + _per_channel(layer.bias.astype(np.int64), acc)
    if total.size == 0 or lo <= total.min() and total.max() <= hi:  # the usual case, checked cheaply
        return total, 0
    saturated = int(np.count_nonzero((total < lo) | (total > hi)))
    np.clip(acc, lo, hi, out=acc)
    return np.clip(total, lo, hi), saturated


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
        multiplier: float64 ``(channels,)`` real multipliers.
        accumulator_bits: so that ``total * m0`` fits in int64.

    Returns:
        int64 array, not yet offset by the zero point.
    """
    m0, shift = fixed_point_multiplier(multiplier, frac_bits=min(31, 62 - accumulator_bits))
    m0, shift = _per_channel(m0, total), _per_channel(shift, total)
    return (total * m0 + (np.int64(1) << (shift - 1))) >> shift


def requantise_torch(total: np.ndarray, acc: np.ndarray, layer: WeightLayer, out_scale: float) -> np.ndarray:
    """PyTorch's float32 requantisation (round half to even), before the zero point is added.

    * ``"fbgemm"``: ``atw = f32(in_scale) * f32(weight_scale)``,
      ``mult = atw / f32(out_scale)``, and
      ``rint((f32(acc) + f32(bias_float) / atw) * mult)`` (float bias, as
      PyTorch's quantized Linear/Conv pass it) or ``rint(f32(acc + bias) * mult)``.
    * ``"onednn"``: ``v = f32(acc) * (1 / f32(1 / in_scale)) * f32(weight_scale) + f32(bias_float)``,
      ReLU, then ``rint(v * f32(1 / out_scale))``.

    Args:
        total: int64 sums with the int32 bias added.
        acc: int64 sums without bias (used when ``layer.bias_float`` is set).
        layer: the weight layer.
        out_scale: the output scale.

    Returns:
        float32 array of rounded values, not yet offset by the zero point.
    """
    ws = _per_channel(layer.weight_scale.astype(f32), acc)
    if layer.kernel == "onednn":
        src = f32(1.0) / f32(1.0 / layer.in_scale)
        v = acc.astype(f32)
        v *= src
        v *= ws
        if layer.bias_float is not None:
            v += _per_channel(layer.bias_float.astype(f32), acc)
        if layer.relu:
            np.maximum(v, f32(0), out=v)
        v *= f32(1.0 / out_scale)
        return np.rint(v, out=v)
    atw = f32(layer.in_scale) * ws
    mult = atw / f32(out_scale)
    if layer.bias_float is not None:
        v = acc.astype(f32)
        v += _per_channel(layer.bias_float.astype(f32), acc) / atw
    else:
        v = total.astype(f32)
    v *= mult
    return np.rint(v, out=v)


def requantise(total: np.ndarray, acc: np.ndarray, layer: WeightLayer, mode: str, accumulator_bits: int):
    """Map a weight layer's sums onto its output grid: requantise, add the zero point, clamp (fused ReLU).

    Args:
        total: int64 sums with bias (channel first); acc: the same without bias.
        layer: the weight layer; ``out_scale`` None returns ``total`` (the logits' integers).
        mode: ``"torch"`` or ``"integer"``.
        accumulator_bits: accumulator width.

    Returns:
        int32 array on the output grid (int64 sums for the last layer).
    """
    if layer.out_scale is None:
        return np.maximum(total, 0) if layer.relu else total
    if mode == "torch":
        q = requantise_torch(total, acc, layer, layer.out_scale)
    else:
        multiplier = layer.in_scale * layer.weight_scale.astype(np.float64) / layer.out_scale
        q = requantise_integer(total, multiplier, accumulator_bits)
    q += q.dtype.type(layer.out_zero_point)
    low = max(layer.out_min, layer.out_zero_point) if layer.relu else layer.out_min
    return np.clip(q, low, layer.out_max, out=q).astype(np.int32)


# ----------------------------------------------------------------------------- other layers
def maxpool2d(q: np.ndarray, layer: PoolLayer) -> np.ndarray:
    """Max pooling of ``(C, N, H, W)`` integers (the grid is unchanged)."""
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


def avgpool2d(q: np.ndarray, layer: PoolLayer) -> np.ndarray:
    """Average pooling of ``(C, N, H, W)``: ``rint(sum(q - zp) / count) + zp`` (padding counts as real zero)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    x = q.astype(np.int64) - layer.zero_point
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    sums = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].sum(axis=(-2, -1))
    return (np.rint(sums / (kh * kw)) + layer.zero_point).astype(q.dtype)


def flatten(q: np.ndarray, layer: FlattenLayer) -> np.ndarray:
    """``(C, N, H, W)`` to ``(C*H*W, N)``, features in PyTorch's order (channel, row, column)."""
    if q.ndim == 2:
        return q
    return q.transpose(0, 2, 3, 1).reshape(-1, q.shape[1])


def add(a: np.ndarray, b: np.ndarray, layer: AddLayer, mode: str) -> np.ndarray:
    """Residual add of two integer tensors on different grids, onto the output grid."""
    da, db = a.astype(np.int64) - layer.a_zero_point, b.astype(np.int64) - layer.b_zero_point
    if mode == "torch":
        v = np.rint(da.astype(f32) * f32(layer.a_scale / layer.out_scale)
                    + db.astype(f32) * f32(layer.b_scale / layer.out_scale))
    else:
        ma, sa = fixed_point_multiplier(np.array([layer.a_scale / layer.out_scale]), 30)
        mb, sb = fixed_point_multiplier(np.array([layer.b_scale / layer.out_scale]), 30)
        s = int(max(sa[0], sb[0]))  # a common shift: align both products
        v = (da * (ma[0] << (s - sa[0])) + db * (mb[0] << (s - sb[0])) + (1 << (s - 1))) >> s
    low = max(layer.out_min, layer.out_zero_point) if layer.relu else layer.out_min
    return np.clip(v + layer.out_zero_point, low, layer.out_max).astype(np.int32)


# ----------------------------------------------------------------------------- the program
def output_logits(out: np.ndarray, layer) -> np.ndarray:
    """Real values of the last layer's integers ``(classes, N)``, as float64 ``(N, classes)``."""
    if isinstance(layer, WeightLayer) and layer.out_scale is None:
        scale = np.float64(layer.in_scale) * layer.weight_scale.astype(np.float64)
        return (out.astype(np.float64) * _per_channel(scale, out)).T
    scale = layer.out_scale if hasattr(layer, "out_scale") else 1.0
    zp = layer.out_zero_point if hasattr(layer, "out_zero_point") else 0
    return ((out.astype(np.float64) - zp) * scale).T


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
    return x


def run(program: Program, x, mode: str = "torch", *, accumulator_bits: int = 32, trace: bool = False) -> Result:
    """Run a compiled program on a batch of images, in integer arithmetic.

    Args:
        program: from :func:`nnlab.nna.compile_model` or :func:`nnlab.nna.compile_torch_int8`.
        x: float images ``(N, *input shape)`` (NumPy array or torch tensor).
        mode: requantisation ``"torch"`` (PyTorch's float32 rounding) or
            ``"integer"`` (fixed-point multiplier and shift).
        accumulator_bits: accumulator width; overflowing sums saturate and are counted.
        trace: keep every layer's integer output in ``Result.outputs``.

    Returns:
        A :class:`Result`.

    Raises:
        TypeError, ValueError: wrong input type, dtype or shape, or unknown mode.
    """
    check_choice("mode", mode, MODES)
    check_int("accumulator_bits", accumulator_bits, minimum=8, maximum=48)
    x = _check_input(program, x)
    outputs, saturations, history = {}, {}, []
    q = None
    for layer in program.layers:
        if isinstance(layer, InputLayer):
            q = quantise_input(x, layer)
        elif isinstance(layer, WeightLayer):
            acc = conv2d(q, layer) if layer.op == "conv2d" else linear(q, layer)
            total, saturations[layer.name] = accumulate_bias(acc, layer, accumulator_bits)
            q = requantise(total, acc, layer, mode, accumulator_bits)
        elif isinstance(layer, PoolLayer):
            q = maxpool2d(q, layer) if layer.op == "maxpool2d" else avgpool2d(q, layer)
        elif isinstance(layer, FlattenLayer):
            q = flatten(q, layer)
        elif isinstance(layer, AddLayer):
            q = add(q, history[layer.other], layer, mode)
        else:
            raise TypeError(f"layer {getattr(layer, 'name', '?')!r}: unknown layer type {type(layer).__name__}")
        history.append(q)
        if trace:
            outputs[layer.name] = channel_first(q)
    return Result(output_logits(q, program.layers[-1]), outputs, saturations)


def predict(program: Program, x, mode: str = "torch") -> np.ndarray:
    """Top-1 class of each image (int64 array)."""
    return run(program, x, mode).predictions
