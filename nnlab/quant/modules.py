"""The modules a quantised network is made of.

* :class:`WeightQuantiser`: a ``torch.nn.utils.parametrize`` parametrization
  on a layer's ``weight``: the layer computes with ``fake_quantise(weight)``.
  It also carries the state of random-subset retraining.
* :class:`FixedMask`: the parametrization a torch pruning mask becomes, so the
  chain is ``weight = quantise(mask * original)`` and pruned zeros stay zero.
* :class:`ActQuantiser`: a module placed in the network (after the input and
  after each ReLU) that first observes activations (calibration), then
  fake-quantises them.

Each quantiser carries a ``label`` (``"the weight of layer 'fc1'"``,
``"the activations at 'relu3_quant'"``) that names it in errors: a NaN or an
infinity met while calibrating, observing a weight or fake-quantising is
refused with that name (see :mod:`nnlab.quant.tensor`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._args import check_choice, check_float
from .._deprecated import renamed
from ..distributed import all_reduce_min_max, all_reduce_sum, is_distributed
from .grid import Grid
from .lsq import fake_quantise_learned, lsq_grad_factor, lsq_init
from .spec import QuantSpec
from .tensor import (MIN_SCALE, SCALE_METHODS, _check_scale, _fake_quantise, check_finite, compute_qparams,
                     qparams_from_range, quantise)

__all__ = ["WeightQuantiser", "FixedMask", "ActQuantiser", "ACT_METHODS", "SCALE_INITS"]

#: Deprecated American spellings (old -> new), served with a DeprecationWarning until the next release.
RENAMED = {"WeightQuantizer": "WeightQuantiser", "ActQuantizer": "ActQuantiser"}
__getattr__ = renamed(__name__, RENAMED, globals())

ACT_METHODS = ("max", "percentile")
#: How a learned step starts: ``"lsq"`` (``2 * mean|w| / sqrt(quant_max)``) or ``"current"`` (the scale it has).
SCALE_INITS = ("lsq", "current")


def _stamp(t: torch.Tensor) -> tuple:
    """Where a tensor's values live and how often they were written in place: equal stamps, same values."""
    return t.data_ptr(), t._version


class _LearnedScale:
    """What weight and activation quantisers share: switching ``scale`` between a buffer and a learned parameter."""

    @property
    def learning(self) -> bool:
        """True while ``scale`` is a learned ``nn.Parameter`` (see :mod:`nnlab.quant.lsq`)."""
        return isinstance(self.scale, nn.Parameter)

    def _make_learned(self, start: torch.Tensor) -> None:
        start = start.detach().to(device=self.scale.device, dtype=torch.float32).clamp(min=MIN_SCALE)
        del self.scale  # the buffer
        self.scale = nn.Parameter(start.clone())

    def fix_scale(self) -> None:
        """Stop learning the step: ``scale`` becomes a buffer again, holding the learned value.

        The state dict keeps the key ``scale`` either way, so a model saved
        after :func:`nnlab.quant.freeze` loads into an ordinary quantised model.
        """
        if not self.learning:
            return
        value = self.scale.detach().clone()
        del self.scale
        self.register_buffer("scale", value)
        self._checked = None

    def _learned_scale(self) -> torch.Tensor:
        """The learned step, kept positive: an optimiser step below :data:`MIN_SCALE` is clamped back in place."""
        if self.training:
            with torch.no_grad():
                self.scale.clamp_(min=MIN_SCALE)
        return self.scale


class FixedMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 mask (pruned weights stay exactly zero).

    Args:
        mask: tensor of 0s and 1s shaped like the weight (a torch prune
            ``weight_mask``).
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().float())

    def forward(self, w):
        return w * self.mask


class WeightQuantiser(_LearnedScale, nn.Module):
    """Parametrization that fake-quantises a weight: ``w -> fake_quantise(w, spec, scale, zero_point)``.

    Register it with :func:`torch.nn.utils.parametrize.register_parametrization`
    (:func:`nnlab.quant.attach_quantisers` does this for every Conv2d and
    Linear layer).

    Args:
        spec: the weight's QuantSpec (symmetric specs keep pruned zeros at 0).
        weight: the current weight, used for the first scale and the shape.
        method: scale choice, ``"max"``, ``"percentile"`` or ``"mse"``.
        percentile: for ``method="percentile"``.
        label: names the weight in error messages (default ``"the weight"``;
            :func:`nnlab.quant.attach_quantisers` gives the layer's name).

    Raises:
        ValueError: ``weight`` holds NaN or infinite values (named by ``label``).

    Attributes:
        spec: the QuantSpec.
        scale, zero_point: buffers (float32 and int32; 0-dim, or one entry per
            output channel): the grid the weight is rounded onto.
        clip: buffer, the scale as a fraction of the no-clipping scale
            ``max|w| / quant_max`` (1 for method "max").
        track: when True (during retraining) the scale follows the current
            weight at every training forward pass (:meth:`follow`), so the
            grid moves with the weights; when False the stored scale is used.
        fraction: None (quantise every weight) or the share in [0, 1] of
            weights quantised during training (random-subset retraining; the
            others stay float).  Evaluation always quantises every weight.
        learning: True after :meth:`learn_scale`: ``scale`` is an
            ``nn.Parameter`` trained by gradient descent (LSQ) instead of a
            buffer set from the weights; :meth:`fix_scale` ends it.
    """

    label = "the weight"  # what errors call it (set per layer by attach_quantisers)
    _checked = None  # the scale's _stamp when it was last checked

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, method: str = "max", percentile: float = 99.9,
                 label: str = "the weight"):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {spec!r}")
        check_choice("method", method, SCALE_METHODS)
        self.spec, self.method, self.percentile = spec, method, percentile
        self.label = str(label)
        self.shape = tuple(weight.shape)
        scale, zero_point = compute_qparams(weight, spec, method, percentile, name=self.label)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("clip", torch.ones_like(scale))
        self.observe(weight)
        # Random-subset state: a random priority per weight; weights whose priority is
        # below `fraction` are the quantised subset.  Growing `fraction` with a fixed
        # priority grows the subset (old members stay); redrawing gives a new subset.
        self.register_buffer("priority", None, persistent=False)
        self.register_buffer("subset_mask", None, persistent=False)  # 1.0 where priority < fraction
        self.track = False
        self.fraction = None

    def _max_scale(self, w):
        """max|w| / quant_max, per tensor or per channel (the scale of method "max")."""
        spec = self.spec
        if spec.per_channel:
            dims = [d for d in range(w.dim()) if d != spec.ch_axis]
            top = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
        else:
            top = w.detach().abs().max()
        return (top / spec.quant_max).clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def observe(self, w: torch.Tensor) -> None:
        """Recompute ``scale`` and ``zero_point`` from the weight ``w`` with the quantiser's method (in place)."""
        scale, zero_point = compute_qparams(w, self.spec, self.method, self.percentile, name=self.label)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        if self.spec.symmetric and self.spec.signed and w.numel() > 0:
            self.clip.copy_((self.scale / self._max_scale(w)).clamp_(max=1.0))

    @torch.no_grad()
    def follow(self, w: torch.Tensor) -> None:
        """Cheap update of the scale while retraining: keep the clipping ratio, follow max |w|.

        For symmetric signed specs the scale becomes ``clip * max|w| / quant_max``,
        where ``clip`` (1 for method "max", below 1 for "percentile" and "mse")
        was found by the last :meth:`observe`; three small kernels instead of a
        search.  Other specs fall back to :meth:`observe`.
        """
        if not (self.spec.symmetric and self.spec.signed) or w.numel() == 0:
            return self.observe(w)
        torch.mul(self._max_scale(w), self.clip, out=self.scale)
        self.scale.clamp_(min=MIN_SCALE)

    def set_subset(self, fraction: float | None, redraw: bool = False, generator=None) -> None:
        """Quantise only a random ``fraction`` of the weights while training (None: all of them).

        Args:
            fraction: share of weights quantised, in [0, 1], or None.
            redraw: draw a new random subset now (otherwise the subset only grows
                as ``fraction`` grows: weights once quantised stay quantised).
            generator: optional ``torch.Generator`` for the draw (the draw is
                made on the generator's device); default torch's global one.
        """
        if fraction is None:
            self.fraction = None
            return
        fraction = check_float("fraction", fraction, 0.0, 1.0)
        drawn = redraw or self.priority is None
        if drawn:
            where = generator.device if generator is not None else "cpu"
            self.priority = torch.rand(self.shape, generator=generator, device=where).to(self.scale.device)
        if drawn or fraction != self.fraction or self.subset_mask is None:  # called every step: only on a change
            # The subset as a 0/1 mask in the weights' dtype: forward mixes with one fused lerp (exact for 0 and 1,
            # and a third of the time of torch.where with its backward on a CPU).
            self.subset_mask = (self.priority < fraction).to(self.scale.dtype)
        self.fraction = fraction

    def _mix_subset(self, wq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``wq`` on the random subset and ``w`` elsewhere, while training with a subset; ``wq`` otherwise."""
        if not (self.training and self.fraction is not None and self.fraction < 1.0):
            return wq
        mask = self.subset_mask
        if mask.dtype != w.dtype or mask.device != w.device:
            mask = mask.to(device=w.device, dtype=w.dtype)
        return torch.lerp(w, wq, mask)

    def learn_scale(self, weight: torch.Tensor, init: str = "lsq") -> None:
        """Make the step a learned parameter (LSQ, see :mod:`nnlab.quant.lsq`).

        From now on ``scale`` is an ``nn.Parameter``: an optimiser built
        afterwards trains it, with the gradient of :func:`nnlab.quant.lsq.fake_quantise_learned`
        scaled by ``1 / sqrt(N * quant_max)`` (``N``: weights per scale).  It no
        longer follows the weights (``track`` is ignored while learning).

        Args:
            weight: the weight the quantiser receives (after any pruning mask):
                sets the first step for ``init="lsq"``.
            init: ``"lsq"`` (``2 * mean|w| / sqrt(quant_max)`` over the non-zero
                weights) or ``"current"`` (keep the present scale, e.g. the max-based one).

        Raises:
            ValueError: an unknown ``init``, a spec with a zero point (only
                symmetric weight grids are learned), or ``weight`` holding NaN or infinite values.
        """
        check_choice("init", init, SCALE_INITS)
        if not (self.spec.symmetric and self.spec.signed):
            raise ValueError(f"learn_scale needs a symmetric signed weight spec, got {self.spec}")
        check_finite(weight, self.label)
        per_scale = weight.numel() // max(1, self.scale.numel())
        self.grad_factor = lsq_grad_factor(per_scale, self.spec)
        self._make_learned(lsq_init(weight, self.spec) if init == "lsq" else self.scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.learning:
            wq = fake_quantise_learned(w, self.spec, self._learned_scale(), self.zero_point, self.grad_factor,
                                       name=self.label)
            return self._mix_subset(wq, w)
        if self.training and self.track:
            self.follow(w)
        # The scale follows w while tracking (finite for a finite w, which is checked); otherwise it is checked
        # once after each change (its version counter moves with every in-place write, load_state_dict's too).
        check_scale = not (self.training and self.track) and self._checked != _stamp(self.scale)
        wq = _fake_quantise(w, self.spec, self.scale, self.zero_point, self.label, check_scale)
        if check_scale:
            self._checked = _stamp(self.scale)
        return self._mix_subset(wq, w)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The int32 grid integers of ``w`` (what the accelerator stores)."""
        return quantise(w, self.spec, self.scale, self.zero_point, name=self.label)

    def grid(self) -> Grid:
        """The grid the weight is rounded onto now, as a frozen :class:`~nnlab.quant.Grid`."""
        return Grid(self.spec, self.scale.detach().cpu().numpy(), self.zero_point.detach().cpu().numpy())

    def extra_repr(self) -> str:
        learned = ", learned scale" if self.learning else ""
        return f"spec={self.spec}, method={self.method!r}{learned}"


class ActQuantiser(_LearnedScale, nn.Module):
    """Fake-quantises the activations that flow through it; calibrated on a few batches first.

    In calibration mode it passes values through unchanged and records their
    range; :meth:`end_calibration` turns the range into ``scale`` and
    ``zero_point`` and switches to quantising.

    Args:
        spec: the activations' QuantSpec (unsigned, zero point 0 after a ReLU;
            asymmetric at the network input).
        method: ``"max"`` (the largest range seen) or ``"percentile"`` (the
            mean over batches of each batch's percentile: clips outliers).
        percentile: for ``method="percentile"``.
        label: names the activations in error messages (default ``"the
            activations"``; :func:`nnlab.quant.attach_quantisers` and
            :func:`nnlab.quant.calibrate` give the quantiser's name).

    Attributes:
        spec, scale, zero_point: as for :class:`WeightQuantiser` (per tensor).
        calibrating: True while observing.
        lo, hi, batches: buffers with the observed range and the batch count.
        learning: True after :meth:`learn_scale` (the step is a learned
            ``nn.Parameter``, LSQ); :meth:`fix_scale` ends it.
    """

    #: Read by :func:`nnlab.graph.is_act_quantiser` (the graph does not import this module).
    ACT_QUANTISER = True

    label = "the activations"  # what errors call it (set per quantiser by attach_quantisers and calibrate)
    _checked = None  # the scale's _stamp when it was last checked

    def __init__(self, spec: QuantSpec, method: str = "max", percentile: float = 99.99,
                 label: str = "the activations"):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {spec!r}")
        if spec.per_channel:
            raise ValueError(f"activation quantisers are per tensor; got spec.granularity={spec.granularity!r}")
        check_choice("method", method, ACT_METHODS)
        check_float("percentile", percentile, 50.0, 100.0, low_open=True)
        self.spec, self.method, self.percentile = spec, method, percentile
        self.label = str(label)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("batches", torch.tensor(0))
        self.calibrating = True

    def start_calibration(self) -> None:
        """Forget the observed range and pass activations through unchanged while observing."""
        self.lo.zero_()
        self.hi.zero_()
        self.batches.zero_()
        self.calibrating = True

    @torch.no_grad()
    def _observe(self, x):
        if x.numel() and self.method == "max":
            lo, hi = torch.aminmax(x.detach())
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):  # a NaN or an infinity reaches min or max
                check_finite(x, f"{self.label} (calibration batch {int(self.batches) + 1})")
            lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        elif x.numel() == 0:
            pass
        else:
            flat = x.detach().float().flatten()
            check_finite(flat, f"{self.label} (calibration batch {int(self.batches) + 1})")
            if flat.numel() > 1_000_000:  # torch.quantile's size limit; a strided sample suffices
                flat = flat[:: flat.numel() // 1_000_000 + 1]
            q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100, self.percentile / 100],
                                                  device=flat.device))
            n = self.batches.float()
            self.lo.copy_((self.lo * n + q[0].clamp(max=0.0)) / (n + 1))
            self.hi.copy_((self.hi * n + q[1].clamp(min=0.0)) / (n + 1))
        self.batches += 1

    @torch.no_grad()
    def end_calibration(self, sync_ranks: bool | None = None) -> None:
        """Set ``scale`` and ``zero_point`` from the observed range and start quantising.

        Args:
            sync_ranks: first combine the ranges observed by every rank of a
                ``torch.distributed`` process group (all-reduce: the lowest
                low and highest high for ``"max"``, the batch-weighted mean for
                ``"percentile"``), so that every rank gets the same scale.
                Default: whenever a process group is initialised; every rank
                must then call it.
        """
        if sync_ranks is None:
            sync_ranks = is_distributed()
        if sync_ranks and is_distributed():
            self._combine_ranks()
        scale, zero_point = qparams_from_range(self.lo, self.hi, self.spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrating = False

    @torch.no_grad()
    def _combine_ranks(self):
        if self.method == "max":
            all_reduce_min_max(self.lo, self.hi)
            all_reduce_sum(self.batches)
            return
        n = self.batches.to(self.lo.dtype)
        lo_sum, hi_sum, total = self.lo * n, self.hi * n, n.clone()
        all_reduce_sum(lo_sum, hi_sum, total, self.batches)
        total.clamp_(min=1)
        self.lo.copy_(lo_sum / total)
        self.hi.copy_(hi_sum / total)

    def grid(self) -> Grid:
        """The grid activations are rounded onto, as a frozen :class:`~nnlab.quant.Grid`.

        Raises:
            ValueError: the quantiser is still calibrating (no grid yet).
        """
        if self.calibrating:
            raise ValueError("this activation quantiser is still calibrating; run nnlab.quant.calibrate first")
        return Grid(self.spec, self.scale.detach().cpu().numpy(), self.zero_point.detach().cpu().numpy())

    def learn_scale(self, init: str = "current") -> None:
        """Make the step a learned parameter (LSQ, see :mod:`nnlab.quant.lsq`); the zero point stays fixed.

        The step's gradient is scaled by ``1 / sqrt(N * quant_max)``, ``N``
        being the number of values one sample sends through the quantiser.

        Args:
            init: ``"current"`` (start from the calibrated scale).  (``"lsq"``
                needs the activations themselves; it is refused here.)

        Raises:
            ValueError: the quantiser is still calibrating, or ``init`` is not ``"current"``.
        """
        check_choice("init", init, ("current",))
        if self.calibrating:
            raise ValueError(f"{self.label}: calibrate the activation quantiser before learning its scale "
                             f"(nnlab.quant.calibrate)")
        self._make_learned(self.scale)

    def forward(self, x):
        if self.calibrating:
            self._observe(x)
            return x
        if self.learning:
            per_sample = x[0].numel() if x.dim() > 1 else x.numel()
            return fake_quantise_learned(x, self.spec, self._learned_scale(), self.zero_point,
                                         lsq_grad_factor(per_sample, self.spec), name=self.label)
        if self._checked != _stamp(self.scale):  # a new scale (calibration, load_state_dict): check it once
            _check_scale(self.scale, self.label)
            self._checked = _stamp(self.scale)
        return _fake_quantise(x, self.spec, self.scale, self.zero_point, self.label, check_scale=False)

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else f"scale={self.scale.item():.4g}, zero_point={self.zero_point.item()}"
        return f"spec={self.spec}, {state}"
