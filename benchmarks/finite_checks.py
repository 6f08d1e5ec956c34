"""What refusing NaN and infinity costs a quantisation-aware training step.

Every quantiser checks that what it rounds is finite (one sum over the
tensor per call, see :func:`nnlab.quant.check_finite`).  This benchmark
trains two copies of the same quantised LeNet-5 (4-bit weights, 8-bit
activations, scales following the weights as in retraining), one with the
checks and one with them switched off, taking turns round after round on
the same batches, and reports the median CPU time of a step of each (the
CPU time of this thread, which another process's load does not inflate as
it does wall-clock time).

    python benchmarks/finite_checks.py [--quick] [--rounds 41] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of 15 steps each (default 40)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 40)

    import torch
    import torch.nn.functional as F

    from nnlab import data as nd
    from nnlab import quant
    from nnlab.models import build_model
    from nnlab.quant import modules, tensor

    torch.set_num_threads(1)
    checks = (tensor.check_finite, modules._check_scale)

    def use_checks(on: bool):
        tensor.check_finite = checks[0] if on else (lambda x, name="x": None)
        modules._check_scale = checks[1] if on else (lambda scale, name: None)

    data = nd.load_data(train_limit=1000, test_limit=100, verbose=False)
    torch.manual_seed(0)
    base = quant.quantise_model(build_model("lenet5"), data, 4, 8)
    for m in base.modules():
        if isinstance(m, quant.WeightQuantiser):
            m.track = True
    nets = {on: copy.deepcopy(base).train() for on in (True, False)}
    opts = {on: torch.optim.SGD(nets[on].parameters(), lr=1e-3, momentum=0.9) for on in nets}
    batches = [b for _, b in zip(range(15), data.train)]
    times = {True: [], False: []}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for on in ((True, False) if r % 2 else (False, True)):
                use_checks(on)
                start = time.thread_time()
                for x, y in batches:
                    loss = F.cross_entropy(nets[on](x), y)
                    opts[on].zero_grad()
                    loss.backward()
                    opts[on].step()
                if r:
                    times[on].append((time.thread_time() - start) / len(batches))
    finally:
        use_checks(True)
    checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
    figures = {"model": "lenet5", "weight_bits": 4, "act_bits": 8, "batch": int(batches[0][0].shape[0]),
               "threads": 1, "steps_each": rounds * len(batches), "checked_ms": round(1e3 * checked, 3),
               "unchecked_ms": round(1e3 * unchecked, 3), "overhead_pct": round(100 * (checked / unchecked - 1), 2)}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"LeNet-5, 4-bit weights, 8-bit activations, batch {figures['batch']}, one thread, "
              f"{figures['steps_each']} steps each: median CPU time per step {figures['checked_ms']:.2f} ms with "
              f"the finite checks, {figures['unchecked_ms']:.2f} ms without ({figures['overhead_pct']:+.1f}%)")
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
