"""The whole method in one call: baseline -> eliminate -> reduce -> deploy on the NNA simulator.

:func:`compress` runs every stage of METHOD.md section 4 on one model and
returns a :class:`CompressionResult`: one table with a row per stage
(accuracy, sparsity, bit-depths, storage bytes, energy and latency per
inference) and the artefacts (models, compiled program, cost report).
Notebook 07 and the ``nnlab compress`` command are thin layers over it.

Stages, each starting from the previous one's network unless said otherwise:

1. ``fp32 baseline``: the trained dense network (:func:`nnlab.cache.pretrained`);
2. ``pruned``: fraction coring to the target sparsity, no retraining;
3. ``pruned + distilled``: coring and distillation alternated
   (:func:`nnlab.distill.pretrained_sparse`);
4. ``L1 + pruned + distilled``: the baseline first retrained with an L1
   penalty, then cored and distilled the same way (a side branch: it shows
   what L1 adds);
5. ``PTQ``: stage 3 quantised after training (:func:`nnlab.quant.quantise_model`);
6. ``retrained low-bit``: stage 3 quantised and retrained
   (:func:`nnlab.quant.pretrained_quantised`);
7. ``NNA (integer)``: stage 6 compiled (:func:`nnlab.nna.compile_model`) and
   run by the integer engine on the test set, with the accelerator's
   accumulator width (``hardware.accumulator_bits``).

Overflow is a figure, never a secret: the stage table's ``saturated``
column counts the sums of the NNA stage that overflowed the accumulator and
were saturated (None for the other stages, which have no accumulator), the
cost report adds them per layer, and when any occurred :func:`compress`
warns (:class:`nnlab.nna.AccumulatorOverflowWarning`) with the layers, the
accumulator width that holds every sum and the accuracy the simulator gives
with it (``CompressionResult.overflow``).

Costs: the float stages are costed on the fp32 baseline accelerator
(:data:`nnlab.nna.FP32_BASELINE`: dense float32 storage, no zero
skipping, so pruning alone buys nothing there until the weights are
encoded); the quantised stages on the chosen accelerator (default the
Series2NX-like preset), from the same compiled program the simulator runs.
Every stage is cached, so a second run takes seconds.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import pandas as pd
from torch import nn

from . import config
from ._args import check_choice, check_float, check_int
from .cache import RECIPES, cached, pretrained
from .data import DATASETS, first_images, load_data
from .models import upgrade_state_dict
from .train import accuracy, resolve_device

__all__ = ["STAGES", "CompressionResult", "compress", "stage_costs"]

STAGES = ("fp32 baseline", "pruned", "pruned + distilled", "L1 + pruned + distilled", "PTQ",
          "retrained low-bit", "NNA (integer)")

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
            for the others).
        settings: the arguments of the run.
        models: the network of each stage (by stage name).
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
    """

    stages: pd.DataFrame
    settings: dict
    models: dict = field(repr=False)
    program: object = field(repr=False)
    report: pd.DataFrame = field(repr=False)
    data_description: str = ""
    seconds: float = 0.0
    overflow: dict | None = None

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
    from . import nna, quant

    hardware = nna.SERIES2NX if hardware is None else hardware
    if float_model:
        structure = quant.quantise_model(model, data, 8, 8)
        program = nna.compile_model(structure, data.input_shape)
        table = nna.report(program, hardware.as_fp32())
    else:
        program = nna.compile_model(model, data.input_shape)
        table = nna.report(program, hardware)
    s = nna.summary(table)
    figures = {"storage_bytes": s["storage_bytes"], "energy_uj": s["energy_uj"], "latency_us": s["latency_us"],
               "compression": s["compression"], "energy_ratio": s["energy_ratio"], "hardware": s["config"]}
    return figures, program, table


def _l1_branch(teacher, data, sparsity, *, quick, device, seed, verbose):
    """Stage 4: L1-regularised distillation, then coring and distillation to ``sparsity`` (cached)."""
    from . import distill, prune, regularize

    pick = 1 if quick else 0
    recipe = {**distill.RECIPE, "steps": distill.RECIPE["steps"][pick],
              "epochs_per_step": distill.RECIPE["epochs_per_step"][pick]}
    l1 = {**L1_RECIPE, "epochs": L1_RECIPE["epochs"][pick]}
    spec = {"teacher": teacher.nnlab_metrics, "data": data.fingerprint, "sparsity": sparsity, "recipe": recipe,
            "l1": l1, "seed": seed}

    def build():
        if verbose:
            print(f"L1 branch: {l1['epochs']} epochs with an L1 penalty, then coring to {sparsity:.0%} "
                  f"(done once, then cached) ...")
        student = copy.deepcopy(teacher)
        distill.distill(student, teacher, data, l1["epochs"], lr=l1["lr"], penalty=regularize.l1_penalty(
            l1["strength"]), device=device, seed=seed, progress=verbose, desc="L1")
        distill.prune_and_distill(student, teacher, data, target=sparsity, steps=recipe["steps"],
                                  epochs_per_step=recipe["epochs_per_step"], T=recipe["T"], alpha=recipe["alpha"],
                                  lr=recipe["lr"], scope=recipe["scope"], device=device, seed=seed,
                                  progress=verbose)
        student.to("cpu")
        return {"state_dict": student.state_dict(), "metrics": {"top1": accuracy(student, data)}}

    def restore(payload):
        student = copy.deepcopy(teacher)
        state = upgrade_state_dict(student, payload["state_dict"])
        masks = {k[: -len(".weight_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")}
        prune.apply_masks(student, masks)
        student.load_state_dict(state)
        return student

    name = f"l1-sparse{round(100 * sparsity)}-{data.name}-{data.source}"
    payload = cached(name, spec, build, validate=restore, verbose=verbose)
    return restore(payload).eval()


def compress(
    model: str = "lenet5",
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
    l1_branch: bool = True,
    verbose: bool = True,
) -> CompressionResult:
    """Run baseline -> prune -> distill -> (L1) -> PTQ -> retrain -> NNA, and cost every stage.

    Args:
        model: a model with a training recipe (:data:`nnlab.cache.RECIPES`).
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
        l1_branch: also run stage 4 (L1 regularisation).
        verbose: print progress.

    Returns:
        A :class:`CompressionResult`.
    """
    from . import nna, prune, quant
    from ._preflight import check_compress_arguments
    from .distill import pretrained_sparse

    sparsity, hardware, dev = check_compress_arguments(
        model, dataset, source=source, sparsity=sparsity, weight_bits=weight_bits, act_bits=act_bits, method=method,
        hardware=hardware, device=device, seed=seed, quick=quick, l1_branch=l1_branch, verbose=verbose)
    quick = config.quick_mode() if quick is None else bool(quick)
    start = time.perf_counter()

    data = load_data(dataset, source, verbose=verbose)
    rows, models = [], {}

    float_figures = {}

    def add(stage, net, *, float_model, bits=(None, None)):
        if float_model:  # the fp32 accelerator's costs depend only on the architecture: cost it once
            if not float_figures:
                float_figures.update(stage_costs(net.cpu(), data, hardware, float_model=True)[0])
            figures, program, table = float_figures, None, None
        else:
            figures, program, table = stage_costs(net.cpu(), data, hardware)
        rows.append({"stage": stage, "accuracy": accuracy(net, data), "sparsity": prune.sparsity(net),
                     "weight_bits": bits[0] or 32, "act_bits": bits[1] or 32, **figures})
        models[stage] = net
        return program, table

    baseline = pretrained(model, data=data, quick=quick, seed=seed, device=dev, verbose=verbose).cpu()
    add("fp32 baseline", baseline, float_model=True)
    cored = prune.core_by_fraction(copy.deepcopy(baseline), sparsity)
    add("pruned", cored, float_model=True)
    sparse = pretrained_sparse(model, sparsity, data=data, quick=quick, device=dev, seed=seed,
                               verbose=verbose).cpu()
    add("pruned + distilled", sparse, float_model=True)
    if l1_branch:
        l1 = _l1_branch(baseline, data, sparsity, quick=quick, device=dev, seed=seed, verbose=verbose)
        add("L1 + pruned + distilled", l1, float_model=True)
    ptq = quant.quantise_model(sparse, data, weight_bits, act_bits)
    add("PTQ", ptq, float_model=False, bits=(weight_bits, act_bits))
    retrained = quant.pretrained_quantised(model, weight_bits, act_bits, method=method, sparsity=sparsity,
                                           data=data, device=dev, seed=seed, quick=quick,
                                           verbose=verbose).cpu()
    program, table = add("retrained low-bit", retrained, float_model=False, bits=(weight_bits, act_bits))

    images, labels = first_images(data)
    simulated = nna.run(program, images.numpy(), config=hardware)
    nna_acc = 100.0 * float((simulated.predictions == labels.numpy()).mean())
    overflow = _overflow(program, images.numpy(), labels.numpy(), hardware, simulated, nna_acc)
    if overflow is not None:
        warnings.warn(overflow["message"], nna.AccumulatorOverflowWarning, stacklevel=2)
    table = nna.report(program, hardware, saturations=simulated)
    figures = dict(rows[-1])
    figures.update(stage="NNA (integer)", accuracy=nna_acc, saturated=simulated.saturated)
    rows.append(figures)
    models["NNA (integer)"] = program

    stages = pd.DataFrame(rows)
    stages["saturated"] = pd.Series([row.get("saturated") for row in rows], dtype=object)
    settings = {"model": model, "dataset": dataset, "source": data.source, "sparsity": sparsity,
                "weight_bits": weight_bits, "act_bits": act_bits, "method": method, "hardware": hardware.name,
                "accumulator_bits": hardware.accumulator_bits,
                "device": str(dev), "seed": seed, "quick": quick}
    return CompressionResult(stages=stages, settings=settings, models=models, program=program, report=table,
                             data_description=data.description, seconds=time.perf_counter() - start,
                             overflow=overflow)


def _overflow(program, images, labels, hardware, run, accuracy) -> dict | None:
    """What an accumulator overflow cost: None when no sum saturated, else ``CompressionResult.overflow``.

    The simulator runs again with the width the widest sum needed (widening
    it while a run still saturates: after a saturated layer the later ones
    computed on other inputs), which gives the accuracy without overflow.
    """
    from . import nna
    from .nna.engine import MAX_ACCUMULATOR_BITS

    if run.saturated == 0:
        return None
    needed, wide_accuracy = run.accumulator_bits_needed, None
    while needed <= MAX_ACCUMULATOR_BITS:
        wide = nna.run(program, images, config=hardware.replace(accumulator_bits=needed))
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
