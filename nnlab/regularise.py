"""Regularise towards zero: penalties that make a network prefer zero weights.

* :func:`l1_penalty`: ``strength * sum |w|`` over the chosen weights.  Its
  gradient ``strength * sign(w)`` pulls every weight towards zero by the same
  step, so weights that the loss does not need end up at (or next to) zero and
  the weight histogram grows a sharp peak there.  A later coring step then
  removes more weights for less accuracy.
* :func:`group_lasso_penalty`: ``strength * sum_g ||w_g||_2`` over whole
  filters (or input channels) ``g``.  It drives entire groups to zero, the
  preparation for structured pruning (:func:`nnlab.prune.core_channels`).

Both return a function ``penalty(model) -> scalar`` for the ``penalty``
argument of :func:`nnlab.train.fit` (and :func:`nnlab.distill.distill`)::

    fit(model, data, epochs=4, penalty=l1_penalty(1e-4))

They act on the weight each layer really uses, so on a pruned layer only the
surviving weights are penalised.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ._args import check_choice, check_float
from .prune import effective_weight, is_pruned, prunable_layers

__all__ = ["l1_penalty", "group_lasso_penalty", "share_near_zero"]


def _current_weight(module: nn.Module) -> torch.Tensor:
    # During training, a pruned layer's ``weight`` is recomputed from weight_orig * weight_mask
    # by the forward pre-hook of the last forward pass, so it carries the gradient path.
    if is_pruned(module):
        return module.weight_orig * module.weight_mask
    return module.weight


def l1_penalty(strength: float, layers: Iterable[str] | None = None) -> Callable[[nn.Module], torch.Tensor]:
    """An L1 penalty ``strength * sum |w|`` on the weights of the chosen layers.

    Args:
        strength: lambda, ``>= 0``; with LeNet-5 (61,470 weights) values around
            ``1e-4`` to ``1e-3`` give a visible peak at zero within a few epochs.
        layers: layer names (default every Conv2d/Linear weight; biases are not penalised).

    Returns:
        ``penalty(model) -> scalar tensor``, for :func:`nnlab.train.fit`.
    """
    strength = check_float("strength", strength, low=0)
    chosen = None if layers is None else list(layers)

    def penalty(model: nn.Module) -> torch.Tensor:
        total = 0.0
        for _, m in prunable_layers(model, chosen):
            total = total + _current_weight(m).abs().sum()
        return strength * total

    penalty.strength = strength
    return penalty


def group_lasso_penalty(strength: float, *, dim: int = 0,
                        layers: Iterable[str] | None = None) -> Callable[[nn.Module], torch.Tensor]:
    """A group-lasso penalty ``strength * sum_g ||w_g||_2`` over whole filters or channels.

    Args:
        strength: lambda, ``>= 0``.
        dim: ``0`` groups by output filter (rows of a Linear), ``1`` by input
            channel (columns), matching :func:`nnlab.prune.core_channels`.
        layers: layer names (default every Conv2d/Linear).

    Returns:
        ``penalty(model) -> scalar tensor``, for :func:`nnlab.train.fit`.
    """
    strength = check_float("strength", strength, low=0)
    check_choice("dim", dim, (0, 1))
    chosen = None if layers is None else list(layers)

    def penalty(model: nn.Module) -> torch.Tensor:
        total = 0.0
        for _, m in prunable_layers(model, chosen):
            w = _current_weight(m)
            other = [d for d in range(w.dim()) if d != dim]
            # A tiny epsilon keeps the gradient finite for a group that is exactly zero.
            total = total + torch.sqrt((w * w).sum(dim=other) + 1e-12).sum()
        return strength * total

    penalty.strength = strength
    return penalty


def share_near_zero(model: nn.Module, tol: float = 1e-3, layers: Iterable[str] | None = None) -> float:
    """Share of the prunable weights with ``|w| < tol`` (exact zeros included), a fraction in ``[0, 1]``.

    Args:
        model: the network.
        tol: magnitude below which a weight counts as near zero, ``> 0``.
        layers: layer names (default every Conv2d/Linear).

    Returns:
        The fraction of near-zero weights.
    """
    tol = check_float("tol", tol, low=0, low_open=True)
    near, n = 0, 0
    for _, m in prunable_layers(model, layers):
        w = effective_weight(m)
        near += int((w.abs() < tol).sum())
        n += w.numel()
    return near / n
