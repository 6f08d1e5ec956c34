"""Benchmark of the reduction chapter: LeNet-5 accuracy against weight bit-depth, three ways.

For weight bit-depths 16, 8, 7, 6, 5, 4, 3 and 2, with 8-bit activations and
per-tensor weight scales (max |w|: the textbook grid), it measures the test
accuracy

* after post-training quantisation (no retraining);
* after standard quantisation-aware training (straight-through estimator on
  every weight);
* after random-subset retraining (a growing random subset of quantised
  weights, then every weight clamped to its level).

It also times one training step (batch 64, one thread, median of many,
fp32 and QAT interleaved so that both see the same machine load) and one
update of the bit-depth explorer.

Usage::

    python benchmarks/reduction.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time



def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"

    import torch

    import nnlab
    from nnlab import pick, quant
    from nnlab.cache import pretrained
    from nnlab.data import load_data
    from nnlab.train import accuracy, time_training_steps
    from nnlab.widgets import bit_explorer

    start = time.perf_counter()
    nnlab.set_threads(1)
    bits_list = [16, 8, 7, 6, 5, 4, 3, 2]
    act_bits, granularity = 8, "per_tensor"
    epochs = pick(full=3, quick=1)
    data = load_data(verbose=not args.json)
    base = pretrained("lenet5", data=data, verbose=not args.json)
    fp32_acc = accuracy(base, data)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"fp32 accuracy {fp32_acc:.1f}%  (retraining: {epochs} epochs, {granularity} weight scales, "
        f"{act_bits}-bit activations)")

    acc = {"ptq": [], "ste": [], "random_subset": []}
    for bits in bits_list:
        q = quant.quantise_model(base, data, bits, act_bits, granularity=granularity)
        acc["ptq"].append(accuracy(q, data))
        for method in ("ste", "random_subset"):
            q = quant.quantise_model(base, data, bits, act_bits, granularity=granularity)
            quant.retrain(q, data, epochs, method=method, progress=False)
            acc[method].append(accuracy(q, data))
        say(f"{bits:2d} bits: PTQ {acc['ptq'][-1]:5.1f}%  STE {acc['ste'][-1]:5.1f}%  "
            f"random subset {acc['random_subset'][-1]:5.1f}%")

    batch = next(iter(data.train))
    qat = quant.quantise_model(base, data, 4, act_bits, granularity=granularity)
    for layer in quant.weight_layers(qat).values():
        quant.weight_quantiser(layer).track = True  # as during retraining: the grid follows the weights
    steps = time_training_steps({"fp32": copy.deepcopy(base), "qat": qat}, batch, rounds=30, warmup=1)
    say(f"one training step (batch 64, 1 thread): fp32 {1e3 * steps['fp32']:.2f} ms, "
        f"QAT {1e3 * steps['qat']:.2f} ms ({steps['qat'] / steps['fp32']:.2f}x)")

    explorer = bit_explorer(base, data)
    settings = [(8, 8, "conv1"), (4, 8, "conv2"), (3, 6, "fc1"), (2, 4, "fc3"), (6, 8, "fc2"), (5, 5, "conv1"), (7, 8, "conv2")]
    times = [explorer.update(weight_bits=w, act_bits=a, layer=l)["seconds"] for w, a, l in settings]
    widget_seconds = statistics.median(times)
    say(f"bit explorer update: median {widget_seconds:.3f} s")

    result = {
        "fp32_acc": fp32_acc, "bits": bits_list, "act_bits": act_bits, "granularity": granularity,
        "epochs": epochs, "acc_ptq": acc["ptq"], "acc_qat_ste": acc["ste"],
        "acc_qat_random_subset": acc["random_subset"],
        "step_seconds_fp32": steps["fp32"], "step_seconds_qat": steps["qat"],
        "qat_step_ratio": steps["qat"] / steps["fp32"],
        "widget_update_seconds": widget_seconds,
        "quick": nnlab.quick_mode(), "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
