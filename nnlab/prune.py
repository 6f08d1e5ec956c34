"""Pruning by coring: set the weights that matter little to zero, and keep them there.

A *coring* function sets small weights to zero.  Two flavours, one effect:

* :func:`core_by_threshold`: every weight with ``|w| < t`` becomes zero;
* :func:`core_by_fraction`: the smallest fraction ``f`` of the weights (by
  magnitude) becomes zero, in each layer (``scope="layer"``) or across the
  whole network (``scope="global"``).

:func:`core_channels` removes whole filters (or input channels) by their norm,
which shrinks dense hardware work too.

Everything is built on :mod:`torch.nn.utils.prune`: a pruned layer keeps its
trainable ``weight_orig``, a ``weight_mask`` buffer of zeros and ones, and a
forward pre-hook that recomputes ``weight = weight_orig * weight_mask`` before
every forward pass.  Gradients of pruned weights are therefore zero and a
pruned weight is exactly zero however long the network is retrained ("gone for
good").  Coring again composes with the existing mask (PyTorch's
``PruningContainer``): a weight, once pruned, never comes back.
:func:`make_permanent` folds the masks into plain weights.

By default the prunable weights are the ``weight`` of every ``nn.Conv2d`` and
``nn.Linear`` layer; biases are never pruned.  Sparsities are fractions in
``[0, 1]`` (0.9 means 90% of the weights are zero); accuracies are percentages.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ._args import check_choice, check_float, check_int, check_positive_int
from .base import unwrap
from .train import Callback, accuracy

__all__ = [
    "PRUNABLE_TYPES", "SCOPES", "ThresholdCoring", "FractionCoring",
    "prunable_layers", "effective_weight", "is_pruned",
    "core_by_threshold", "core_by_fraction", "core_channels", "apply_masks", "make_permanent",
    "sparsity", "sparsity_report", "cubic_sparsity", "GradualCoring", "iterative_coring",
    "sensitivity_analysis",
]

#: Layer types whose ``weight`` is pruned by default.
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
#: Where a fraction is counted: in each layer, or across the whole network.
SCOPES = ("layer", "global")


# ---------------------------------------------------------------------------
# Pruning methods (torch.nn.utils.prune style)
# ---------------------------------------------------------------------------

class ThresholdCoring(torch_prune.BasePruningMethod):
    """Prune every entry with ``|w| < threshold`` (keep exactly those with ``|w| >= threshold``).

    A :class:`torch.nn.utils.prune.BasePruningMethod`, so it composes with any
    other PyTorch pruning method on the same tensor.

    Args:
        threshold: non-negative magnitude below which weights become zero.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, threshold: float):
        self.threshold = check_float("threshold", threshold, low=0)

    def compute_mask(self, t, default_mask):
        return default_mask * (t.abs() >= self.threshold).to(default_mask.dtype)

    @classmethod
    def apply(cls, module, name, threshold, importance_scores=None):
        """Add threshold coring of ``module.<name>`` (see :func:`core_by_threshold`)."""
        return super().apply(module, name, threshold=threshold, importance_scores=importance_scores)


class FractionCoring(torch_prune.BasePruningMethod):
    """Prune the ``fraction`` of all entries with the smallest magnitude, counting entries already pruned.

    Unlike :class:`torch.nn.utils.prune.L1Unstructured`, whose ``amount`` is a
    share of the weights that are still left, ``fraction`` is the sparsity of
    the whole tensor after coring: already-pruned entries are counted first,
    and if the tensor is already at least that sparse nothing changes.  On a
    tensor that has not been pruned, the mask is the one
    ``l1_unstructured(amount=fraction)`` gives (same count,
    ``round(fraction * n)``, and for tensors without ties the same entries).

    Args:
        fraction: target share of zeros in ``[0, 1]``.
    """

    PRUNING_TYPE = "global"  # sees the whole tensor, including what is already pruned

    def __init__(self, fraction: float):
        self.fraction = check_float("fraction", fraction, 0, 1)

    def compute_mask(self, t, default_mask):
        n = t.numel()
        k = round(self.fraction * n)  # the count torch.nn.utils.prune would prune
        mask = default_mask.clone()
        already = int((default_mask == 0).sum())
        if k <= already:
            return mask
        score = t.abs().flatten().clone()
        score[default_mask.flatten() == 0] = -1.0  # pruned entries go first, they are zero anyway
        drop = torch.topk(score, k=k, largest=False).indices
        mask.view(-1)[drop] = 0
        return mask

    @classmethod
    def apply(cls, module, name, fraction, importance_scores=None):
        """Add fraction coring of ``module.<name>`` (see :func:`core_by_fraction`)."""
        return super().apply(module, name, fraction=fraction, importance_scores=importance_scores)


# ---------------------------------------------------------------------------
# Which weights, and what they are now
# ---------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap(model)


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The layers whose weights coring acts on, as ``(name, module)`` pairs in model order.

    Args:
        model: any ``nn.Module``.
        layers: names (as in ``model.named_modules()``, e.g. ``"conv1"`` or
            ``"fc1"`` for LeNet-5) of the layers to use; default every
            ``nn.Conv2d`` and ``nn.Linear``.

    Returns:
        A list of ``(name, module)``.

    Raises:
        ValueError: the model has nothing to prune, or a name is not a
            prunable layer of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)  # under DistributedDataParallel, names are the wrapped model's ("conv1", not "module.conv1")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not found:
        raise ValueError(
            f"model has nothing to prune: it has no nn.Conv2d or nn.Linear layer "
            f"(its layers: {sorted({type(m).__name__ for m in model.modules()})})")
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    wanted = [str(n) for n in layers]
    names = [n for n, _ in found]
    for n in wanted:
        if n not in names:
            raise ValueError(f"layers contains {n!r}, which is not a prunable layer; prunable layers: {names}")
    if not wanted:
        raise ValueError(f"layers is empty; choose among the prunable layers {names}")
    return [(n, m) for n, m in found if n in wanted]


def _refuse_parametrized(chosen) -> None:
    """Refuse layers whose weight is parametrized (a quantised model): a torch pruning mask cannot attach there."""
    for name, m in chosen:
        if parametrize.is_parametrized(m, "weight"):
            chain = ", ".join(type(p).__name__ for p in m.parametrizations.weight)
            raise ValueError(f"layer {name!r} is quantised (its weight is computed by the parametrizations "
                             f"[{chain}]), so a pruning mask cannot be attached to it: prune the float model, then "
                             f"quantise it (nnlab.quant.quantise_model keeps the mask inside the quantiser's chain "
                             f"as a FixedMask, so pruned weights stay exactly zero)")


def is_pruned(module: nn.Module) -> bool:
    """True when ``module.weight`` carries a pruning mask (``weight_mask``)."""
    return hasattr(module, "weight_mask") and hasattr(module, "weight_orig")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer really uses (``weight_orig * weight_mask`` when pruned), detached."""
    if is_pruned(module):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def _mask_or_ones(module: nn.Module) -> torch.Tensor:
    if is_pruned(module):
        return module.weight_mask.detach()
    return torch.ones_like(module.weight, dtype=module.weight.dtype).detach()


def _check_scope(scope):
    return check_choice("scope", scope, SCOPES)


# ---------------------------------------------------------------------------
# Coring functions
# ---------------------------------------------------------------------------

def core_by_threshold(model: nn.Module, threshold, *, scope: str = "global",
                      layers: Iterable[str] | None = None) -> nn.Module:
    """Threshold coring: every weight with ``|w| < t`` becomes zero; those with ``|w| >= t`` are kept.

    Args:
        model: the network, pruned in place (masks are attached).
        threshold: ``t >= 0``.  With ``scope="global"`` it is a magnitude, the
            same for every layer.  With ``scope="layer"`` it is measured in
            units of each layer's weight standard deviation, so each layer gets
            its own magnitude ``t * std(w)`` (the rule of Han et al., 2015).
            A dict ``{layer name: magnitude}`` gives each layer its own
            threshold explicitly.
        scope: ``"global"`` or ``"layer"`` (see ``threshold``).
        layers: names of the layers to core (default every Conv2d/Linear).

    Returns:
        ``model`` (for chaining).
    """
    _check_scope(scope)
    chosen = prunable_layers(model, layers)
    _refuse_parametrized(chosen)
    if isinstance(threshold, dict):
        names = [n for n, _ in chosen]
        for name, t in threshold.items():
            if name not in names:
                raise ValueError(f"threshold has a key {name!r}, which is not a prunable layer; choose among {names}")
            check_float(f"threshold[{name!r}]", t, low=0)
        todo = [(m, float(threshold[n])) for n, m in chosen if n in threshold]
    else:
        t = check_float("threshold", threshold, low=0)
        todo = []
        for _, m in chosen:
            if scope == "layer":
                w = effective_weight(m)
                alive = w[_mask_or_ones(m) != 0]
                std = float(alive.std()) if alive.numel() > 1 else 0.0
                todo.append((m, t * std))
            else:
                todo.append((m, t))
    for m, t in todo:
        ThresholdCoring.apply(m, "weight", threshold=t)
    return model


def _keep_all_but_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask that is False on exactly the ``k`` smallest ``scores`` (ties at the cut: the first ones).

    A selection (``kthvalue``) and comparisons: the same weights as
    ``torch.topk(scores, k, largest=False)`` (what ``torch.nn.utils.prune``
    ranks with) wherever the k-th smallest score is not tied, at a fraction of
    topk's time and memory on a ResNet's 11 million weights.
    """
    cut = torch.kthvalue(scores.cpu() if scores.device.type == "mps" else scores, k).values.to(scores.device)
    keep = scores > cut
    tied = torch.nonzero(scores == cut).flatten()
    below = int((scores < cut).sum())
    keep[tied[k - below:]] = True  # of the scores equal to the cut, prune only as many as k still needs
    return keep


def core_by_fraction(model: nn.Module, fraction: float, *, scope: str = "global",
                     layers: Iterable[str] | None = None) -> nn.Module:
    """Fraction coring: the smallest ``fraction`` of the weights (by magnitude) becomes zero.

    The count is ``round(fraction * n)``, the count
    ``torch.nn.utils.prune.l1_unstructured(amount=fraction)`` prunes.  Weights
    already pruned count towards it and never come back, so coring a 50%-sparse
    network to 0.8 prunes 30% more of the weights; ``fraction`` is the sparsity
    reached, not a share of what is left.

    Args:
        model: the network, pruned in place (masks are attached).
        fraction: target sparsity in ``[0, 1]``.
        scope: ``"layer"``: every chosen layer reaches ``fraction``;
            ``"global"``: one magnitude ranking over all chosen layers, so
            layers with many small weights are pruned more.
        layers: names of the layers to core (default every Conv2d/Linear).

    Returns:
        ``model`` (for chaining).
    """
    fraction = check_float("fraction", fraction, 0, 1)
    _check_scope(scope)
    chosen = prunable_layers(model, layers)
    _refuse_parametrized(chosen)
    if scope == "layer":
        for _, m in chosen:
            FractionCoring.apply(m, "weight", fraction=fraction)
        return model
    # Global: rank all weights together; already-pruned weights rank first.  One flat tensor of scores and a
    # boolean mask of what stays: ResNet-sized networks hold tens of millions of weights, so no per-layer copies.
    sizes = [m.weight.numel() for _, m in chosen]
    scores = torch.empty(sum(sizes), dtype=chosen[0][1].weight.dtype, device=chosen[0][1].weight.device)
    start = 0
    for (_, m), n in zip(chosen, sizes):
        part = scores[start:start + n]
        torch.abs(effective_weight(m).flatten(), out=part)
        if is_pruned(m):
            part[m.weight_mask.detach().flatten() == 0] = -1.0
        start += n
    k = round(fraction * scores.numel())
    if k > 0:
        keep = _keep_all_but_smallest(scores, k)
    else:
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    del scores
    start = 0
    for (_, m), n in zip(chosen, sizes):
        torch_prune.custom_from_mask(m, "weight", keep[start:start + n].view_as(m.weight))
        start += n
    return model


def core_channels(model: nn.Module, fraction: float, *, dim: int = 0, norm: float = 2,
                  layers: Iterable[str] | None = None) -> nn.Module:
    """Structured coring: zero the ``fraction`` of whole filters (or input channels) with the smallest norm.

    Each chosen layer is treated on its own.  The count is
    ``round(fraction * channels)``; channels already entirely pruned count
    towards it.

    Args:
        model: the network, pruned in place (masks are attached).
        fraction: share of channels to remove in each layer, in ``[0, 1]``.
        dim: ``0`` removes output filters (rows of a Linear), ``1`` input
            channels (columns of a Linear).
        norm: the ``p`` of the Lp norm that ranks channels (``1``, ``2``, ``inf`` ...).
        layers: names of the layers (default every Conv2d/Linear).

    Returns:
        ``model`` (for chaining).
    """
    fraction = check_float("fraction", fraction, 0, 1)
    check_choice("dim", dim, (0, 1))
    check_float("norm", norm, low=0, low_open=True)
    chosen = prunable_layers(model, layers)
    _refuse_parametrized(chosen)
    for _, m in chosen:
        w = effective_weight(m)
        mask = _mask_or_ones(m)
        other = [d for d in range(w.dim()) if d != dim]
        norms = torch.linalg.vector_norm(w, ord=norm, dim=other)
        dead = mask.sum(dim=other) == 0
        norms = norms.clone()
        norms[dead] = -1.0
        k = round(fraction * norms.numel())
        keep = torch.ones_like(norms)
        if k > 0:
            keep[torch.topk(norms, k=k, largest=False).indices] = 0
        shape = [1] * w.dim()
        shape[dim] = -1
        torch_prune.custom_from_mask(m, "weight", keep.view(shape).expand_as(w).contiguous())
    return model


def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """Attach given masks (``{layer name: 0/1 tensor}``) as PyTorch pruning masks.

    Used to rebuild a pruned model from a ``state_dict`` that holds
    ``weight_orig`` and ``weight_mask``: apply the masks first, then
    ``load_state_dict``.

    Args:
        model: the network, pruned in place.
        masks: mask of each layer; each has the shape of that layer's weight.

    Returns:
        ``model``.
    """
    chosen = dict(prunable_layers(model, list(masks)))
    _refuse_parametrized(chosen.items())
    for name, mask in masks.items():
        m = chosen[name]
        if tuple(mask.shape) != tuple(m.weight.shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, the weight {tuple(m.weight.shape)}")
        torch_prune.custom_from_mask(m, "weight", mask.to(m.weight.device))
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Make pruning permanent: fold every mask into a plain ``weight`` (``prune.remove``).

    The zeros stay, but nothing keeps them at zero any more: train a
    permanent model again and they grow back.  Keep the masks while retraining.

    Args:
        model: the network, changed in place.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if is_pruned(m):
            torch_prune.remove(m, "weight")
    return model


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

def sparsity_report(model: nn.Module, layers: Iterable[str] | None = None) -> pd.DataFrame:
    """Per-layer and total sparsity, counting exact zeros of the weight each layer really uses.

    Works whether the masks are still attached or pruning was made permanent.

    Args:
        model: the network.
        layers: layer names (default every Conv2d/Linear).

    Returns:
        DataFrame with one row per layer and a ``total`` row; columns
        ``layer``, ``type``, ``shape``, ``weights``, ``zeros``, ``sparsity``
        (fraction of zeros) and ``masked`` (whether a mask is attached).
    """
    rows = []
    for name, m in prunable_layers(model, layers):
        w = effective_weight(m)
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "type": type(m).__name__, "shape": tuple(w.shape), "weights": w.numel(),
                     "zeros": zeros, "sparsity": zeros / w.numel(), "masked": is_pruned(m)})
    n = sum(r["weights"] for r in rows)
    z = sum(r["zeros"] for r in rows)
    rows.append({"layer": "total", "type": "", "shape": "", "weights": n, "zeros": z, "sparsity": z / n,
                 "masked": all(r["masked"] for r in rows)})
    return pd.DataFrame(rows)


def sparsity(model: nn.Module, layers: Iterable[str] | None = None) -> float:
    """Share of exact zeros among the prunable weights (a fraction in ``[0, 1]``)."""
    report = sparsity_report(model, layers)
    return float(report["sparsity"].iloc[-1])


# ---------------------------------------------------------------------------
# Gradual and iterative pruning
# ---------------------------------------------------------------------------

def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0) -> float:
    """The gradual schedule of Zhu and Gupta (2017): ``s = s_f + (s_i - s_f) (1 - step/total_steps)^3``.

    It prunes fast at first, while there are many redundant weights, and
    slowly near the end.

    Args:
        step: where we are, from ``0`` (returns ``initial``) to ``total_steps`` (returns ``final``).
        total_steps: positive number of steps of the schedule.
        final: target sparsity in ``[0, 1]``.
        initial: starting sparsity in ``[0, 1]``.

    Returns:
        The sparsity to reach at ``step``.
    """
    total_steps = check_positive_int("total_steps", total_steps)
    step = check_int("step", step, minimum=0, maximum=total_steps)
    final = check_float("final", final, 0, 1)
    initial = check_float("initial", initial, 0, 1)
    return final + (initial - final) * (1.0 - step / total_steps) ** 3


class GradualCoring(Callback):
    """A :class:`nnlab.train.Callback` that cores the network along the cubic schedule during training.

    Every ``every`` optimisation steps it cores by fraction to
    :func:`cubic_sparsity` of the current step (reaching ``final`` at
    ``end`` of the run), so pruning and training happen in one call to
    :func:`nnlab.train.fit`::

        fit(model, data, epochs=4, callbacks=[GradualCoring(0.9)])

    Args:
        final: target sparsity in ``[0, 1]``.
        every: core every this many steps.
        end: share of the run at which ``final`` is reached (the rest of the
            run recovers accuracy at constant sparsity).
        scope: ``"global"`` or ``"layer"``.
        layers: layers to core (default every Conv2d/Linear).
    """

    def __init__(self, final: float, *, every: int = 20, end: float = 0.75, scope: str = "global",
                 layers: Iterable[str] | None = None):
        self.final = check_float("final", final, 0, 1)
        self.every = check_positive_int("every", every)
        self.end = check_float("end", end, 0, 1, low_open=True)
        self.scope = _check_scope(scope)
        self.layers = layers
        self.history: list[tuple[int, float]] = []

    def on_step_start(self, step, total_steps, model):
        stop = max(1, round(self.end * total_steps))
        if step % self.every and step != stop:
            return
        target = cubic_sparsity(min(step, stop), stop, self.final)
        if not self.history or target > self.history[-1][1]:
            core_by_fraction(model, target, scope=self.scope, layers=self.layers)
            self.history.append((step, target))


def _sparsity_steps(target, steps, sparsities):
    if sparsities is not None:
        values = [check_float("sparsities", s, 0, 1) for s in sparsities]
        if not values or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"sparsities must be a non-empty, non-decreasing list of fractions, got {sparsities!r}")
        return values
    target = check_float("target", target, 0, 1)
    steps = check_positive_int("steps", steps)
    return [cubic_sparsity(k, steps, target) for k in range(1, steps + 1)]


def iterative_coring(
    model: nn.Module,
    retrain: Callable[[nn.Module], object],
    *,
    target: float | None = None,
    steps: int = 4,
    sparsities: Sequence[float] | None = None,
    scope: str = "global",
    layers: Iterable[str] | None = None,
    eval_data=None,
    device=None,
) -> pd.DataFrame:
    """Alternate coring and retraining, raising the sparsity step by step.

    The sparsities are either given (``sparsities=[0.5, 0.7, 0.9]``) or follow
    :func:`cubic_sparsity` from 0 to ``target`` in ``steps`` steps.  At each
    step the network is cored by fraction, evaluated, retrained by
    ``retrain(model)`` (which must keep the masks, as :func:`nnlab.train.fit`
    and :func:`nnlab.distill.distill` do) and evaluated again.

    Args:
        model: the network, pruned and retrained in place.
        retrain: ``retrain(model)`` trains the pruned model, e.g.
            ``lambda m: distill(m, teacher, data, epochs=2)``.
        target: final sparsity, with ``steps``.
        steps: number of coring steps of the cubic schedule.
        sparsities: explicit non-decreasing sparsities, instead of ``target``/``steps``.
        scope: ``"global"`` or ``"layer"`` fraction coring.
        layers: layers to core (default every Conv2d/Linear).
        eval_data: DataBundle or test loader; when given, the table has
            ``acc_pruned`` (just after coring, before retraining) and
            ``acc_retrained`` (percent).
        device: where to evaluate (default where the model is).

    Returns:
        DataFrame, one row per step: ``step``, ``sparsity`` (measured),
        ``acc_pruned``, ``acc_retrained``.
    """
    if not callable(retrain):
        raise TypeError(f"retrain must be a function retrain(model), got {type(retrain).__name__}")
    if sparsities is None and target is None:
        raise ValueError("give either target (with steps) or sparsities")
    plan = _sparsity_steps(target, steps, sparsities)
    _check_scope(scope)
    _refuse_parametrized(prunable_layers(model, layers))
    rows = []
    for k, s in enumerate(plan, start=1):
        core_by_fraction(model, s, scope=scope, layers=layers)
        row = {"step": k, "sparsity": sparsity(model, layers)}
        if eval_data is not None:
            row["acc_pruned"] = accuracy(model, eval_data, device=device)
        retrain(model)
        if eval_data is not None:
            row["acc_retrained"] = accuracy(model, eval_data, device=device)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Sensitivity analysis
# ---------------------------------------------------------------------------

def sensitivity_analysis(model: nn.Module, data, sparsities: Sequence[float] = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95),
                         *, layers: Iterable[str] | None = None, device=None) -> pd.DataFrame:
    """Accuracy as each layer alone is cored to each of several sparsities (no retraining).

    Layers whose accuracy falls early are *sensitive* and deserve a lower
    sparsity than robust ones.  ``model`` itself is not changed.

    Args:
        model: the trained network.
        data: DataBundle or test loader to measure accuracy on.
        sparsities: fractions in ``[0, 1]`` to try.
        layers: layers to analyse (default every Conv2d/Linear).
        device: where to evaluate (default where the model is).

    Returns:
        Long DataFrame with columns ``layer``, ``type``, ``weights``,
        ``sparsity``, ``accuracy`` (percent); ``table.pivot(index="sparsity",
        columns="layer", values="accuracy")`` gives the wide table.
    """
    values = [check_float("sparsities", s, 0, 1) for s in sparsities]
    if not values:
        raise ValueError("sparsities is empty; give at least one fraction in [0, 1]")
    chosen = prunable_layers(model, layers)
    _refuse_parametrized(chosen)
    rows = []
    for name, m in chosen:
        for s in values:
            probe = copy.deepcopy(_unwrap(model))
            core_by_fraction(probe, s, scope="layer", layers=[name])
            rows.append({"layer": name, "type": type(m).__name__, "weights": m.weight.numel() if not is_pruned(m)
                         else m.weight_orig.numel(), "sparsity": s,
                         "accuracy": accuracy(probe, data, device=device)})
    return pd.DataFrame(rows)
