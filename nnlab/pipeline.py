"""The whole method in one call: baseline -> eliminate -> reduce -> deploy on the NNA simulator.

:func:`compress` runs every stage of the method on one model and
returns a :class:`CompressionResult`: one table with a row per stage
(accuracy, sparsity, bit-depths, storage bytes, energy and latency per
inference) and the artefacts (models, compiled program, cost report).
Notebook 07 and the ``nnlab compress`` command are thin layers over it.

Stages, each starting from the previous one's network unless said otherwise:

1. ``fp32 baseline``: the trained dense network (:func:`nnlab.cache.pretrained`);
2. ``pruned``: fraction coring to the target sparsity, no retraining;
3. ``pruned + distilled``: coring and distillation alternated
   (:func:`nnlab.recipes.pretrained_sparse`);
4. ``L1 + pruned + distilled``: the baseline first retrained with an L1
   penalty, then cored and distilled the same way (a side branch: it shows
   what L1 adds; run only with ``l1=True``, as the deployed network does not use it);
5. ``PTQ``: stage 3 quantised after training (:func:`nnlab.quant.quantise_model`);
6. ``retrained low-bit``: stage 3 quantised and retrained
   (:func:`nnlab.recipes.pretrained_quantised`);
7. ``NNA (integer)``: stage 6 compiled (:func:`nnlab.nna.compile_model`) and
   run by the engine on the test set in its ``"integer"`` requantisation
   mode, integers only as an accelerator computes (fixed-point
   multipliers and shifts, see :mod:`nnlab.nna.engine`), with the
   accelerator's accumulator width (``hardware.accumulator_bits``).
   The images go through the simulator ``sim_batch_size`` at a time, so
   its memory does not grow with the test set; the counts and accuracy
   are those of one run on every image at once.  ``sim_images=N``
   simulates a fixed draw of N test images instead of all of them (the
   stage table's ``test_images`` column and ``settings["sim_images"]`` say
   so), for large networks on a small machine.

The model is a registered name (:data:`nnlab.cache.RECIPES`: trained with its
recipe and cached, as the notebooks do), a Python file and a function in it
that builds the network (``"path/to/file.py:make_net"``, see
:func:`nnlab.models.from_factory`), or any ``nn.Module``.  A module is trained
with :data:`MODULE_RECIPE` from the weights it has (``train=False``: it is the
fp32 baseline as given, for a network you trained yourself); every later
stage is cached under a hash of the module's traced graph and weights.

Overflow is a figure, never a secret: the stage table's ``saturated``
column counts the sums of the NNA stage that overflowed the accumulator and
were saturated (None for the other stages, which have no accumulator), the
cost report adds them per layer, and when any occurred :func:`compress`
warns (:class:`nnlab.nna.AccumulatorOverflowWarning`) with the layers, the
accumulator width that holds every sum and the accuracy the simulator gives
with it (``CompressionResult.overflow``).

With a ``budget`` (``{"budget_bytes": N}``, ``{"budget_energy_uj": E}`` or
``{"budget_latency_us": T}``), the baseline is also handed to
:func:`nnlab.picker.pick_per_layer`, which chooses a weight bit-depth and a
sparsity per layer so that the simulated NNA fits the budget (no
retraining); its choice is ``CompressionResult.choice``, outside the stage
table.

Costs: the float stages are costed on the fp32 baseline accelerator
(:data:`nnlab.nna.FP32_BASELINE`: dense float32 storage, no zero
skipping, so pruning alone buys nothing there until the weights are
encoded); the quantised stages on the chosen accelerator (default the
Series2NX-like preset), from the same compiled program the simulator runs.
Every stage is cached, so a second run takes seconds.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import config, nna, picker, prune, quant
from ._args import check_positive_int
from ._preflight import check_compress_arguments
from .base import release_memory
from .cache import cached, pretrained
from .data import DataBundle, first_images, load_data, make_loader, random_images
from .distill import distill
from .graph import trace
from .models import upgrade_state_dict
from .recipes import core_and_distil, pretrained_quantised, pretrained_sparse, train_once
from .recipes import restore_sparse as _restore_sparse
from .recipes import sparse_recipe as _sparse_recipe
from .regularise import l1_penalty
from .nna.engine import MAX_ACCUMULATOR_BITS, Result, add_counts
from .train import accuracy, fit

__all__ = ["STAGES", "MODULE_RECIPE", "NNA_MODE", "SIM_BATCH_SIZE", "SIM_IMAGES_SEED", "CompressionResult", "compress",
           "simulate", "stage_costs"]

STAGES = ("fp32 baseline", "pruned", "pruned + distilled", "L1 + pruned + distilled", "PTQ",
          "retrained low-bit", "NNA (integer)")

#: Requantisation mode of the engine in the ``NNA (integer)`` stage (see :data:`nnlab.nna.MODES`).
NNA_MODE = "integer"

#: Test images the NNA stage simulates at once (``compress(sim_batch_size=...)``): the simulator's memory
#: depends on this, not on the size of the test set.
SIM_BATCH_SIZE = 250

#: Seed of the draw of test images that ``compress(sim_images=N)`` simulates: fixed, so that runs with
#: different training seeds are compared on the same images.
SIM_IMAGES_SEED = 0

#: Training recipe of an ``nn.Module`` given to :func:`compress` (full-mode, quick-mode epochs).
MODULE_RECIPE = {"epochs": (3, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True}

#: Low-bit retraining of an ``nn.Module``'s stage 6: epochs (full, quick) and learning rate,
#: as :func:`nnlab.recipes.pretrained_quantised` retrains the registered models.
MODULE_RETRAIN = {"epochs": (3, 1), "lr": 0.01}

#: L1 branch: penalty strength and epochs of L1 retraining before coring (full, quick).
L1_RECIPE = {"strength": 1e-4, "epochs": (4, 1), "lr": 0.02}


@dataclass
class CompressionResult:
    """What :func:`compress` returns.

    Attributes:
        stages: one row per stage: ``stage``, ``accuracy`` (percent),
            ``sparsity``, ``weight_bits``, ``act_bits``, ``storage_bytes``,
            ``energy_uj``, ``latency_us``, ``compression`` and ``energy_ratio``
            (fp32 dense baseline / stage), ``hardware``, ``saturated`` (sums
            that overflowed the accumulator: an int for the NNA stage, None
            for the others), ``test_images`` (how many test images the
            accuracy was measured on: the whole test set, except for the
            NNA stage with ``sim_images``).
        settings: the arguments of the run (``sim_images``: None when the
            NNA stage simulated every test image).
        models: the network of each stage (by stage name); with
            ``compress(keep_models=False)`` only the retrained network and
            the integer program.
        program: the compiled integer program (stage 7).
        report: the simulator's per-layer cost report of ``program``, with
            the ``saturated`` and ``sum_bits`` columns of its run.
        data_description: the line that says which data was used.
        seconds: wall-clock time of the whole run.
        overflow: None when no sum overflowed the accumulator; otherwise
            ``saturated`` (all sums), ``layers`` (layer -> saturated sums),
            ``images``, ``accumulator_bits`` (the width that overflowed),
            ``accumulator_bits_needed`` (the narrowest width that holds every
            sum), ``accuracy`` (percent, as simulated) and
            ``accuracy_without_overflow`` (percent, simulated with the
            needed width; None beyond the 48 bits the engine simulates) and
            ``message`` (the warning).
        choice: with a ``budget``, the :class:`nnlab.picker.PerLayerChoice`
            of the baseline for it; else None.
        agreement: percent of the simulated test images on which the NNA
            stage's top-1 class equals the retrained PyTorch model's (stage 6).
    """

    stages: pd.DataFrame
    settings: dict
    models: dict = field(repr=False)
    program: object = field(repr=False)
    report: pd.DataFrame = field(repr=False)
    data_description: str = ""
    seconds: float = 0.0
    overflow: dict | None = None
    choice: object = field(default=None, repr=False)
    agreement: float | None = None

    def headline(self) -> dict:
        """The figures of the deployed stage against the fp32 baseline."""
        first, last = self.stages.iloc[0], self.stages.iloc[-1]
        return {
            "accuracy_fp32": float(first["accuracy"]), "accuracy_nna": float(last["accuracy"]),
            "accuracy_drop_pp": float(first["accuracy"] - last["accuracy"]),
            "fp32_bytes": int(first["storage_bytes"]), "nna_bytes": int(last["storage_bytes"]),
            "compression": float(last["compression"]), "energy_ratio": float(last["energy_ratio"]),
            "fp32_energy_uj": float(first["energy_uj"]), "nna_energy_uj": float(last["energy_uj"]),
            "fp32_latency_us": float(first["latency_us"]), "nna_latency_us": float(last["latency_us"]),
            "saturated": int(last["saturated"]) if last.get("saturated") is not None else None,
        }


def stage_costs(model: nn.Module, data, hardware=None, *, float_model: bool = False) -> tuple[dict, object, pd.DataFrame]:
    """Storage, energy and latency per inference of one network on the NNA simulator's cost model.

    Args:
        model: a quantised model (:mod:`nnlab.quant`), or a float model with
            ``float_model=True``.
        data: DataBundle (for the input shape, and to calibrate a float model).
        hardware: :class:`nnlab.nna.NNAConfig` for quantised models (default the
            Series2NX-like preset).  Float models are costed on its fp32 form.
        float_model: cost ``model`` as fp32 weights and activations.  It is
            compiled through an 8-bit copy only to obtain the layer
            structure; the fp32 accelerator stores and computes every weight
            in float32, dense, so the copy's values do not enter the costs.

    Returns:
        ``(figures, program, report)``: ``figures`` has ``storage_bytes``,
        ``energy_uj``, ``latency_us``, ``compression``, ``energy_ratio``
        and ``hardware``.
    """
    hardware = nna.SERIES2NX if hardware is None else hardware
    if float_model:
        structure = quant.quantise_model(model, data, 8, 8)
        program = nna.compile_model(structure, data.input_shape)
        table = nna.report(program, hardware.as_fp32())
    else:
        program = nna.compile_model(model, data.input_shape)
        table = nna.report(program, hardware)
    s = nna.headline(table)
    figures = {"storage_bytes": s["storage_bytes"], "energy_uj": s["energy_uj"], "latency_us": s["latency_us"],
               "compression": s["compression"], "energy_ratio": s["energy_ratio"], "hardware": s["config"]}
    return figures, program, table


def _core_and_distil(student, teacher, data, sparsity, recipe, *, device, seed, verbose) -> dict:
    """Core ``student`` to ``sparsity`` with distillation from ``teacher``; the cache payload of the result."""
    # compress measures every stage itself: no accuracies per coring step (two passes over the test set each)
    core_and_distil(student, teacher, data, sparsity, recipe, device=device, seed=seed, verbose=verbose,
                    evaluate=False)
    return {"state_dict": student.state_dict(), "metrics": {"top1": accuracy(student, data)}}


def _l1_branch(teacher, data, sparsity, *, quick, device, seed, verbose):
    """Stage 4: L1-regularised distillation, then coring and distillation to ``sparsity`` (cached)."""
    recipe = _sparse_recipe(quick)
    l1 = {**L1_RECIPE, "epochs": L1_RECIPE["epochs"][1 if quick else 0]}
    key_fields = {"teacher": teacher.nnlab_metrics, "teacher_weights": weights_hash(teacher),
                  "data": data.fingerprint, "sparsity": sparsity, "recipe": recipe, "l1": l1, "seed": seed}

    def build():
        if verbose:
            print(f"L1 branch: {l1['epochs']} epochs with an L1 penalty, then coring to {sparsity:.0%} "
                  f"(done once, then cached) ...")
        student = copy.deepcopy(teacher)
        distill(student, teacher, data, l1["epochs"], lr=l1["lr"], penalty=l1_penalty(l1["strength"]),
                device=device, seed=seed, progress=verbose, desc="L1")
        core_and_distil(student, teacher, data, sparsity, recipe, device=device, seed=seed, verbose=verbose)
        return student, {"top1": accuracy(student, data)}

    def restore(state):
        return _restore_sparse(teacher, upgrade_state_dict(copy.deepcopy(teacher), state))

    return train_once(f"l1-sparse{round(100 * sparsity)}-{data.name}-{data.source}", key_fields, build, restore,
                      device="cpu", verbose=verbose)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_fingerprint(model: nn.Module) -> dict:
    """What identifies an ``nn.Module`` in the cache: its class, its traced graph (code) and its weights."""
    code = trace(model).code
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "graph": hashlib.sha256(code.encode()).hexdigest(), "weights": weights_hash(model)}


def _file_label(label: str) -> str:
    """``label`` as a part of a file name: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:40] or "model"


def _copy_without_gradients(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` without the gradients its last training step left (a network's worth of memory)."""
    net = copy.deepcopy(module).cpu()
    net.zero_grad(set_to_none=True)
    return net


def _module_baseline(module, data, *, train, label, quick, device, seed, verbose):
    """Stage 1 of an ``nn.Module``: trained with :data:`MODULE_RECIPE` from its weights (cached), or as given."""
    if not train:
        net = _copy_without_gradients(module).eval()
        net.nnlab_metrics = {"top1": accuracy(net, data), "trained": False}
        return net
    recipe = MODULE_RECIPE
    epochs = recipe["epochs"][1 if quick else 0]
    key_fields = {"module": module_fingerprint(module), "data": data.fingerprint, "recipe": recipe, "epochs": epochs,
            "seed": seed}

    def build():
        if verbose:
            print(f"Training {label} for {epochs} epochs (done once, then cached) ...")
        net = copy.deepcopy(module).cpu()
        loader = make_loader(data.train.dataset.with_augment(recipe["augment"]), recipe["batch_size"],
                             shuffle=True)
        history = fit(net, loader, epochs, lr=recipe["lr"], optimizer=recipe["optimizer"], seed=seed,
                      device=device, desc=f"train {label}", progress=verbose)
        net.to("cpu")
        return {"state_dict": net.state_dict(), "metrics": {
            "top1": accuracy(net, data), "train_seconds": float(history["seconds"].sum()), "epochs": epochs}}

    def restore(payload):
        net = _copy_without_gradients(module)
        net.load_state_dict(payload["state_dict"])
        return net

    payload = cached(f"{_file_label(type(module).__name__)}-{data.name}-{data.source}", key_fields, build, validate=restore,
                     verbose=verbose)
    net = restore(payload).eval()
    net.nnlab_metrics = dict(payload["metrics"])
    return net


def _module_sparse(teacher, data, sparsity, *, label, quick, device, seed, verbose):
    """Stage 3 of an ``nn.Module``: cored and distilled as :func:`nnlab.recipes.pretrained_sparse` does (cached)."""
    recipe = _sparse_recipe(quick)
    key_fields = {"teacher": module_fingerprint(teacher), "data": data.fingerprint, "sparsity": sparsity,
            "recipe": recipe, "seed": seed}

    def build():
        if verbose:
            print(f"Pruning {label} to {sparsity:.0%} with distillation (done once, then cached) ...")
        return _core_and_distil(copy.deepcopy(teacher), teacher, data, sparsity, recipe, device=device, seed=seed,
                                verbose=verbose)

    def restore(payload):
        return _restore_sparse(teacher, payload["state_dict"])

    file = f"{_file_label(type(teacher).__name__)}-sparse{round(100 * sparsity)}-{data.name}-{data.source}"
    payload = cached(file, key_fields, build,
                     validate=restore, verbose=verbose)
    return restore(payload).eval()


def _module_retrained(start, fingerprint, file_label, data, weight_bits, act_bits, method, *, label, quick, device,
                      seed, verbose):
    """Stage 6 of an ``nn.Module``: the PTQ network ``start`` retrained as the registered models are (cached).

    ``start`` is :func:`nnlab.quant.quantise_model` of stage 3 (``fingerprint``
    is stage 3's :func:`module_fingerprint`, ``file_label`` its class name).  It is retrained in place on a
    cache miss, and the cached weights are loaded into it on a hit: either way
    it is the network returned, so no other copy of the network is alive
    while it trains (a ResNet-18 copy with its pruning masks is 135 MB).
    """
    epochs, lr = MODULE_RETRAIN["epochs"][1 if quick else 0], MODULE_RETRAIN["lr"]
    key_fields = {"student": fingerprint, "data": data.fingerprint, "weight_bits": weight_bits,
            "act_bits": act_bits, "method": method, "epochs": epochs, "lr": lr, "seed": seed,
            "structure": quant.retraining.STRUCTURE_VERSION}

    def build():
        if verbose:
            print(f"Quantising {label} to {weight_bits}-bit weights / {act_bits}-bit activations ({method}; "
                  f"done once, then cached) ...")
        quant.retrain(start, data, epochs, method=method, lr=lr, seed=seed, device=device, progress=verbose)
        start.to("cpu")
        return {"state_dict": start.state_dict(), "metrics": {"top1": accuracy(start, data)}}

    def check(payload):
        """A loaded entry must fit ``start`` exactly: checked before anything is copied into it, so that a bad
        entry (which the cache then rebuilds) never leaves ``start`` half-overwritten."""
        ours, theirs = start.state_dict(), payload["state_dict"]
        if set(ours) != set(theirs):
            raise ValueError(f"the entry's tensors {sorted(set(theirs) ^ set(ours))[:5]} do not match the network's")
        bad = [k for k, v in ours.items() if tuple(v.shape) != tuple(theirs[k].shape)]
        if bad:
            raise ValueError(f"the entry's tensors {bad[:5]} have other shapes than the network's")

    name = f"{_file_label(file_label)}-w{weight_bits}a{act_bits}-{method}"
    payload = cached(name, key_fields, build, validate=check, verbose=verbose)
    start.load_state_dict(payload["state_dict"])
    return start.eval()


def compress(
    model: str | nn.Module = "lenet5",
    dataset: str = "mnist",
    *,
    source: str | None = None,
    sparsity: float = 0.9,
    weight_bits: int = 5,
    act_bits: int = 8,
    method: str = "random_subset",
    hardware=None,
    device="cpu",
    seed: int = 0,
    quick: bool | None = None,
    l1: bool = False,
    verbose: bool = True,
    budget: dict | None = None,
    train: bool = True,
    name: str | None = None,
    sim_images: int | None = None,
    sim_batch_size: int = SIM_BATCH_SIZE,
    data=None,
    keep_models: bool = True,
) -> CompressionResult:
    """Run baseline -> prune -> distill -> (L1) -> PTQ -> retrain -> NNA, and cost every stage.

    Args:
        model: what to compress: a registered name (:data:`nnlab.cache.RECIPES`,
            e.g. ``"lenet5"``, ``"mobilenet-mnist"``,
            ``"torchvision:mobilenet_v2"``); a Python file and a function in
            it that returns the network, ``"path/to/file.py:make_net"``
            (called with no arguments, PyTorch seeded with ``seed``); or any
            ``nn.Module`` (copied, never changed) that takes the data set's
            images and gives one output per class, made of the operations in
            :data:`nnlab.graph.SUPPORTED`.
        dataset: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        source: data source (see :func:`nnlab.data.load_data`).
        sparsity: target fraction of zero weights, in ``[0, 1)``.
        weight_bits: weight bit-depth, 2..16 (the accelerator preset supports 4..16).
        act_bits: activation bit-depth, 2..16.
        method: retraining for low bits: ``"random_subset"`` or ``"ste"``.
        hardware: :class:`nnlab.nna.NNAConfig` (default the Series2NX-like preset).
        device: where to train (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``).
        seed: seed of every training run.
        quick: quick-mode recipes (fewer epochs); default :func:`nnlab.quick_mode`.
        l1: also run stage 4, the L1-regularisation side branch (off by default: the deployed
            network does not use it, and it is the longest stage of a cold run).
        verbose: print progress.
        budget: also choose per-layer bit-depths and sparsities for one budget on the
            simulated NNA: ``{"budget_bytes": N}``, ``{"budget_energy_uj": E}`` or
            ``{"budget_latency_us": T}`` (see :func:`nnlab.picker.pick_per_layer`).
        train: for a module (or file), train it with :data:`MODULE_RECIPE`
            from its weights first; False: it is already trained and is the
            fp32 baseline as it is.  A registered name is always trained
            (and cached): ``train=False`` is refused for it.
        name: how the report names the model (default:
            the registered name, the ``file.py:function`` text, or the
            module's class name).
        sim_images: None (default): the NNA stage simulates every test
            image.  A positive integer N, at most the size of the test set:
            it simulates N test images drawn at random (seed
            :data:`SIM_IMAGES_SEED`, the same images in every run; the first
            images of a test set may all be of one class), and its accuracy
            is measured on those N only (the stage table's ``test_images``
            column says so).  For large networks on a small machine: the
            simulator takes far longer per image than PyTorch.
        sim_batch_size: test images simulated at once (default
            :data:`SIM_BATCH_SIZE`); only memory and speed depend on it, never
            the results.
        data: a :class:`nnlab.data.DataBundle` to use instead of loading
            ``dataset`` (e.g. ``load_data("mnist", train_limit=1000,
            test_limit=300)`` for a small budget); ``dataset`` and ``source``
            are then taken from it and must be left at their defaults.
            Every stage is cached under the bundle's fingerprint.
        keep_models: True (default): ``result.models`` holds the network of
            every stage.  False: only the deployed ones (the retrained
            network and the integer program); each other stage's network is
            freed once its row of the table is measured.  For large networks
            on a small machine: a ResNet-18 stage holds 45 to 135 MB, up to
            three times its weights while it carries pruning masks.

    Returns:
        A :class:`CompressionResult`; ``settings["model"]`` is ``name``.

    Raises:
        ValueError, TypeError: a bad argument, named, before anything is
            trained; a module that cannot take the data set's images.
        FileNotFoundError, ImportError: a ``file.py:function`` whose file is
            missing or cannot be imported.
        nnlab.graph.GraphError: a model with an operation nnlab cannot
            quantise or compile (the message names the node).
    """

    given = model
    if data is not None:
        if not isinstance(data, DataBundle):
            raise TypeError(f"data must be None or a DataBundle from nnlab.data.load_data, got {type(data).__name__}")
        if dataset != "mnist" or source is not None:
            raise ValueError(f"data is given ({data.name}, {data.source}): leave dataset and source at their "
                             f"defaults, got dataset={dataset!r}, source={source!r}")
        dataset, source = data.name, data.source
    model, sparsity, hardware, dev = check_compress_arguments(
        model, dataset, source=source, sparsity=sparsity, weight_bits=weight_bits, act_bits=act_bits, method=method,
        hardware=hardware, device=device, seed=seed, quick=quick, l1=l1, verbose=verbose, budget=budget,
        train=train, name=name, sim_images=sim_images, sim_batch_size=sim_batch_size, keep_models=keep_models)
    registered = isinstance(model, str)
    if name is None:
        name = given if isinstance(given, str) else type(model).__name__
    quick = config.quick_mode() if quick is None else bool(quick)
    start = time.perf_counter()

    if data is None:
        data = load_data(dataset, source, verbose=verbose)
    test_size = len(data.test.dataset)
    if sim_images is not None and sim_images > test_size:
        raise ValueError(f"sim_images must be None (every test image) or at most the {test_size:,} test images of "
                         f"{dataset} ({data.source}), got {sim_images:,}")
    rows, models = [], {}

    float_figures = {}

    def add(stage, net, *, float_model, bits=(None, None)):
        release_memory()  # what building this stage dropped: a ResNet-18 copy is 45 MB
        if float_model:  # the fp32 accelerator's costs depend only on the architecture: cost it once
            if not float_figures:
                float_figures.update(stage_costs(net.cpu(), data, hardware, float_model=True)[0])
            figures, program, table = float_figures, None, None
        else:
            figures, program, table = stage_costs(net.cpu(), data, hardware)
        rows.append({"stage": stage, "accuracy": accuracy(net, data), "sparsity": prune.sparsity(net),
                     "weight_bits": bits[0] or 32, "act_bits": bits[1] or 32, **figures, "test_images": test_size})
        if keep_models or stage == "retrained low-bit":
            models[stage] = net
        release_memory()  # what costing it traced and compiled, before the next stage is built
        return program, table

    steps = dict(label=name, quick=quick, device=dev, seed=seed, verbose=verbose)
    if registered:
        baseline = pretrained(model, data=data, quick=quick, seed=seed, device=dev, verbose=verbose).cpu()
    else:
        baseline = _module_baseline(model, data, train=train, **steps)
    add("fp32 baseline", baseline, float_model=True)
    add("pruned", prune.core_by_fraction(copy.deepcopy(baseline), sparsity), float_model=True)
    if registered:
        sparse = pretrained_sparse(model, sparsity, data=data, quick=quick, device=dev, seed=seed,
                                   verbose=verbose).cpu()
    else:
        sparse = _module_sparse(baseline, data, sparsity, **steps)
    add("pruned + distilled", sparse, float_model=True)
    if l1:
        l1_net = _l1_branch(baseline, data, sparsity, quick=quick, device=dev, seed=seed, verbose=verbose)
        add("L1 + pruned + distilled", l1_net, float_model=True)
        del l1_net
    teacher = baseline if budget is not None else None  # the budget picker starts from the baseline
    if not keep_models:
        del baseline
    ptq = quant.quantise_model(sparse, data, weight_bits, act_bits)
    add("PTQ", ptq, float_model=False, bits=(weight_bits, act_bits))
    if registered:
        del ptq
        retrained = pretrained_quantised(model, weight_bits, act_bits, method=method, sparsity=sparsity,
                                               data=data, device=dev, seed=seed, quick=quick,
                                               verbose=verbose).cpu()
        del sparse
    else:
        fingerprint, file_label = module_fingerprint(sparse), type(sparse).__name__
        del sparse  # the PTQ network is retrained in place: stage 3 is no longer needed
        to_retrain = copy.deepcopy(ptq) if keep_models else ptq  # keep the PTQ row's network as it was measured
        del ptq
        retrained = _module_retrained(to_retrain, fingerprint, file_label, data, weight_bits, act_bits, method,
                                      **steps).cpu()
        del to_retrain
    program, table = add("retrained low-bit", retrained, float_model=False, bits=(weight_bits, act_bits))

    if sim_images is None:
        images, labels = first_images(data)
    else:
        images, labels = random_images(data, sim_images, seed=SIM_IMAGES_SEED)
    images, labels = images.numpy(), labels.numpy()
    release_memory()
    simulated = simulate(program, images, hardware, batch_size=sim_batch_size)
    nna_acc = 100.0 * float((simulated.predictions == labels).mean())
    agreement = 100.0 * float((simulated.predictions == _predictions(retrained, images, sim_batch_size)).mean())
    overflow = _overflow(program, images, labels, hardware, simulated, nna_acc, batch_size=sim_batch_size)
    if overflow is not None:
        warnings.warn(overflow["message"], nna.AccumulatorOverflowWarning, stacklevel=2)
    table = nna.report(program, hardware, saturations=simulated)
    figures = dict(rows[-1])
    figures.update(stage="NNA (integer)", accuracy=nna_acc, saturated=simulated.saturated, test_images=len(labels))
    rows.append(figures)
    models["NNA (integer)"] = program

    choice = None
    if budget is not None:
        if verbose:
            print(f"Choosing per-layer bit-depths and sparsities for {budget} ...")
        choice = picker.pick_per_layer(teacher, data, **budget, act_bits=act_bits, hardware=hardware, seed=seed,
                                      progress=verbose)

    stages = pd.DataFrame(rows)
    stages["saturated"] = pd.Series([row.get("saturated") for row in rows], dtype=object)
    settings = {"model": name, "dataset": dataset, "source": data.source, "sparsity": sparsity,
                "weight_bits": weight_bits, "act_bits": act_bits, "method": method, "hardware": hardware.name,
                "accumulator_bits": hardware.accumulator_bits, "requantisation": NNA_MODE,
                "trained": bool(registered or train), "device": str(dev), "seed": seed, "quick": quick,
                "budget": budget, "sim_images": sim_images, "sim_batch_size": sim_batch_size,
                "keep_models": keep_models}
    return CompressionResult(stages=stages, settings=settings, models=models, program=program, report=table,
                             data_description=data.description, seconds=time.perf_counter() - start,
                             overflow=overflow, choice=choice, agreement=agreement)


def simulate(program, images, hardware=None, *, batch_size: int = SIM_BATCH_SIZE):
    """Run a compiled program on images in the NNA stage's mode, ``batch_size`` images at a time.

    The engine is run on one batch after another, so its memory depends on
    ``batch_size``, not on the number of images; the result is the one a
    single run on every image gives (the engine computes each image on its
    own): the logits of every image, the saturated sums of each layer added
    over the batches and the widest sum of each layer.

    Args:
        program: a compiled program (:func:`nnlab.nna.compile_model`).
        images: float images ``(N, *input shape)``, a NumPy array.
        hardware: :class:`nnlab.nna.NNAConfig` (default the Series2NX-like
            preset); its accumulator width is the run's.
        batch_size: images per engine run, a positive integer.

    Returns:
        An :class:`nnlab.nna.engine.Result` for all the images (no traced outputs).

    Raises:
        TypeError, ValueError: a bad ``batch_size``, or what :func:`nnlab.nna.run` refuses.
    """
    check_positive_int("batch_size", batch_size)
    hardware = nna.SERIES2NX if hardware is None else hardware
    logits, saturations, sum_bits, int16, width = [], {}, {}, {}, hardware.accumulator_bits
    for start in range(0, max(len(images), 1), batch_size):
        part = nna.run(program, images[start: start + batch_size], NNA_MODE, config=hardware)
        logits.append(part.logits)
        width = part.accumulator_bits
        add_counts((saturations, sum_bits, int16), part)
    return Result(np.concatenate(logits), {}, saturations, sum_bits, width, int16)


def _predictions(model: nn.Module, images, batch_size: int):
    """Top-1 class of each image (NumPy) by a PyTorch model on the CPU, ``batch_size`` images at a time."""
    model = model.cpu().eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[start: start + batch_size])).argmax(1).numpy()
                               for start in range(0, len(images), batch_size)])


def _overflow(program, images, labels, hardware, run, accuracy, *, batch_size: int = SIM_BATCH_SIZE) -> dict | None:
    """What an accumulator overflow cost: None when no sum saturated, else ``CompressionResult.overflow``.

    The simulator runs again with the width the widest sum needed (widening
    it while a run still saturates: after a saturated layer the later ones
    computed on other inputs), which gives the accuracy without overflow.
    """

    if run.saturated == 0:
        return None
    needed, wide_accuracy = run.accumulator_bits_needed, None
    while needed <= MAX_ACCUMULATOR_BITS:
        wide = simulate(program, images, hardware.replace(accumulator_bits=needed), batch_size=batch_size)
        if wide.saturated == 0:
            needed = wide.accumulator_bits_needed  # every sum exact: the width the network needs
            wide_accuracy = 100.0 * float((wide.predictions == labels).mean())
            break
        needed = max(needed + 1, wide.accumulator_bits_needed)
    layers = {name: count for name, count in run.saturations.items() if count}
    message = nna.overflow_message(run.saturations, run.accumulator_bits, needed, images=len(images))
    if wide_accuracy is not None:
        message += (f"; the simulated accuracy is {accuracy:.2f}% with the {run.accumulator_bits}-bit accumulator "
                    f"and {wide_accuracy:.2f}% with {needed} bits")
    return {"saturated": run.saturated, "layers": layers, "images": len(images),
            "accumulator_bits": run.accumulator_bits, "accumulator_bits_needed": needed, "accuracy": accuracy,
            "accuracy_without_overflow": wide_accuracy, "message": message}
