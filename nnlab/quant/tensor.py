"""Quantising tensors: choosing scale and zero point, rounding onto the grid.

Fake quantisation follows PyTorch exactly (it *is* PyTorch's
``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``):
multiply by ``1/scale``, round half to even, add the zero point, clamp to
``[quant_min, quant_max]``, then map back with ``(q - zero_point) * scale``.
Gradients are those of the straight-through estimator: 1 inside the grid's
range, 0 where the value was clamped.

Scale choice (``method``):

* ``"max"``: the grid spans the largest magnitude (symmetric) or
  ``[min, max]`` (asymmetric): no value is clipped;
* ``"percentile"``: the grid spans a percentile of the values (clips rare
  outliers, finer steps for the rest);
* ``"mse"``: the clipping range that minimises the mean squared rounding
  error, searched over a grid of fractions of the max range.

Non-finite values are refused, never rounded: a NaN or an infinity has no
place on a grid (PyTorch's kernels would turn a NaN into the grid's lowest
level, and one infinity would set a scale that zeroes every other value).
Every function here raises a ValueError naming the tensor (``name=``), with
the count of NaN and infinite values, instead.  The check costs one
reduction over the tensor (:func:`check_finite`), a few percent of a
training step; scales and zero points are checked too.
"""

from __future__ import annotations

import math

import torch

from .._args import check_choice, check_float
from .spec import QuantSpec

__all__ = ["SCALE_METHODS", "MIN_SCALE", "check_finite", "check_finite_parameters", "compute_qparams",
           "qparams_from_range", "fake_quantise",
           "quantise", "dequantise", "grid_levels", "value_range"]

SCALE_METHODS = ("max", "percentile", "mse")
#: Smallest scale ever used: an all-zero (fully pruned) or empty tensor gets it instead of 0,
#: so 1/scale stays finite and the tensor quantises to exact zeros without NaN.
MIN_SCALE = float(torch.finfo(torch.float32).eps)
#: Fractions of the max range tried by ``method="mse"``.
MSE_FRACTIONS = torch.linspace(0.3, 1.0, 36)


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError naming ``name`` when the float tensor ``x`` holds a NaN or an infinity.

    One sum over the tensor decides the usual case (a finite sum means
    finite values; a NaN or an infinity makes it non-finite), so the check
    costs about as much as one elementwise pass; only when the sum is not
    finite (which can also be an overflow of finite values) are the values
    counted.

    Args:
        x: the tensor (integer tensors are always finite).
        name: what ``x`` is, for the message (``"the weight of layer 'fc1'"``).

    Raises:
        ValueError: ``x`` holds NaN or infinite values (the message gives their number).
    """
    if not x.is_floating_point():
        return
    x = x.detach()
    if math.isfinite(x.sum().item()):  # also for an empty tensor (sum 0)
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = x.numel() - int(finite.sum()) - nan
    raise ValueError(f"{name}: {nan} NaN and {inf} infinite value(s) among {x.numel()}; only finite values can be "
                     f"quantised: look for a diverged training run (learning rate too high) or damaged inputs")


def check_finite_parameters(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters or buffers (weights, biases, batch-norm statistics, grids) hold NaN or infinity.

    Runs once, where a model is quantised or compiled; the message names
    the layer and the tensor (``"layer 'fc1': its weight: 1 NaN ..."``).

    Raises:
        ValueError: naming the first non-finite tensor.
    """
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b is not None]
    for full, t in tensors:
        path = full.replace(".parametrizations.", ".").replace(".original", "")
        layer, _, what = path.rpartition(".")
        check_finite(t, f"layer {layer!r}: its {what}" if layer else f"the model's {what}")


def _check_scale(scale: torch.Tensor, name: str) -> None:
    if scale.numel() == 0:
        return
    if scale.dim() == 0:  # one number read back costs less than any reduction
        lo = hi = scale.item()
    else:
        lo, hi = (v.item() for v in torch.aminmax(scale))
    if not (0 < lo and hi < math.inf):  # False for NaN too
        raise ValueError(f"the scale of {name} must be positive and finite, got {scale.detach().cpu().tolist()}")


def _check_spec(spec):
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a nnlab.quant.QuantSpec, got {spec!r} ({type(spec).__name__})")


def _per_channel_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as a 2-D tensor (channels, values of that channel)."""
    if spec.ch_axis >= x.dim():
        raise ValueError(f"spec.ch_axis={spec.ch_axis} but the tensor has only {x.dim()} dimension(s)")
    return x.detach().movedim(spec.ch_axis, 0).reshape(x.shape[spec.ch_axis], -1)


def value_range(x: torch.Tensor, spec: QuantSpec, method: str = "max", percentile: float = 99.9, *,
                name: str = "x"):
    """The real range ``(lo, hi)`` a grid should cover for ``x`` (per tensor or per channel).

    Args:
        x: the tensor.
        spec: per-channel specs give one range per channel (along ``spec.ch_axis``).
        method: ``"max"`` (min and max) or ``"percentile"``.  (``"mse"`` is
            handled by :func:`compute_qparams`.)
        percentile: for ``"percentile"``: the upper percentile (the lower one
            is ``100 - percentile``; for symmetric specs the percentile of |x|).
        name: what ``x`` is, for error messages.

    Returns:
        Two float32 tensors ``lo <= 0 <= hi`` (0-dim, or one value per channel).

    Raises:
        ValueError: ``x`` holds NaN or infinite values.
    """
    check_finite(x, name)
    flat = _per_channel_view(x, spec) if spec.per_channel else x.detach().reshape(1, -1)
    flat = flat.float()
    if flat.shape[1] == 0:
        zeros = torch.zeros(flat.shape[0], device=x.device)
        lo, hi = zeros, zeros
    elif method == "max":
        lo, hi = flat.amin(1), flat.amax(1)
    else:
        q = percentile / 100.0
        if spec.symmetric and spec.signed:
            hi = torch.quantile(flat.abs(), q, dim=1)
            lo = -hi
        else:
            lo, hi = torch.quantile(flat, 1.0 - q, dim=1), torch.quantile(flat, q, dim=1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if not spec.per_channel:
        lo, hi = lo[0], hi[0]
    return lo, hi


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale and zero point of a grid that covers ``[lo, hi]``.

    Symmetric specs: zero point 0 and ``scale = max(|lo|, hi) / quant_max``
    (signed) or ``hi / quant_max`` (unsigned), so the largest magnitude is a
    level.  Asymmetric specs: ``scale = (hi - lo) / (quant_max - quant_min)``
    and the zero point that puts real 0 exactly on an integer.  The scale is
    never below :data:`MIN_SCALE`.

    Args:
        lo, hi: float tensors (0-dim or per channel), ``lo <= 0 <= hi``.
        spec: the QuantSpec.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the same shape.

    Raises:
        ValueError: ``lo`` or ``hi`` is NaN or infinite, or the range is too
            wide for a float32 scale.
    """
    _check_spec(spec)
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32, device=lo.device)
    for what, bound in (("lo", lo), ("hi", hi)):
        if not bool(torch.isfinite(bound).all()):
            raise ValueError(f"the range's {what} must be finite, got {bound.detach().cpu().tolist()}: NaN or "
                             f"infinite values were observed")
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if spec.symmetric:
        top = torch.maximum(-lo, hi) if spec.signed else hi
        scale = top / spec.quant_max
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (spec.quant_max - spec.quant_min)
        scale = scale.clamp(min=MIN_SCALE)
        zero_point = (spec.quant_min - torch.round(lo / scale)).clamp(spec.quant_min, spec.quant_max)
        zero_point = zero_point.to(torch.int32)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"the range [{lo.min().item():g}, {hi.max().item():g}] is too wide for a float32 scale")
    scale = scale.clamp(min=MIN_SCALE)
    return scale, zero_point


def compute_qparams(x: torch.Tensor, spec: QuantSpec, method: str = "max", percentile: float = 99.9, *,
                    name: str = "x"):
    """Choose scale and zero point for ``x`` (per tensor or per channel, as ``spec`` says).

    Args:
        x: the tensor to quantise (weights, or a batch of activations).
        spec: the QuantSpec.
        method: ``"max"``, ``"percentile"`` or ``"mse"`` (see the module docstring).
        percentile: for ``"percentile"``, in (50, 100].
        name: what ``x`` is, for error messages.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors, 0-dim per tensor
        or one entry per channel.

    Raises:
        ValueError: unknown method, percentile out of range, or ``x``
            holding NaN or infinite values.
    """
    _check_spec(spec)
    check_choice("method", method, SCALE_METHODS)
    check_float("percentile", percentile, 50.0, 100.0, low_open=True)
    if method != "mse":
        return qparams_from_range(*value_range(x, spec, method, percentile, name=name), spec)
    lo, hi = value_range(x, spec, "max", name=name)
    x = x.detach().float()
    best_err, best = None, None
    for frac in MSE_FRACTIONS.tolist():
        scale, zp = qparams_from_range(lo * frac, hi * frac, spec)
        err = (fake_quantise(x, spec, scale, zp, name=name) - x).pow(2)
        err = _per_channel_view(err, spec).mean(1) if spec.per_channel else err.mean()
        if best_err is None:
            best_err, best = err, (scale, zp)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
    return best


def _as_qparams(x, spec, scale, zero_point, name="x", check_scale=True):
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device).to(torch.int32)
    if spec.per_channel:
        n = x.shape[spec.ch_axis]
        if scale.dim() == 0:
            scale = scale.expand(n).contiguous()
        if zero_point.dim() == 0:
            zero_point = zero_point.expand(n).contiguous()
        if scale.shape != (n,) or zero_point.shape != (n,):
            raise ValueError(f"per-channel scale and zero_point need {n} entries (axis {spec.ch_axis}), "
                             f"got {tuple(scale.shape)} and {tuple(zero_point.shape)}")
    else:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(f"per-tensor scale and zero_point must be single numbers, "
                             f"got shapes {tuple(scale.shape)} and {tuple(zero_point.shape)}")
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    if check_scale:
        _check_scale(scale, name)
    return scale, zero_point


def fake_quantise(x: torch.Tensor, spec: QuantSpec, scale, zero_point, *, name: str = "x") -> torch.Tensor:
    """Round ``x`` onto the grid and map it back to real values (differentiable, straight-through).

    This calls ``torch.fake_quantize_per_tensor_affine`` or
    ``torch.fake_quantize_per_channel_affine`` with the spec's
    ``quant_min``/``quant_max``, so the result is bit-for-bit PyTorch's.

    Args:
        x: float tensor.
        spec: the QuantSpec.
        scale: float (tensor); one per channel for per-channel specs.
        zero_point: integer (tensor), same shape as ``scale``.
        name: what ``x`` is, for error messages.

    Returns:
        A float tensor like ``x`` whose values lie on the grid.

    Raises:
        ValueError: ``x`` holds NaN or infinite values, or a scale is not
            positive and finite; shapes that do not fit the spec.
    """
    _check_spec(spec)
    return _fake_quantise(x, spec, scale, zero_point, name)


def _fake_quantise(x, spec, scale, zero_point, name, check_scale=True):
    """:func:`fake_quantise` for the quantiser modules, which vouch for their own scales (``check_scale=False``)."""
    check_finite(x, name)
    scale, zero_point = _as_qparams(x, spec, scale, zero_point, name, check_scale)
    if spec.per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, spec.ch_axis,
                                                      spec.quant_min, spec.quant_max)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, spec.quant_min, spec.quant_max)


def _broadcast(t, x, spec):
    if not spec.per_channel:
        return t
    shape = [1] * x.dim()
    shape[spec.ch_axis] = -1
    return t.view(shape)


def quantise(x: torch.Tensor, spec: QuantSpec, scale, zero_point, *, name: str = "x") -> torch.Tensor:
    """The integers of ``x`` on the grid: ``clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)``.

    This is what the accelerator stores.  ``dequantise(quantise(x))`` equals
    :func:`fake_quantise` exactly.

    Args:
        x: float tensor.
        spec, scale, zero_point, name: as for :func:`fake_quantise`.

    Returns:
        An int32 tensor like ``x``, values in ``[spec.quant_min, spec.quant_max]``.

    Raises:
        ValueError: as :func:`fake_quantise`.
    """
    _check_spec(spec)
    check_finite(x, name)
    scale, zero_point = _as_qparams(x, spec, scale, zero_point, name)
    inv_scale = _broadcast(1.0 / scale, x, spec)  # float32, as PyTorch's kernels compute it
    q = torch.round(x.detach().float() * inv_scale) + _broadcast(zero_point, x, spec).float()
    return q.clamp(spec.quant_min, spec.quant_max).to(torch.int32)


def dequantise(q: torch.Tensor, spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """Real values of grid integers: ``(q - zero_point) * scale``.

    Args:
        q: integer tensor from :func:`quantise`.
        spec, scale, zero_point: as for :func:`fake_quantise`.

    Returns:
        A float32 tensor like ``q``.
    """
    _check_spec(spec)
    scale, zero_point = _as_qparams(q, spec, scale, zero_point, "the grid")
    return (q.to(torch.int32) - _broadcast(zero_point, q, spec)).float() * _broadcast(scale, q, spec)


def grid_levels(spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """All real values the grid can represent, ascending.

    Args:
        spec, scale, zero_point: a 0-dim scale gives one row of levels; a
            per-channel scale gives one row per channel.

    Returns:
        Float tensor ``(levels,)`` or ``(channels, levels)``.
    """
    _check_spec(spec)
    q = torch.arange(spec.quant_min, spec.quant_max + 1, dtype=torch.int32)
    scale = torch.as_tensor(scale, dtype=torch.float32).cpu()
    zero_point = torch.as_tensor(zero_point).to(torch.int32).cpu()
    if scale.dim() == 0:
        return (q - zero_point).float() * scale
    return (q[None, :] - zero_point[:, None]).float() * scale[:, None]
