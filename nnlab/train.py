"""Training and evaluation: one loop that every chapter reuses.

:func:`fit` is a plain PyTorch training loop with the hooks the later chapters
need, so none of them writes its own loop:

* ``loss_fn(logits, targets, inputs)`` replaces cross-entropy (distillation
  uses it to ask the teacher about the same inputs);
* ``penalty(model)`` is added to the loss (L1 and group-lasso regularisers);
* ``callbacks`` run around every optimisation step (gradual pruning, the
  growing random subset of quantisation-aware training).

Accuracies are percentages (0 to 100) throughout nnlab.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._args import check_choice, check_float, check_int, check_positive_int
from .base import loader_of, release_memory, resolve_device
from .distributed import broadcast_norm_statistics

__all__ = ["resolve_device", "seed_everything", "fit", "evaluate", "accuracy", "Callback", "time_training_steps"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (CPU and CUDA)."""
    check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Callback:
    """Base class for code that runs around each optimisation step of :func:`fit`.

    Override any of the methods; ``step`` counts from 0 to ``total_steps - 1``.
    A plain function passed as a callback is called as ``on_step_start``.
    """

    def on_step_start(self, step: int, total_steps: int, model: nn.Module) -> None:
        pass

    def on_step_end(self, step: int, total_steps: int, model: nn.Module) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        pass



def _make_optimizer(optimizer, params, lr, momentum, weight_decay):
    if callable(optimizer):
        return optimizer(params)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _make_schedule(schedule, opt, lr, total_steps):
    if schedule == "onecycle":
        if total_steps < 3:  # one step up and one down is the shortest cycle
            return None
        # A quarter of the steps to warm up, but at least 2 so the ramp has a length.
        pct_start = max(0.25, 2.0 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=pct_start)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return None


def fit(
    model: nn.Module,
    data,
    epochs: int,
    *,
    lr: float = 0.05,
    optimizer: str | Callable = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "onecycle",
    loss_fn: Callable | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    callbacks: Iterable = (),
    eval_data=None,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> pd.DataFrame:
    """Train ``model`` in place and return its history, one row per epoch.

    Args:
        model: the network; it is moved to ``device``.  It may be wrapped in
            ``DistributedDataParallel`` (see :mod:`nnlab.distributed`): every
            rank then runs ``fit`` with the same arguments and ends with the
            same weights and batch-norm statistics.
        data: a training DataLoader, or a DataBundle (its ``train`` loader);
            under DDP, :func:`nnlab.distributed.distributed_loader`.
        epochs: number of passes over the training data (positive integer).
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum, Nesterov), ``"adam"`` (AdamW) or a
            function ``params -> torch.optim.Optimizer``.
        momentum, weight_decay: optimiser settings.
        schedule: ``"onecycle"`` (warm-up then anneal; runs of fewer than 3
            steps keep ``lr`` constant), ``"cosine"`` or ``"constant"``.
        loss_fn: ``loss_fn(logits, targets, inputs) -> scalar``; default
            cross-entropy.
        penalty: ``penalty(model) -> scalar`` added to the loss, e.g.
            :func:`nnlab.regularise.l1_penalty`.
        callbacks: :class:`Callback` objects (or functions called before each
            step as ``fn(step, total_steps, model)``).
        eval_data: a loader (or DataBundle: its ``test`` loader) evaluated after
            each epoch; adds a ``test_acc`` column.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        seed: seeds torch, NumPy and Python first, so the batch order,
            augmentation and dropout repeat exactly on the same machine.
        progress: show a ``tqdm.auto`` progress bar.
        desc: label of the progress bar.

    Returns:
        pandas DataFrame with columns ``epoch``, ``loss``, ``train_acc``,
        ``seconds`` (and ``test_acc`` when ``eval_data`` is given).

    The model comes back in evaluation mode and without the gradients of the
    last step (``.grad`` is None: a network's worth of memory that nothing
    reads; a callback's ``on_step_end`` still sees them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    epochs = check_positive_int("epochs", epochs)
    check_float("lr", lr, low=0, low_open=True)
    check_float("momentum", momentum, 0, 1, high_open=True)
    check_float("weight_decay", weight_decay, low=0)
    check_choice("schedule", schedule, SCHEDULES)
    dev = resolve_device(device)
    loader = loader_of(data, "train")
    eval_loader = None if eval_data is None else loader_of(eval_data, "test")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("data has no batches to train on")
    total = epochs * steps_per_epoch
    hooks = [cb if not callable(cb) or isinstance(cb, Callback) else _FunctionCallback(cb) for cb in callbacks]

    seed_everything(seed)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    sched = _make_schedule(schedule, opt, lr, total)
    loss_fn = loss_fn or (lambda logits, targets, inputs: F.cross_entropy(logits, targets))

    history, step = [], 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            _set_epoch(loader, epoch)
            model.train()
            start = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                for cb in hooks:
                    cb.on_step_start(step, total, model)
                logits = model(x)
                loss = loss_fn(logits, y, x)
                if penalty is not None:
                    loss = loss + penalty(model)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                for cb in hooks:
                    cb.on_step_end(step, total, model)
                n = y.shape[0]
                loss_sum += loss.item() * n
                correct += (logits.argmax(1) == y).sum().item()
                seen += n
                step += 1
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}")
            row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                   "seconds": time.perf_counter() - start}
            for cb in hooks:
                cb.on_epoch_end(epoch, model)
            if eval_loader is not None:
                row["test_acc"] = evaluate(model, eval_loader, device=dev)["top1"]
            history.append(row)
    finally:
        bar.close()
    model.eval()
    if isinstance(model, nn.parallel.DistributedDataParallel) and model.broadcast_buffers:
        # DDP sends rank 0's buffers before each forward pass, so the last step left each rank
        # with its own batch-norm statistics: end the run with the same ones everywhere.
        broadcast_norm_statistics(model)
    opt.zero_grad(set_to_none=True)
    opt = sched = logits = loss = None  # the optimiser's state, the last gradients and batch: hand their memory back
    release_memory()
    return pd.DataFrame(history)


def _set_epoch(loader, epoch):
    """Tell a DistributedSampler (possibly inside a BatchSampler) which epoch it is, so shuffles differ per epoch."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for s in (sampler, getattr(sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
                return


class _FunctionCallback(Callback):
    def __init__(self, fn):
        self.fn = fn

    def on_step_start(self, step, total_steps, model):
        self.fn(step, total_steps, model)


@torch.no_grad()
def evaluate(model: nn.Module, data, *, device=None, topk=(1, 5), max_batches: int | None = None) -> dict:
    """Top-k accuracy (percent) and mean cross-entropy of ``model`` on ``data``.

    Args:
        model: the network (put in eval mode; left in eval mode).
        data: a DataLoader, or a DataBundle (its ``test`` loader).
        device: where to run; default where the model's parameters are.
        topk: which top-k accuracies to report, e.g. ``(1, 5)``.
        max_batches: stop after this many batches (for quick previews).

    Returns:
        dict with ``"top1"``, ``"top5"`` ... (percent), ``"loss"`` and ``"n"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    topk = tuple(topk)
    for k in topk:
        check_positive_int("topk", k)
    dev = resolve_device(device, model)
    loader = loader_of(data, "test")
    model.eval()
    hits = {k: 0 for k in topk}
    loss_sum, n = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(dev), y.to(dev)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        kmax = min(max(topk), logits.shape[1])
        top = logits.topk(kmax, dim=1).indices
        for k in topk:
            hits[k] += (top[:, :k] == y[:, None]).any(1).sum().item()
        n += y.shape[0]
    if n == 0:
        raise ValueError("data has no batches to evaluate")
    out = {f"top{k}": 100.0 * hits[k] / n for k in topk}
    out["loss"] = loss_sum / n
    out["n"] = n
    return out


def accuracy(model: nn.Module, data, *, device=None) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``data`` (a loader or DataBundle's test set)."""
    return evaluate(model, data, device=device, topk=(1,))["top1"]


def time_training_steps(models: dict, batch, *, device=None, rounds: int = 30, steps: int = 5,
                        warmup: int = 2) -> dict:
    """Median seconds of one SGD step (forward, loss, backward, update) of each model.

    The models take turns, round after round, so that a change in the
    machine's load affects them all alike.  On CUDA the device is
    synchronised around each timed run; under DistributedDataParallel every
    rank must call this together (the backward pass all-reduces).

    Args:
        models: name -> model (trained in place with a tiny learning rate).
        batch: ``(images, labels)``.
        device: where the batch goes (default: where it is).
        rounds: timed rounds; steps: steps per round; warmup: untimed steps first.

    Returns:
        name -> median seconds per step.
    """
    if not models:
        raise ValueError("models must name at least one model to time")
    check_positive_int("rounds", rounds)
    check_positive_int("steps", steps)
    check_int("warmup", warmup, minimum=0)
    x, y = batch if device is None else (t.to(resolve_device(device)) for t in batch)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    runners = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def run(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):  # first calls: allocations, CUDA kernels, DDP buckets
            run()
        runners[name] = run
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}
