"""The course's recipes: trained, pruned and retrained networks, each made once and then cached.

Later chapters start from what an earlier one made (the 90%-sparse LeNet-5 of
notebook 02, a retrained 4-bit network of notebook 05) without running it
again: each recipe here asks the model cache (:mod:`nnlab.cache`) for its
result and, on a miss, runs the techniques (:mod:`nnlab.prune`,
:mod:`nnlab.distill`, :mod:`nnlab.quant`) once and caches what they give.

This module sits above the techniques (see ``ARCHITECTURE.md``): the
techniques never import it, nor the cache.

* :func:`train_once`: the one "train once, then cache" step every recipe uses;
* :func:`pretrained_sparse`: pruned by coring and recovered by distillation;
* :func:`pretrained_quantised`: quantised and retrained for low bit-depths;
* :func:`sparse_recipe`, :func:`core_and_distil`, :func:`restore_sparse`:
  the pieces of :func:`pretrained_sparse`, for networks that are not
  registered by name (:mod:`nnlab.pipeline` uses them).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

from . import config
from ._args import check_choice, check_float, check_positive_int
from ._preflight import check_quantised_arguments
from .base import resolve_device
from .cache import cached, pretrained
from .data import load_data
from .distill import RECIPE as SPARSE_RECIPE
from .distill import prune_and_distill
from .models import MODELS, upgrade_state_dict
from .prune import apply_masks
from .prune import sparsity as measured_sparsity
from .quant.model import act_quantisers, attach_quantisers, quantise_model
from .quant.retraining import SCALE_MODES, STRUCTURE_VERSION, retrain
from .train import accuracy, evaluate

if TYPE_CHECKING:
    from torch import nn

__all__ = ["train_once", "pretrained_sparse", "pretrained_quantised", "sparse_recipe", "core_and_distil",
           "restore_sparse"]


def train_once(name: str, spec: dict, build: Callable[[], tuple], restore: Callable[[dict], nn.Module], *,
               device="cpu", verbose: bool = True) -> nn.Module:
    """Make a network once with ``build``, cache it, and load it from the cache afterwards.

    Args:
        name: readable prefix of the cache file name, e.g. ``"lenet5-sparse90-mnist-offline"``.
        spec: everything the result depends on (hashed into the key, see :func:`nnlab.cache.cached`).
        build: trains and returns ``(network, metrics)``; ``metrics`` is a dict of
            numbers, strings, lists and dicts.  Called only on a cache miss.
        restore: turns a state dict into the network (an untrained skeleton
            carrying it); also checks a loaded file (a file it cannot restore is rebuilt).
        device: where the network is returned (see :func:`nnlab.base.resolve_device`).
        verbose: print what is happening.

    Returns:
        The network in eval mode on ``device``, with ``nnlab_metrics`` set to ``metrics``.
    """
    dev = resolve_device(device)

    def payload():
        net, metrics = build()
        net.to("cpu")
        return {"state_dict": net.state_dict(), "metrics": metrics}

    stored = cached(name, spec, payload, validate=lambda p: restore(p["state_dict"]), verbose=verbose)
    net = restore(stored["state_dict"])
    net.nnlab_metrics = dict(stored["metrics"])
    return net.to(dev).eval()


def sparse_recipe(quick: bool) -> dict:
    """:data:`nnlab.distill.RECIPE` for quick or full mode (one value per setting)."""
    pick = 1 if quick else 0
    return {**SPARSE_RECIPE, "steps": SPARSE_RECIPE["steps"][pick],
            "epochs_per_step": SPARSE_RECIPE["epochs_per_step"][pick]}


def core_and_distil(student: nn.Module, teacher: nn.Module, data, sparsity: float, recipe: dict, *, device, seed: int,
                    verbose: bool, evaluate: bool = True):
    """Core ``student`` to ``sparsity`` with distillation from ``teacher`` as ``recipe`` says; returns the history.

    ``student`` is changed in place and left on the CPU.  ``evaluate=False``
    skips the accuracies of each step (see :func:`nnlab.distill.prune_and_distill`).
    """
    history = prune_and_distill(student, teacher, data, target=sparsity, steps=recipe["steps"],
                                epochs_per_step=recipe["epochs_per_step"], T=recipe["T"], alpha=recipe["alpha"],
                                lr=recipe["lr"], scope=recipe["scope"], evaluate=evaluate, device=device, seed=seed,
                                progress=verbose)
    student.to("cpu")
    return history


def restore_sparse(teacher: nn.Module, state: dict) -> nn.Module:
    """A copy of ``teacher`` carrying a cored state dict (its pruning masks re-applied)."""
    student = copy.deepcopy(teacher)
    masks = {k[: -len(".weight_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")}
    apply_masks(student, masks)
    student.load_state_dict(state)
    return student


def pretrained_sparse(model: str = "lenet5", sparsity: float = 0.9, *, data=None, quick: bool | None = None,
                      device="cpu", seed: int = 0, verbose: bool = True) -> nn.Module:
    """A pruned, distillation-retrained network, built once with :data:`nnlab.distill.RECIPE` and then cached.

    Later chapters start from it instead of rerunning notebook 02.  The teacher
    is :func:`nnlab.cache.pretrained` on the same data.

    Args:
        model: a model name known to :func:`nnlab.cache.pretrained` (e.g. ``"lenet5"``).
        sparsity: target global sparsity in ``[0, 1)``.
        data: DataBundle to train and test on; default ``load_data()`` (the
            offline MNIST subset, no augmentation).
        quick: use the quick-mode recipe; default :func:`nnlab.quick_mode`.
        device: where to train (on a cache miss) and where the model is returned.
        seed: seed of the teacher and of the retraining.
        verbose: print what is happening.

    Returns:
        The student in eval mode with its pruning masks attached
        (``weight_orig``, ``weight_mask``); ``model.nnlab_metrics`` holds
        ``top1`` (test accuracy, percent), ``dense_top1``, ``sparsity`` and
        the per-step ``history``.

    Raises:
        ValueError: an unknown model or a sparsity outside ``[0, 1)``.
    """
    check_choice("model", model, MODELS)
    sparsity_target = check_float("sparsity", sparsity, 0, 1, high_open=True)
    quick = config.quick_mode() if quick is None else bool(quick)
    dev = resolve_device(device)
    if data is None:
        data = load_data(verbose=verbose)
    teacher = pretrained(model, data=data, quick=quick, seed=seed, device=dev, verbose=verbose).cpu()
    recipe = sparse_recipe(quick)
    spec = {"model": model, "sparsity": sparsity_target, "data": data.fingerprint, "recipe": recipe,
            "teacher_metrics": teacher.nnlab_metrics, "seed": seed}

    def build():
        if verbose:
            print(f"Pruning {model} to {sparsity_target:.0%} with distillation (done once, then cached) ...")
        student = copy.deepcopy(teacher)
        history = core_and_distil(student, teacher, data, sparsity_target, recipe, device=dev, seed=seed,
                                  verbose=verbose)
        return student, {"top1": accuracy(student, data), "dense_top1": accuracy(teacher, data),
                         "sparsity": measured_sparsity(student), "history": history.to_dict(orient="list")}

    def restore(state):
        return restore_sparse(teacher, upgrade_state_dict(copy.deepcopy(teacher), state))

    return train_once(f"{model}-sparse{round(100 * sparsity_target)}-{data.name}-{data.source}", spec, build,
                      restore, device=dev, verbose=verbose)


def pretrained_quantised(
    model: str = "lenet5",
    weight_bits: int = 4,
    act_bits: int | None = 8,
    *,
    method: str = "random_subset",
    scales: str = "follow",
    epochs: int | None = None,
    sparsity: float | None = None,
    granularity: str = "per_channel",
    overrides: dict | None = None,
    lr: float = 0.01,
    data=None,
    device="cpu",
    seed: int = 0,
    quick: bool | None = None,
    verbose: bool = True,
) -> nn.Module:
    """A quantised and retrained baseline, retrained once and loaded from the cache afterwards.

    Starts from :func:`nnlab.cache.pretrained` (or, with ``sparsity``, from
    :func:`pretrained_sparse`), quantises it (:func:`nnlab.quant.quantise_model`)
    and retrains it (:func:`nnlab.quant.retrain`).

    Args:
        model: baseline name, e.g. ``"lenet5"``.
        weight_bits, act_bits: bit-depths (act_bits None: float activations).
        method: ``"ste"``, ``"random_subset"`` or ``"ptq"`` (no retraining).
        scales: ``"follow"`` or ``"learned"`` (LSQ), as for :func:`nnlab.quant.retrain`.
        epochs: retraining epochs; default 3 (1 in quick mode).
        sparsity: start from the pruned network of this sparsity (e.g. 0.9).
        granularity: weight scales ``"per_channel"`` or ``"per_tensor"``.
        overrides: per-layer weight bits, as for :func:`nnlab.quant.attach_quantisers`.
        lr: retraining learning rate.
        data: DataBundle (default: ``nnlab.data.load_data()``).
        device: where to train and where the model is returned.
        seed: training seed.
        quick: quick-mode recipe; default :func:`nnlab.quick_mode`.
        verbose: print what is happening.

    Returns:
        The quantised model in eval mode; ``model.nnlab_metrics`` holds its
        test accuracy (``top1``) and the settings.

    Raises:
        ValueError: an argument outside what is allowed (named in the message).
    """
    check_quantised_arguments(model, weight_bits, act_bits, method=method, epochs=epochs, sparsity=sparsity,
                              granularity=granularity, overrides=overrides, lr=lr, data=data, device=device,
                              seed=seed, quick=quick, verbose=verbose)
    check_choice("scales", scales, SCALE_MODES)
    if scales == "learned" and method == "ptq":
        raise ValueError("scales='learned' needs retraining; method 'ptq' does not train (use 'ste' or 'random_subset')")
    quick = config.quick_mode() if quick is None else bool(quick)
    epochs = (1 if quick else 3) if epochs is None else check_positive_int("epochs", epochs)
    if data is None:
        data = load_data(verbose=verbose)

    def base(where="cpu"):
        # A cache miss trains the float (or sparse) network on `where`.
        if sparsity is None:
            return pretrained(model, data=data, quick=quick, seed=seed, device=where, verbose=verbose)
        return pretrained_sparse(model=model, sparsity=sparsity, data=data, quick=quick, seed=seed, device=where,
                                 verbose=verbose)

    options = {"granularity": granularity, "overrides": overrides}
    # "structure": how quantisers are placed and named (2: on the traced graph, a GraphModule's state dict).
    spec = {"model": model, "weight_bits": weight_bits, "act_bits": act_bits, "method": method,
            "epochs": epochs, "sparsity": sparsity, "granularity": granularity, "overrides": overrides,
            "lr": lr, "data": data.fingerprint, "seed": seed, "quick": quick, "structure": STRUCTURE_VERSION}
    if scales != "follow":  # entries retrained with scales that follow the weights keep their cache keys
        spec["scales"] = scales

    def build():
        if verbose:
            extra = f", layers {overrides}" if overrides else ""
            sp = f"{sparsity:.0%}-sparse " if sparsity else ""
            print(f"Quantising {sp}{model} to {weight_bits}-bit weights{extra} / {act_bits}-bit activations "
                  f"({method}; done once, then cached) ...")
        qmodel = quantise_model(base(device), data, weight_bits, act_bits, **options)
        if method != "ptq":
            retrain(qmodel, data, epochs, method=method, scales=scales, lr=lr, seed=seed, device=device,
                    progress=verbose)
        qmodel.to("cpu")
        return qmodel, {"top1": evaluate(qmodel, data)["top1"], **{k: v for k, v in spec.items() if k != "data"}}

    def restore(state):
        net = attach_quantisers(base(), weight_bits, act_bits, **options)
        for a in act_quantisers(net).values():
            a.calibrating = False
        net.load_state_dict(state)
        return net

    sp = "" if sparsity is None else f"-sparse{round(100 * sparsity)}"
    lsq = "-lsq" if scales == "learned" else ""
    return train_once(f"{model}{sp}-w{weight_bits}a{act_bits}-{method}{lsq}", spec, build, restore, device=device,
                      verbose=verbose)
