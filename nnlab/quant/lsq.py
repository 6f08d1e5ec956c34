"""Learned quantisation steps (LSQ, Esser et al. 2020): the scale is trained with the weights.

With a fixed or max-based grid, the quantisation step ``scale`` gets no
gradient: training moves the weights, but never asks whether a finer step
(with the largest weights clipped) would serve the network better.  At
2 bits this matters most: a signed 2-bit grid has the three levels
``-scale, 0, +scale``, and ``max|w|`` puts ``+scale`` so far out that most
weights round to 0.

LSQ makes ``scale`` an ``nn.Parameter`` and gives it the gradient of the
fake-quantised value ``x_hat = (clamp(round(x / s) + z, q_min, q_max) - z) * s``:

* inside the grid's range, ``d x_hat / d s = round(x / s) - x / s`` (the
  rounding error, in steps);
* clipped below (above), ``d x_hat / d s = q_min - z`` (``q_max - z``): a
  clipped value pulls the step outwards.

The input ``x`` gets the straight-through gradient (1 inside the range, 0 where
clipped), as in plain quantisation-aware training.  The step's gradient is
multiplied by ``g = 1 / sqrt(N * q_max)`` (``N``: the values sharing that
scale: the weights of the tensor or channel, or one sample's activations), so
that the step learns at a rate comparable to the weights.  The step starts at
``2 * mean|w| / sqrt(q_max)`` (:func:`lsq_init`).

The forward pass is PyTorch's own fake quantisation with the current scale
(:func:`fake_quantise_learned` runs PyTorch's fused LSQ kernel), so the learned grid is an ordinary :class:`~nnlab.quant.Grid`: the NNA
compiler and simulator read exactly the scale that was learned.

:meth:`nnlab.quant.WeightQuantiser.learn_scale` and
:meth:`nnlab.quant.ActQuantiser.learn_scale` switch a quantiser to a learned
step; :func:`nnlab.quant.retrain` does it for every quantiser with
``scales="learned"``.
"""

from __future__ import annotations

import math

import torch

from .spec import QuantSpec
from .tensor import MIN_SCALE, check_finite

__all__ = ["fake_quantise_learned", "lsq_init", "lsq_grad_factor"]


def fake_quantise_learned(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                          grad_factor: float, *, name: str = "x") -> torch.Tensor:
    """Fake-quantise ``x`` and let the gradient reach ``scale`` as well (LSQ).

    The values are exactly :func:`nnlab.quant.fake_quantise`'s; only the
    backward pass differs: ``scale`` receives the LSQ gradient times
    ``grad_factor`` (see the module docstring).  It runs PyTorch's fused LSQ
    kernels (``torch._fake_quantize_learnable_per_tensor_affine`` and
    ``..._per_channel_affine``), whose forward pass is the same fake
    quantisation kernel and whose backward pass computes both gradients in one
    sweep; the zero point is passed without gradient and stays fixed.

    Args:
        x: float tensor.
        spec: the QuantSpec.
        scale: float32 tensor, positive (0-dim, or one per channel), usually an
            ``nn.Parameter``.
        zero_point: integer tensor shaped like ``scale`` (not learned).
        grad_factor: multiplies the step's gradient, e.g. :func:`lsq_grad_factor`.
        name: what ``x`` is, for error messages.

    Returns:
        A float tensor like ``x`` whose values lie on the grid.

    Raises:
        ValueError: ``x`` holds NaN or infinite values.
    """
    check_finite(x, name)
    zp = zero_point.detach().to(torch.float32)
    if spec.per_channel:
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zp, spec.ch_axis, spec.quant_min, spec.quant_max, float(grad_factor))
    out = torch._fake_quantize_learnable_per_tensor_affine(
        x, scale.reshape(1), zp.reshape(1), spec.quant_min, spec.quant_max, float(grad_factor))
    return out


def lsq_grad_factor(values: int, spec: QuantSpec) -> float:
    """LSQ's gradient factor ``1 / sqrt(values * quant_max)`` for a step shared by ``values`` numbers."""
    return 1.0 / math.sqrt(max(1, values) * max(1, spec.quant_max))


@torch.no_grad()
def lsq_init(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """LSQ's first step for the weight ``w``: ``2 * mean|w| / sqrt(quant_max)``, per tensor or per channel.

    The mean is over the non-zero weights, so that a pruned tensor (whose
    zeros stay zero on any grid) gets the step its surviving weights need.

    Args:
        w: the weight.
        spec: the weight's QuantSpec (per channel: one step per channel along ``spec.ch_axis``).

    Returns:
        A float32 tensor (0-dim, or one entry per channel), at least :data:`~nnlab.quant.MIN_SCALE`.
    """
    a = w.detach().abs().float()
    if spec.per_channel:
        a = a.movedim(spec.ch_axis, 0).reshape(a.shape[spec.ch_axis], -1)
    else:
        a = a.reshape(1, -1)
    nonzero = (a != 0).sum(1).clamp(min=1)
    mean = a.sum(1) / nonzero
    step = (2.0 * mean / math.sqrt(max(1, spec.quant_max))).clamp(min=MIN_SCALE)
    return step if spec.per_channel else step[0]
