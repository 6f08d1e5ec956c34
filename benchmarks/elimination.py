"""Benchmark of the elimination chapter: LeNet-5 accuracy against sparsity, three ways.

For sparsities 0, 0.5, 0.7, 0.8, 0.9 and 0.95 (global fraction coring) it
measures the test accuracy

* without retraining (the dense network cored in one shot);
* with distillation retraining (coring and distillation alternate up the same
  sparsities; teacher = the dense network);
* with L1 regularisation first (a few epochs of distillation with an L1
  penalty), then the same coring and distillation (and, for reference, the
  L1-trained network cored without retraining: ``acc_l1_no_retrain``).

Full mode averages the retrained curves over several seeds (test accuracy on
1,000 images moves in steps of 0.1 pp).  It also times one update of the
coring explorer on one thread (median).

Usage::

    python benchmarks/elimination.py [--quick] [--json] [--seeds N]
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
    parser.add_argument("--seeds", type=int, default=None, help="retraining seeds to average (full 3, quick 1)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"

    import torch

    import nnlab
    from nnlab import pick
    from nnlab.cache import pretrained
    from nnlab.data import load_data
    from nnlab.distill import distill, prune_and_distill
    from nnlab.prune import core_by_fraction
    from nnlab.regularise import l1_penalty, share_near_zero
    from nnlab.train import accuracy
    from nnlab.widgets import coring_explorer

    start = time.perf_counter()
    seeds = args.seeds if args.seeds is not None else pick(full=3, quick=1)
    if seeds < 1:
        parser.error("--seeds must be a positive integer")
    sparsities = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]
    epochs_per_step = pick(full=2, quick=1)
    l1_strength, l1_epochs = 1e-3, pick(full=4, quick=1)

    data = load_data(verbose=not args.json)
    teacher = pretrained("lenet5", data=data, verbose=not args.json)
    dense_acc = accuracy(teacher, data)

    no_retrain = []
    for s in sparsities:
        net = core_by_fraction(copy.deepcopy(teacher), s, scope="global")
        no_retrain.append(accuracy(net, data))

    retrain_runs, l1_runs, l1_no_retrain, near_zero_l1 = [], [], [], []
    for seed in range(seeds):
        student = copy.deepcopy(teacher)
        table = prune_and_distill(student, teacher, data, sparsities=sparsities[1:],
                                  epochs_per_step=epochs_per_step, seed=seed, progress=False)
        retrain_runs.append([dense_acc] + table["acc_retrained"].tolist())

        student = copy.deepcopy(teacher)
        distill(student, teacher, data, l1_epochs, penalty=l1_penalty(l1_strength), seed=seed, progress=False)
        near_zero_l1.append(share_near_zero(student))
        l1_acc = accuracy(student, data)
        l1_no_retrain.append([accuracy(core_by_fraction(copy.deepcopy(student), s), data) for s in sparsities])
        table = prune_and_distill(student, teacher, data, sparsities=sparsities[1:],
                                  epochs_per_step=epochs_per_step, seed=seed, progress=False)
        l1_runs.append([l1_acc] + table["acc_retrained"].tolist())

    def mean(runs):
        return [round(statistics.fmean(col), 2) for col in zip(*runs)]

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    explorer = coring_explorer(teacher, data)
    moves = [("fraction", v, scope, layer) for v in (0.3, 0.6, 0.9, 0.95) for scope in ("global", "layer")
             for layer in ("all layers", "fc1")] + [("threshold", t, "global", "all layers") for t in (0.01, 0.05, 0.1)]
    times = [explorer.update(mode=m, value=v, scope=s, layer=layer)["seconds"] for m, v, s, layer in moves]
    torch.set_num_threads(torch_threads)

    result = {
        "dense_acc": dense_acc,
        "sparsity": sparsities,
        "acc_no_retrain": no_retrain,
        "acc_retrain": mean(retrain_runs),
        "acc_l1_retrain": mean(l1_runs),
        "acc_l1_no_retrain": mean(l1_no_retrain),
        "acc_retrain_per_seed": retrain_runs,
        "acc_l1_retrain_per_seed": l1_runs,
        "near_zero_share": {"dense": share_near_zero(teacher), "after_l1": statistics.fmean(near_zero_l1)},
        "recipe": {"scope": "global", "epochs_per_step": epochs_per_step, "l1_strength": l1_strength,
                   "l1_epochs": l1_epochs, "seeds": seeds},
        "widget_update_seconds": statistics.median(times),
        "quick": nnlab.quick_mode(),
        "seconds": time.perf_counter() - start,
    }

    # With --json, stdout carries only the JSON document; the readable lines go to stderr.
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"LeNet-5, {data.description}")
    say(f"dense accuracy {dense_acc:.1f}%  ({'quick' if result['quick'] else 'full'} mode, "
          f"{seeds} seed(s) for the retrained curves)")
    say(f"{'sparsity':>9} {'no retrain':>11} {'distilled':>10} {'L1, no retrain':>15} {'L1+distilled':>13}")
    for s, a, b, c, d in zip(sparsities, no_retrain, result["acc_retrain"], result["acc_l1_no_retrain"],
                             result["acc_l1_retrain"]):
        say(f"{s:>9.0%} {a:>10.1f}% {b:>9.2f}% {c:>14.2f}% {d:>12.2f}%")
    say(f"share of weights with |w| < 1e-3: dense {result['near_zero_share']['dense']:.1%}, "
          f"after L1 {result['near_zero_share']['after_l1']:.1%}")
    say(f"coring explorer: median update {result['widget_update_seconds'] * 1000:.0f} ms on one thread")
    say(f"total {result['seconds']:.1f} s")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
