"""Retraining for low bit-depths: straight-through QAT and the random-subset method.

Both start from a quantised model (:func:`nnlab.quant.quantise_model`) and
train it with :func:`nnlab.train.fit`; the weight grids follow the weights as
they move, and activation grids keep their calibrated ranges.

* ``method="ste"``: standard quantisation-aware training.  Every weight is
  fake-quantised in every forward pass; the gradient goes "straight through"
  the rounding to the float weight underneath.
* ``method="random_subset"``: only a random subset of the weights is
  quantised during training while the rest stays float and adapts around
  them.  The quantised fraction grows on a *schedule* until it reaches 1; at
  the end every weight is clamped to its nearest level (:func:`freeze`).

  - ``schedule``: how the fraction grows with training progress p (0 at the
    first step, 1 at the last): ``"linear"`` rises from ``start`` to 1 at
    ``p = full_at``; ``"steps"`` halves the float share in ``stages`` equal
    stages before ``full_at`` (``start``, then e.g. 0.5, 0.75, 0.875 ... for
    ``start=0.5``, as in incremental network quantisation); ``"constant"``
    keeps ``start`` until ``full_at``; or any function ``p -> fraction``.
  - ``redraw``: True draws a new random subset at every step (each weight is
    quantised in a growing share of the steps, like noise); False fixes one
    random order of the weights, so the subset only grows and a weight once
    quantised stays quantised.

In both methods, weights inside the quantised subset receive the
straight-through gradient.

Scales (``scales``):

* ``"follow"``: each weight scale follows its weights (``max|w| / quant_max``,
  times the clipping ratio found by the scale method); activation scales keep
  their calibrated values.  The scales get no gradient.
* ``"learned"``: every scale is an ``nn.Parameter`` trained with the weights
  (LSQ, :mod:`nnlab.quant.lsq`): weight steps start at ``2 * mean|w| /
  sqrt(quant_max)``, activation steps at their calibrated values.  At 2 bits
  this lets training choose a finer step than ``max|w|`` gives, with the largest
  weights clipped.  :func:`freeze` keeps the learned grids.
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .._args import check_choice, check_float, check_int, check_positive_int
from .._deprecated import renamed
from ..base import warn_moved
from ..distributed import is_distributed, shared_generator
from ..train import Callback, fit
from .model import act_quantisers, freeze, quantiser_input, weight_layers, weight_quantiser

__all__ = ["METHODS", "SUBSET_SCHEDULES", "SCALE_MODES", "RandomSubset", "retrain", "pretrained_quantised"]

METHODS = ("ste", "random_subset")
#: How :class:`RandomSubset` grows the quantised share of the weights (the learning-rate schedules are
#: :data:`nnlab.train.SCHEDULES`).
SUBSET_SCHEDULES = ("linear", "steps", "constant")
#: Deprecated names (old -> new), served with a DeprecationWarning until the next release.
RENAMED = {"SCHEDULES": "SUBSET_SCHEDULES"}
__getattr__ = renamed(__name__, RENAMED, globals())
#: How scales behave while retraining: follow the weights (no gradient), or learned (LSQ).
SCALE_MODES = ("follow", "learned")


def _quantisers(model):
    qs = [weight_quantiser(layer) for layer in weight_layers(model).values()]
    return [q for q in qs if q is not None]


class RandomSubset(Callback):
    """A :func:`nnlab.train.fit` callback that grows the randomly chosen quantised subset of the weights.

    Before each step it sets every WeightQuantiser's ``fraction`` from the
    schedule (and draws a new subset when ``redraw`` is True).

    Args:
        schedule: ``"linear"``, ``"steps"``, ``"constant"`` or a function
            ``progress -> fraction`` (both in [0, 1]).
        start: quantised fraction at the first step, in [0, 1].
        full_at: training progress (0..1) from which every weight is quantised.
        stages: number of stages of the ``"steps"`` schedule.
        redraw: draw a new random subset every step (True) or grow one fixed
            random order (False).
        seed: None (default): in a single process, draw from torch's global
            generator (which :func:`nnlab.train.fit` seeds); under
            ``torch.distributed``, from a generator of the subsets' own whose
            seed rank 0 draws from its global generator and sends to every
            rank.  An integer: always a generator of their own with this
            seed (:func:`nnlab.distributed.shared_generator`).  Either way
            every rank quantises the same subset, never one drawn from its
            own random state (which augmentation and dropout use differently
            on each rank).

    Attributes:
        history: the fraction used at each step (for plots).
    """

    def __init__(self, schedule: str | Callable = "linear", start: float = 0.25, full_at: float = 0.75,
                 stages: int = 3, redraw: bool = True, seed: int | None = None):
        if not callable(schedule):
            check_choice("schedule", schedule, SUBSET_SCHEDULES)
        self.schedule = schedule
        self.start = check_float("start", start, 0.0, 1.0)
        self.full_at = check_float("full_at", full_at, 0.0, 1.0)
        self.stages = check_positive_int("stages", stages)
        if not isinstance(redraw, bool):
            raise TypeError(f"redraw must be True or False, got {redraw!r}")
        self.redraw = redraw
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.history = []
        self._generators = {}

    def generator(self, device) -> torch.Generator | None:
        """The subsets' random generator on ``device`` (made on first use), or None for torch's global one."""
        if self.seed is None and not is_distributed():
            return None
        key = str(torch.device(device))
        if key not in self._generators:
            self._generators[key] = shared_generator(self.seed, device)
        return self._generators[key]

    def fraction(self, progress: float) -> float:
        """The quantised fraction at training progress ``progress`` (0 = first step, 1 = end).

        Args:
            progress: in [0, 1].

        Returns:
            A fraction in [0, 1].
        """
        if callable(self.schedule):
            return check_float("schedule(progress)", float(self.schedule(progress)), 0.0, 1.0)
        if progress >= self.full_at:
            return 1.0
        ramp = progress / self.full_at
        if self.schedule == "linear":
            return self.start + (1.0 - self.start) * ramp
        if self.schedule == "steps":
            return 1.0 - (1.0 - self.start) * 0.5 ** math.floor(ramp * self.stages)
        return self.start

    def on_step_start(self, step, total_steps, model):
        frac = self.fraction(step / max(1, total_steps))
        self.history.append(frac)
        for q in _quantisers(model):
            q.set_subset(frac, redraw=self.redraw, generator=self.generator(q.scale.device))


def retrain(
    model: nn.Module,
    data,
    epochs: int = 3,
    *,
    method: str = "random_subset",
    scales: str = "follow",
    schedule: str | Callable = "linear",
    start: float = 0.25,
    full_at: float = 0.75,
    stages: int = 3,
    redraw: bool = True,
    lr: float = 0.01,
    callbacks=(),
    **fit_options,
) -> pd.DataFrame:
    """Retrain a quantised model so that it recovers accuracy at low bit-depth; then freeze its weights.

    Args:
        model: a quantised model (from :func:`nnlab.quant.quantise_model`),
            trained in place.
        data: DataBundle or training loader.
        epochs: passes over the training data.
        method: ``"ste"`` (every weight quantised, straight-through) or
            ``"random_subset"`` (a growing random subset; see the module docstring).
        scales: ``"follow"`` (weight scales follow max |w|, activation scales
            stay as calibrated) or ``"learned"`` (every scale is trained, LSQ;
            see the module docstring).
        schedule, start, full_at, stages, redraw: the random-subset schedule
            (see :class:`RandomSubset`); ignored for ``"ste"``.
        lr: peak learning rate (small: the weights start trained).
        callbacks: more :func:`nnlab.train.fit` callbacks.
        **fit_options: passed to :func:`nnlab.train.fit` (``device``,
            ``seed``, ``eval_data``, ``progress`` ...).

    Returns:
        The training history from :func:`nnlab.train.fit`; its ``attrs["subset"]``
        holds the RandomSubset callback (its ``history`` of fractions) for
        the random-subset method.

    Raises:
        ValueError: unknown method or scales, or a model without weight quantisers.
    """
    check_choice("method", method, METHODS)
    check_choice("scales", scales, SCALE_MODES)
    quantisers = _quantisers(model)
    if not quantisers:
        raise ValueError("model has no WeightQuantiser; quantise it first with nnlab.quant.quantise_model")
    subset = None
    if method == "random_subset":
        subset = RandomSubset(schedule, start=start, full_at=full_at, stages=stages, redraw=redraw)
        callbacks = (subset, *callbacks)
    for a in act_quantisers(model).values():
        if a.calibrating:
            raise ValueError("calibrate the activation quantisers before retraining (nnlab.quant.calibrate)")
    for layer in weight_layers(model).values():
        q = weight_quantiser(layer)
        if q is None:
            continue
        q.track = scales == "follow"
        q.set_subset(None)
        if scales == "learned" and not q.learning:
            q.learn_scale(quantiser_input(layer), init="lsq")
    if scales == "learned":
        for a in act_quantisers(model).values():
            if not a.learning:
                a.learn_scale()
    try:
        history = fit(model, data, epochs, lr=lr, callbacks=callbacks,
                      desc=fit_options.pop("desc", f"retrain {method}"), **fit_options)
    finally:
        freeze(model)
    history.attrs["subset"] = subset
    return history


#: Version of the quantised models' structure (placement and names of quantisers) in cached files.
STRUCTURE_VERSION = 2


def pretrained_quantised(*args, **kwargs):
    """Deprecated alias of :func:`nnlab.recipes.pretrained_quantised` (same arguments, same result)."""
    from ..recipes import pretrained_quantised as recipe  # lazy: a deprecated alias; the recipe sits above this technique

    warn_moved("nnlab.quant.pretrained_quantised", "nnlab.recipes.pretrained_quantised")
    return recipe(*args, **kwargs)
