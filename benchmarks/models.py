"""Benchmark of the model zoo: size, cost, training speed on one core and accuracy.

For LeNet-5 (the reference) and the networks embedded inference ships
(``mobilenet-mnist``, ``resnet-mnist``, ``torchvision:resnet18``,
``torchvision:mobilenet_v2``, all on 28x28 digits), it prints

* parameters, MACs and activations per image (``nnlab.models.summary``);
* the median time of one training step (batch 64, one thread; the models
  take turns so that a change in the machine's load hits them alike) and
  the time of one epoch over the 4,000 offline training images it implies;
* with ``--train``: the test accuracy (offline MNIST, 1,000 images) and the
  measured training time per epoch of the cached model that
  ``nnlab.cache.pretrained`` trains with the model's recipe (full mode, or
  quick mode with ``--quick``); models not yet in the cache are trained,
  which takes minutes for the torchvision networks.

Usage::

    python benchmarks/models.py [--quick] [--train] [--models a,b,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEFAULT_MODELS = ("lenet5", "mobilenet-mnist", "resnet-mnist", "torchvision:resnet18", "torchvision:mobilenet_v2")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--train", action="store_true", help="also train (or load) each model and test it")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of training steps per model")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"

    import torch

    import nnlab
    from nnlab.cache import RECIPES, pretrained
    from nnlab.data import load_data
    from nnlab.models import build_model, data_kwargs, summary
    from nnlab.train import time_training_steps

    names = [n for n in args.models.split(",") if n]
    for name in names:
        if name not in RECIPES:
            parser.error(f"--models: {name!r} has no recipe; choose from {', '.join(RECIPES)}")
    start = time.perf_counter()
    nnlab.set_threads(1)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    data = load_data(verbose=not args.json)
    shape = tuple(data.input_shape)
    x, y = next(iter(data.train))
    steps_per_epoch = math.ceil(len(data.train.dataset) / x.shape[0])

    models, rows = {}, {}
    for name in names:
        torch.manual_seed(0)
        net = build_model(name, num_classes=data.num_classes, **data_kwargs(name, shape))
        total = summary(net, shape).iloc[-1]
        rows[name] = {"params": int(total["params"]), "macs": int(total["macs"]),
                      "activations": int(total["activations"])}
        models[name] = net
    step = time_training_steps(models, (x, y), rounds=args.rounds, steps=2, warmup=1)
    for name in names:
        rows[name]["step_ms"] = 1e3 * step[name]
        rows[name]["epoch_seconds_from_steps"] = step[name] * steps_per_epoch
        say(f"{name:26s} {rows[name]['params']:>11,} params {rows[name]['macs']:>12,} MACs "
            f"{rows[name]['activations']:>8,} activations | step (batch {x.shape[0]}, 1 thread) "
            f"{rows[name]['step_ms']:7.1f} ms -> {rows[name]['epoch_seconds_from_steps']:6.1f} s per epoch")
    if args.train:
        for name in names:
            net = pretrained(name, data=data, verbose=not args.json)
            m = net.nnlab_metrics
            rows[name].update(top1=m["top1"], epochs=m["epochs"], train_seconds=m["train_seconds"],
                              epoch_seconds=m["train_seconds"] / m["epochs"])
            say(f"{name:26s} {m['top1']:5.1f}% top-1 after {m['epochs']} epochs, "
                f"{rows[name]['epoch_seconds']:.1f} s per epoch when it was trained")
    result = {"quick": nnlab.quick_mode(), "threads": torch.get_num_threads(), "batch": int(x.shape[0]),
              "steps_per_epoch": steps_per_epoch, "models": rows, "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
