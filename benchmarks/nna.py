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
* ``sim_images_per_s`` / ``torch_fp32_images_per_s`` / ``speed_ratio``: the
  simulator against PyTorch fp32 eager inference of the same LeNet-5, batch
  256, one thread, best of interleaved repeats in one run;
* ``widget_update_seconds``: median update of the NNA explorer (one thread).

Usage::

    python benchmarks/nna.py [--quick] [--json]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
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
    base = nnlab.cache.pretrained("lenet5", data=data, verbose=False)
    accuracy_fp32 = nnlab.train.accuracy(base, data)

    # PyTorch's own int8 model: the simulator must reproduce every integer.
    engine_before = torch.backends.quantized.engine
    qint8 = nna.quantise_torch_int8(base, data)
    mismatches = nna.compare_torch_int8(nna.compile_torch_int8(qint8), qint8, data)
    torch.backends.quantized.engine = engine_before

    # The compressed network: pruned (distillation) and quantised (random-subset retraining).
    sparsity, weight_bits = 0.95, 4
    qmodel = nnlab.quant.pretrained_quantised("lenet5", weight_bits=weight_bits, act_bits=8, sparsity=sparsity,
                                              data=data, verbose=False)
    program = nna.compile_model(qmodel, name=f"LeNet-5 {sparsity:.0%} sparse, {weight_bits}-bit")
    agree = nna.agreement(program, qmodel, data)
    summary = nna.summary(nna.report(program, nna.SERIES2NX))

    # Speed: batch 256, one thread, interleaved so that both see the same machine load.
    x = torch.cat([xb for xb, _ in data.test])[:256]
    x_np = x.numpy()
    sim_times, torch_times = [], []
    with torch.no_grad():
        base(x)
        nna.run(program, x_np)
        for _ in range(pick(full=7, quick=3)):
            sim_times.append(_best_seconds(lambda: nna.run(program, x_np), 3))
            torch_times.append(_best_seconds(lambda: base(x), 3))
    sim_ips, torch_ips = len(x) / min(sim_times), len(x) / min(torch_times)

    # The explorer: from the same sparse network compiled at 16-bit weights.
    wide = nna.compile_model(nnlab.quant.quantise_model(nnlab.distill.pretrained_sparse(
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
        "energy_fp32_uj": summary["fp32_energy_uj"],
        "energy_nna_uj": summary["energy_uj"],
        "energy_ratio": summary["energy_ratio"],
        "accuracy_fp32": accuracy_fp32,
        "accuracy_nna": agree["accuracy_nna"],
        "accuracy_fakequant": agree["accuracy_torch"],
        "widget_update_seconds": statistics.median(updates),
        "quick": nnlab.quick_mode(),
        "seconds": time.perf_counter() - start,
    }
    # With --json, stdout carries only the JSON document; the readable lines go to stderr.
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(mismatches.to_string(index=False))
    for key, value in results.items():
        say(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
