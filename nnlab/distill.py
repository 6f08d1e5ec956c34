"""Recover a pruned network by distillation from the original float network.

The *teacher* is the original, dense, floating-point network; the *student*
is its pruned copy.  The student learns to reproduce the teacher's softened
output distribution (soft targets), which carries more information per image
than the one-hot label: how much a "7" looks like a "1".

Convention used throughout nnlab (Hinton, Vinyals and Dean, 2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * cross_entropy(student, labels)

* ``T > 0`` is the temperature: ``T = 1`` is the ordinary softmax, larger T
  softens both distributions and reveals the small probabilities;
* the KL divergence goes *from the teacher to the student* (the teacher's
  distribution is the target) and is averaged over the batch;
* the factor ``T^2`` keeps the gradients of the soft term the same size
  whatever T is, so alpha means the same thing at every temperature;
* ``alpha`` in ``[0, 1]`` is the weight of the distillation term: ``alpha=1``
  is pure distillation, ``alpha=0`` plain training on the labels.

:func:`distill` trains with this loss through :func:`nnlab.train.fit`, so the
pruning masks stay attached and pruned weights stay exactly zero.
:func:`prune_and_distill` alternates coring and distillation;
:func:`nnlab.recipes.pretrained_sparse` caches its result for later chapters.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ._args import check_bool, check_float, check_positive_int
from .prune import iterative_coring
from .base import loader_of, resolve_device, warn_moved
from .train import fit

__all__ = ["RECIPE", "distillation_loss", "distill", "prune_and_distill", "pretrained_sparse"]

#: The recipe that reaches high sparsity quickly on LeNet-5 with the offline MNIST subset:
#: coring steps along the cubic schedule, a few epochs of distillation after each.
RECIPE = {
    "steps": (4, 2),            # coring steps to the target (full, quick)
    "epochs_per_step": (3, 1),  # distillation epochs after each coring step (full, quick)
    "T": 4.0,
    "alpha": 0.9,
    "lr": 0.02,
    "scope": "global",
}


def _check_T_alpha(T, alpha):
    T = check_float("T", T, low=0, low_open=True)
    alpha = check_float("alpha", alpha, 0, 1)
    return T, alpha


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
                      *, T: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Distillation loss ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)``.

    Args:
        student_logits: ``(N, classes)`` raw outputs of the student.
        teacher_logits: ``(N, classes)`` raw outputs of the teacher (no gradient needed).
        targets: ``(N,)`` true labels; needed unless ``alpha == 1``.
        T: temperature, ``> 0``.
        alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
        The scalar loss (mean over the batch).
    """
    T, alpha = _check_T_alpha(T, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; teacher and student must have the same output size")
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)
    if alpha == 1.0:
        return soft
    if targets is None:
        raise ValueError("targets are needed when alpha < 1 (the label loss has weight 1 - alpha)")
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def _output_size(model, x):
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            return tuple(model(x).shape[1:])
        finally:
            model.train(was)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data,
    epochs: int,
    *,
    T: float = 4.0,
    alpha: float = 0.9,
    lr: float = 0.02,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str = "distill",
    **fit_kwargs,
) -> pd.DataFrame:
    """Train ``student`` to match ``teacher`` with :func:`distillation_loss`, through :func:`nnlab.train.fit`.

    The teacher stays frozen in eval mode; the student is trained in place
    and keeps its pruning masks, so its pruned weights stay exactly zero.

    Args:
        student: the network to train (e.g. a pruned copy of the teacher).
        teacher: the trained original network; same number of outputs.
        data: DataBundle or training DataLoader.
        epochs: passes over the training data.
        T: temperature, ``> 0``.
        alpha: weight of the distillation term, in ``[0, 1]``.
        lr: peak learning rate (one-cycle schedule by default).
        device: where to train.
        seed: training seed.
        progress: show a progress bar.
        desc: progress bar label.
        **fit_kwargs: anything else :func:`nnlab.train.fit` accepts
            (``penalty``, ``callbacks``, ``eval_data``, ``optimizer`` ...).

    Returns:
        The training history (a DataFrame, one row per epoch).
    """
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    T, alpha = _check_T_alpha(T, alpha)
    epochs = check_positive_int("epochs", epochs)
    dev = resolve_device(device)
    student.to(dev)
    teacher.to(dev).eval()
    x, _ = next(iter(loader_of(data, "train")))
    x = x[:2].to(dev)
    s_out, t_out = _output_size(student, x), _output_size(teacher, x)
    if s_out != t_out:
        raise ValueError(f"teacher and student must have the same output size: teacher gives {t_out}, "
                         f"student gives {s_out}")

    def loss_fn(logits, targets, inputs):
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return distillation_loss(logits, teacher_logits, targets, T=T, alpha=alpha)

    return fit(student, data, epochs, lr=lr, loss_fn=loss_fn, device=dev, seed=seed, progress=progress,
               desc=desc, **fit_kwargs)


def prune_and_distill(
    model: nn.Module,
    teacher: nn.Module,
    data,
    *,
    target: float | None = None,
    steps: int = 4,
    sparsities: Sequence[float] | None = None,
    epochs_per_step: int = 3,
    T: float = RECIPE["T"],
    alpha: float = RECIPE["alpha"],
    lr: float = RECIPE["lr"],
    scope: str = RECIPE["scope"],
    layers: Iterable[str] | None = None,
    eval_data=None,
    evaluate: bool = True,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> pd.DataFrame:
    """Alternate fraction coring and distillation from ``teacher`` up to a target sparsity.

    A thin wrapper of :func:`nnlab.prune.iterative_coring` whose retraining
    step is :func:`distill`.  Pass ``alpha=0`` for plain fine-tuning on the
    labels (the comparison of notebook 02).

    Args:
        model: the student, pruned and retrained in place (start from a copy of the teacher).
        teacher: the original dense network.
        data: DataBundle (its training loader is used; its test loader is
            used for the accuracies unless ``eval_data`` is given).
        target, steps: final sparsity reached in ``steps`` cubic-schedule steps.
        sparsities: explicit sparsities instead of ``target``/``steps``.
        epochs_per_step: distillation epochs after each coring step.
        T, alpha, lr: distillation settings (see :func:`distill`).
        scope: ``"global"`` or ``"layer"`` fraction coring.
        layers: layers to core (default every Conv2d/Linear).
        eval_data: where to measure accuracy (default ``data``'s test set).
        evaluate: measure the accuracies after each coring and each
            distillation (False: the history holds only ``step`` and
            ``sparsity``, and the test set is not run twice per step).
        device: where to train.
        seed: training seed (step k uses ``seed + k``).
        progress: show progress bars.
        **fit_kwargs: passed to :func:`nnlab.train.fit` (e.g. ``penalty``).

    Returns:
        DataFrame, one row per step: ``step``, ``sparsity``, ``acc_pruned``
        (after coring), ``acc_retrained`` (after distillation), percent.
    """
    epochs_per_step = check_positive_int("epochs_per_step", epochs_per_step)
    evaluate = check_bool("evaluate", evaluate)
    T, alpha = _check_T_alpha(T, alpha)
    counter = {"k": 0}

    def retrain(m):
        counter["k"] += 1
        distill(m, teacher, data, epochs_per_step, T=T, alpha=alpha, lr=lr, device=device,
                seed=seed + counter["k"], progress=progress, desc=f"distill step {counter['k']}", **fit_kwargs)

    if not evaluate:
        eval_data = None
    elif eval_data is None:
        eval_data = data
    return iterative_coring(model, retrain, target=target, steps=steps, sparsities=sparsities, scope=scope,
                            layers=layers, eval_data=eval_data, device=device)


def pretrained_sparse(*args, **kwargs):
    """Deprecated alias of :func:`nnlab.recipes.pretrained_sparse` (same arguments, same result)."""
    from .recipes import pretrained_sparse as recipe  # lazy: a deprecated alias; the recipe sits above this technique

    warn_moved("nnlab.distill.pretrained_sparse", "nnlab.recipes.pretrained_sparse")
    return recipe(*args, **kwargs)
