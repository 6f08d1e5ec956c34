"""Benchmark of the NNA simulator: exactness, agreement, speed, and what compression buys on the accelerator.

On LeNet-5 and the offline MNIST test set (1,000 images), one thread:

* ``torch_int8_mismatches``: output integers, summed over every layer and
  image, where the simulator differs from PyTorch's own int8 model (eager
  ``torch.ao.quantization`` flow, x86 backend); the target is 0;
* ``agreement_fakequant``: share (percent) of test images where the
  simulator's top-1 class equals the PyTorch fake-quantised model's, for the
  compressed network (95% sparse by pruning and distillation, 4-bit weights
  by random-subset retraining, 8-bit activations);
* ``accuracy_fp32`` / ``accuracy_nna``: test accuracy of the fp32 dense
  network and of the compressed one run by the simulator (percent);
* ``fp32_bytes`` / ``packed_bytes`` / ``compression``, ``energy_fp32_uj`` /
  ``energy_nna_uj`` / ``energy_ratio``: from :func:`nnlab.nna.report` on the
  Series2NX-like preset against fp32 dense on the same accelerator;
* ``entropy_bytes`` / ``compression_entropy`` / ``energy_entropy_uj`` /
  ``latency_entropy_us``: the same program with Huffman-coded weights where
  they are smaller (:data:`nnlab.nna.SERIES2NX_HUFFMAN`, decoding included),
  and ``latency_nna_us`` without them;
* ``sim_images_per_s`` / ``torch_fp32_images_per_s`` / ``speed_ratio``: the
  simulator against PyTorch fp32 eager inference of the same LeNet-5, batch
  256, one thread, best of interleaved repeats in one run;
* ``widget_update_seconds``: median update of the NNA explorer (one thread).

``models``: one entry per network (LeNet-5, the MobileNetV2-style and the
small ResNet networks; with ``--torchvision`` also torchvision's ``resnet18``
and ``mobilenet_v2`` adapted to MNIST), each trained with its recipe (cached),
quantised after training (PTQ, no pruning) to 8-bit weights (per channel)
and 8-bit activations and compiled for the simulator; over the 1,000 test
images:

* ``agreement_fakequant``: top-1 agreement (percent) of the simulator
  (``"torch"`` requantisation mode) with the PyTorch fake-quantised model it
  was compiled from; ``agreement_fakequant_integer``: the same for the
  ``"integer"`` mode (fixed-point multipliers, as an accelerator computes);
* ``torch_int8_mismatches``: output integers that differ from PyTorch's own
  int8 model of the same float network, or None when nnlab's import of
  PyTorch's int8 flow does not cover the network (``torch_int8_note`` says why);
* ``accuracy_fp32``, ``accuracy_fakequant``, ``accuracy_nna`` (``"torch"``
  mode), ``accuracy_nna_integer`` and ``accuracy_drop_pp`` (fp32 minus
  ``accuracy_nna``), percent;
* ``compression`` and ``energy_ratio``: fp32 dense against the 8/8 program on
  the Series2NX-like preset (:func:`nnlab.nna.report`);
* ``sim_images_per_s`` / ``torch_fp32_images_per_s``: the simulator against
  PyTorch fp32 eager inference of the float network, batch 256, one thread;
* with ``--grid``, ``agreement_grid``: the top-1 agreement of simulator and
  fake-quantised model at each of 8, 5 and 4-bit weights with 8 and 4-bit
  activations (``"w5a4"`` ...), PTQ, over the same images.

PyTorch's int8 models come from its graph-mode flow (``quantize_fx``, x86).

Usage::

    python benchmarks/nna.py [--quick] [--json] [--torchvision] [--models-only] [--grid]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread for NumPy's BLAS too
    os.environ.setdefault(_var, "1")


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _images_per_s(program, base, data, rounds: int, repeats: int) -> tuple[float, float]:
    """Simulator and PyTorch fp32 images/s on the first 256 test images, one thread, interleaved rounds."""
    import torch

    from nnlab import nna

    x = torch.cat([xb for xb, _ in data.test])[:256]
    x_np = x.numpy()
    sim_times, torch_times = [], []
    with torch.no_grad():
        base(x)
        nna.run(program, x_np)
        for _ in range(rounds):
            sim_times.append(_best_seconds(lambda: nna.run(program, x_np), repeats))
            torch_times.append(_best_seconds(lambda: base(x), repeats))
    return len(x) / min(sim_times), len(x) / min(torch_times)


#: The networks of the ``models`` section; the torchvision ones with ``--torchvision``.
MODELS = ("lenet5", "mobilenet-mnist", "resnet-mnist")
TORCHVISION = ("torchvision:resnet18", "torchvision:mobilenet_v2")


#: The bit-depths of ``agreement_grid``: (weight bits, activation bits).
GRID = ((8, 8), (8, 4), (5, 8), (5, 4), (4, 8), (4, 4))


def model_figures(name: str, data, *, weight_bits: int = 8, act_bits: int = 8, repeats: int = 3,
                  grid: bool = False) -> dict:
    """The ``models`` entry of one network: agreement, exactness, accuracy, costs and speed at 8/8 PTQ."""
    import torch

    import nnlab
    from nnlab import nna

    start = time.perf_counter()
    base = nnlab.cache.pretrained(name, data=data, verbose=False)
    accuracy_fp32 = nnlab.train.accuracy(base, data)
    qmodel = nnlab.quant.quantise_model(base, data, weight_bits, act_bits)
    program = nna.compile_model(qmodel, data.input_shape, name=f"{name} w{weight_bits}a{act_bits}")
    agree = nna.agreement(program, qmodel, data, mode="torch")
    agree_int = nna.agreement(program, qmodel, data, mode="integer")
    summary = nna.headline(nna.report(program, nna.SERIES2NX))

    # PyTorch's own int8 flow, where nnlab's import covers the network.
    mismatches, note = None, None
    engine_before = torch.backends.quantized.engine
    try:
        qint8 = nna.quantise_torch_int8(base, data, flow="fx")
        table = nna.compare_torch_int8(nna.compile_torch_int8(qint8), qint8, data)
        mismatches = int(table.attrs["total"])
    except (TypeError, ValueError, NotImplementedError) as exc:
        note = f"not covered by nnlab.nna.quantise_torch_int8: {type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        torch.backends.quantized.engine = engine_before

    sim_ips, torch_ips = _images_per_s(program, base, data, repeats, 2)
    agreement_grid = {}
    for wb, ab in GRID if grid else ():
        q = nnlab.quant.quantise_model(base, data, wb, ab)
        agreement_grid[f"w{wb}a{ab}"] = nna.agreement(nna.compile_model(q, data.input_shape), q, data)["agreement"]
    return {
        "weight_bits": weight_bits, "act_bits": act_bits, "quantisation": "ptq, weights per channel",
        "agreement_grid": agreement_grid or None,
        "agreement_fakequant": agree["agreement"],
        "agreement_fakequant_integer": agree_int["agreement"],
        "torch_int8_mismatches": mismatches,
        "torch_int8_note": note,
        "accuracy_fp32": accuracy_fp32,
        "accuracy_fakequant": agree["accuracy_torch"],
        "accuracy_nna": agree["accuracy_nna"],
        "accuracy_nna_integer": agree_int["accuracy_nna"],
        "accuracy_drop_pp": accuracy_fp32 - agree["accuracy_nna"],
        "compression": summary["compression"],
        "energy_ratio": summary["energy_ratio"],
        "sim_images_per_s": sim_ips,
        "torch_fp32_images_per_s": torch_ips,
        "saturations": agree["saturations"],
        "images": agree["n"],
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("--torchvision", action="store_true",
                        help="also torchvision's resnet18 and mobilenet_v2 in the models section (minutes more)")
    parser.add_argument("--models-only", action="store_true", help="only the models section")
    parser.add_argument("--grid", action="store_true",
                        help="also the agreement at 8, 5 and 4-bit weights with 8 and 4-bit activations per model")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"

    import torch

    import nnlab
    from nnlab import nna, pick
    from nnlab.widgets.nna import NNAExplorer

    start = time.perf_counter()
    nnlab.set_threads(1)
    data = nnlab.data.load_data(verbose=False)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # with --json, stdout is the JSON only
    names = MODELS + (TORCHVISION if args.torchvision else ())
    models = {}
    for name in names:
        models[name] = model_figures(name, data, repeats=pick(full=5, quick=3), grid=args.grid)
        say(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in models[name].items()))
    if args.models_only:
        results = {"models": models, "quick": nnlab.quick_mode(), "seconds": time.perf_counter() - start}
        if args.json:
            print(json.dumps(results))
        return results

    base = nnlab.cache.pretrained("lenet5", data=data, verbose=False)
    accuracy_fp32 = nnlab.train.accuracy(base, data)

    # PyTorch's own int8 model: the simulator must reproduce every integer.
    engine_before = torch.backends.quantized.engine
    qint8 = nna.quantise_torch_int8(base, data)
    mismatches = nna.compare_torch_int8(nna.compile_torch_int8(qint8), qint8, data)
    torch.backends.quantized.engine = engine_before

    # The compressed network: pruned (distillation) and quantised (random-subset retraining).
    sparsity, weight_bits = 0.95, 4
    qmodel = nnlab.recipes.pretrained_quantised("lenet5", weight_bits=weight_bits, act_bits=8, sparsity=sparsity,
                                              data=data, verbose=False)
    program = nna.compile_model(qmodel, name=f"LeNet-5 {sparsity:.0%} sparse, {weight_bits}-bit")
    agree = nna.agreement(program, qmodel, data)
    summary = nna.headline(nna.report(program, nna.SERIES2NX))
    entropy = nna.headline(nna.report(program, nna.SERIES2NX_HUFFMAN))

    # Speed: batch 256, one thread, interleaved so that both see the same machine load.
    sim_ips, torch_ips = _images_per_s(program, base, data, pick(full=7, quick=3), 3)

    # The explorer: from the same sparse network compiled at 16-bit weights.
    wide = nna.compile_model(nnlab.quant.quantise_model(nnlab.recipes.pretrained_sparse(
        "lenet5", sparsity, data=data, verbose=False), data, 16, 8))
    explorer = NNAExplorer(wide, data)
    explorer.update()
    updates = [explorer.update(bits={"fc1": b, "conv1": 8 - (b % 3)})["seconds"] for b in (4, 5, 6, 7, 8, 5, 4)]

    results = {
        "agreement_fakequant": agree["agreement"],
        "torch_int8_mismatches": int(mismatches.attrs["total"]),
        "sim_images_per_s": sim_ips,
        "torch_fp32_images_per_s": torch_ips,
        "speed_ratio": sim_ips / torch_ips,
        "fp32_bytes": summary["fp32_bytes"],
        "packed_bytes": summary["storage_bytes"],
        "compression": summary["compression"],
        "entropy_bytes": entropy["storage_bytes"],
        "compression_entropy": entropy["compression"],
        "energy_entropy_uj": entropy["energy_uj"],
        "latency_nna_us": summary["latency_us"],
        "latency_entropy_us": entropy["latency_us"],
        "energy_fp32_uj": summary["fp32_energy_uj"],
        "energy_nna_uj": summary["energy_uj"],
        "energy_ratio": summary["energy_ratio"],
        "accuracy_fp32": accuracy_fp32,
        "accuracy_nna": agree["accuracy_nna"],
        "accuracy_fakequant": agree["accuracy_torch"],
        "widget_update_seconds": statistics.median(updates),
        "models": models,
        "quick": nnlab.quick_mode(),
        "seconds": time.perf_counter() - start,
    }
    say(mismatches.to_string(index=False))
    for key, value in results.items():
        if key == "models":
            continue
        say(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
