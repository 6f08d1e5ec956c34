"""Throughput of the NNA simulator against PyTorch fp32 and PyTorch int8, per zoo model and batch size.

For each network (default: ``lenet5``, ``lenet300``, ``vgg-mnist``,
``mobilenet-mnist``), trained with its recipe (cached), quantised after
training to 4-bit weights (per channel) and 8-bit activations and compiled
for the simulator, on the offline MNIST test images, one thread:

* ``images_per_s``: tool -> model -> ``"b<batch>"`` -> images per second, at
  batch 1, 16, 256 and 1024, for the simulator (``nnlab-nna``,
  :func:`nnlab.nna.run`, ``"torch"`` mode), PyTorch fp32 eager inference of
  the float network (``torch-fp32``) and PyTorch's own int8 model of it
  (``torch-int8``, :func:`nnlab.nna.quantise_torch_int8`, eager flow for a
  ``nn.Sequential``, FX otherwise; None with a note
  when nnlab's import of PyTorch's int8 flow does not cover the network).
  The tools take turns at every batch size (best of ``--repeats`` rounds, the
  least disturbed by other work on the machine);
* ``ratio_fp32`` / ``ratio_int8``: model -> ``"b<batch>"`` -> the simulator's
  images/s over PyTorch fp32's (int8's);
* ``drop_256_1024``: model -> the simulator's images/s at batch 1024 over
  that at batch 256 (1.0: no drop);
* ``layers`` (with ``--profile``): model -> layer -> milliseconds the
  simulator spends in that layer at batch 256.

Usage::

    python benchmarks/engine.py [--models lenet5,lenet300] [--batches 1,16,256,1024] [--profile] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread for NumPy's BLAS too
    os.environ.setdefault(_var, "1")

MODELS = ("lenet5", "lenet300", "vgg-mnist", "mobilenet-mnist")


def _images(images, b):
    """The first ``b`` test images (repeated when the test set holds fewer)."""
    if b <= len(images):
        return images[:b]
    return images.repeat((b + len(images) - 1) // len(images), *([1] * (images.ndim - 1)))[:b]


def throughput(runners: dict, images, batches, repeats: int, say) -> dict:
    """tool -> ``"b<batch>"`` -> images/s, the tools taking turns at each batch size."""
    import numpy as np
    import torch
    out = {tool: {} for tool in runners}
    for b in batches:
        x = _images(images, b)
        reps = max(1, min(32, 512 // b))
        for tool, fn in runners.items():
            if fn is None:
                out[tool][f"b{b}"] = None
                continue
            with torch.no_grad():
                fn(x)  # warm-up
                best = np.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn(x)
                    best = min(best, (time.perf_counter() - start) / reps)
            out[tool][f"b{b}"] = b / best
        say(f"  batch {b:4d}: " + "  ".join(f"{t} {out[t][f'b{b}']:,.0f}/s" for t in runners
                                            if out[t][f"b{b}"] is not None))
    return out


def profile(program, x, repeats: int = 3) -> dict:
    """Milliseconds per layer of one simulator run (best of ``repeats``)."""
    from nnlab.nna import engine
    width = engine.accumulator_width()
    best = {}
    for _ in range(repeats):
        values, last_use = {}, program.last_uses()
        for i, layer in enumerate(program.layers):
            start = time.perf_counter()
            values[layer.name] = engine._step(layer, [values[n] for n in layer.inputs], x, "torch", width,
                                              {}, {}, {})
            ms = 1e3 * (time.perf_counter() - start)
            best[layer.name] = min(best.get(layer.name, ms), ms)
            for n in layer.inputs:
                if last_use[n] == i:
                    values.pop(n, None)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    parser.add_argument("--batches", default="1,16,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds per tool and batch (best is kept)")
    parser.add_argument("--profile", action="store_true", help="also time each simulator layer at batch 256")
    parser.add_argument("--quick", action="store_true", help="quick mode (as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive integers, got {args.batches!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    import torch

    import nnlab
    from nnlab import nna, quant
    from nnlab.cache import RECIPES, pretrained

    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in RECIPES]
    if bad:
        parser.error(f"--models: unknown {', '.join(map(repr, bad))}; choose from {', '.join(RECIPES)}")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    nnlab.set_threads(1)
    start = time.perf_counter()
    data = nnlab.data.load_data(verbose=False)
    images = torch.cat([x for x, _ in data.test])
    results = {"images_per_s": {"nnlab-nna": {}, "torch-fp32": {}, "torch-int8": {}}, "ratio_fp32": {},
               "ratio_int8": {}, "drop_256_1024": {}, "int8_note": {}, "layers": {},
               "settings": {"threads": 1, "weight_bits": 4, "act_bits": 8, "mode": "torch",
                            "quick": nnlab.quick_mode()}}
    engine_before = torch.backends.quantized.engine
    for name in models:
        fp32 = copy.deepcopy(pretrained(name, data=data, verbose=False)).cpu().eval()
        program = nna.compile_model(quant.quantise_model(fp32, data, 4, 8), tuple(images.shape[1:]))
        int8, note = None, None
        for flow in ("eager", "fx"):  # eager for nn.Sequential networks, FX for the others
            try:
                int8, note = nna.quantise_torch_int8(fp32, data, flow=flow), None
                break
            except (TypeError, ValueError, NotImplementedError) as exc:
                note = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
        results["int8_note"][name] = note
        say(f"{name}:" + (f" (torch-int8 skipped: {note})" if note else ""))
        runners = {"nnlab-nna": lambda x: nna.run(program, x.numpy()), "torch-fp32": fp32,
                   "torch-int8": int8}
        try:
            per_tool = throughput(runners, images, batches, args.repeats, say)
        finally:
            torch.backends.quantized.engine = engine_before
        for tool, figures in per_tool.items():
            results["images_per_s"][tool][name] = figures
        sim = per_tool["nnlab-nna"]
        results["ratio_fp32"][name] = {k: sim[k] / v for k, v in per_tool["torch-fp32"].items()}
        results["ratio_int8"][name] = {k: (sim[k] / v if v else None) for k, v in per_tool["torch-int8"].items()}
        if "b256" in sim and "b1024" in sim:
            results["drop_256_1024"][name] = sim["b1024"] / sim["b256"]
        if "b256" in sim:
            say(f"  batch 256: simulator / fp32 {results['ratio_fp32'][name]['b256']:.2f}"
                + (f", / int8 {results['ratio_int8'][name]['b256']:.2f}" if int8 is not None else "")
                + (f"; batch 1024 / batch 256 {results['drop_256_1024'][name]:.2f}"
                   if name in results["drop_256_1024"] else ""))
        if args.profile:
            layers = profile(program, _images(images, 256).numpy())
            results["layers"][name] = layers
            say("  ms per layer at batch 256: " + ", ".join(f"{k} {v:.2f}" for k, v in layers.items()))
    results["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
