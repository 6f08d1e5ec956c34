"""ONNX export checked in ONNX Runtime: trained LeNet-5 and the MobileNetV2-style network against the simulator.

For each network (the cached trained baseline, :func:`nnlab.cache.pretrained`), quantised after training
(:func:`nnlab.quant.quantise_model`) at 8-bit weights and activations and at 4-bit weights with 8-bit
activations, exported with :func:`nnlab.export.to_onnx` in both forms (``exact``, the default, and ``qdq``) and
run in ONNX Runtime (CPU, one thread) on the 1,000 test images of the offline MNIST subset, it prints one row
per network, bit-depths and form:

* ``ort_vs_sim``: share of images where ONNX Runtime's top-1 equals the simulator's;
* ``ort_vs_fake``: the same against the fake-quantised PyTorch model;
* ``identical_integers``: share of every stored activation integer (all layers) identical to the simulator's,
  the largest difference, and the largest difference of the logits;
* the accuracies, the file size and the type its weights are stored in;
* ``ort_all_vs_sim``: top-1 agreement at ONNX Runtime's highest optimisation level (``optimization="all"``),
  where it fuses a qdq file into its integer kernels (see :mod:`nnlab.export` on AVX2 CPUs); and
  ``all_identical_integers``, the identical share at that level.

    python benchmarks/onnx_export.py [--quick] [--json]

``--quick`` (or ``NNLAB_QUICK=1``) uses the quick-mode trained baselines. Training, on a cold cache, is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("lenet5", "mobilenet-mnist")
SETTINGS = ((8, 8), (4, 8))


FORMS = ("exact", "qdq")


def measure(name: str, weight_bits: int, act_bits: int, data, images, labels, directory: Path) -> list:
    """One row per export form for ``name`` at ``weight_bits``/``act_bits``."""
    import numpy as np
    import torch

    import nnlab
    from nnlab import export, nna

    net = nnlab.cache.pretrained(name, verbose=False)
    qmodel = nnlab.quant.quantise_model(net, data, weight_bits=weight_bits, act_bits=act_bits)
    program = nna.compile_model(qmodel, data.input_shape)
    sim_top1 = nna.run(program, images.numpy()).predictions
    with torch.no_grad():
        fake_top1 = qmodel(images).argmax(1).numpy()
    y = labels.numpy()
    rows = []
    for form in FORMS:
        path = directory / f"{name}-w{weight_bits}a{act_bits}-{form}.onnx"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", export.InexactExportWarning)
            export.to_onnx(qmodel, path, form=form, input_shape=data.input_shape)
        c = export.compare(path, program, images)
        fused = export.compare(path, program, images, optimization="all")
        ort_top1 = export.run_onnx(path, images).argmax(1)
        storage = export.weight_storage(path)
        rows.append({
            "model": name, "weight_bits": weight_bits, "act_bits": act_bits, "form": form, "images": c["images"],
            "ort_vs_sim": c["top1_agreement"], "ort_vs_fake": float(np.mean(ort_top1 == fake_top1)),
            "identical_integers": c["identical_integers"], "max_integer_difference": c["max_integer_difference"],
            "max_logit_difference": c["max_logit_difference"],
            "accuracy_ort": float(np.mean(ort_top1 == y)), "accuracy_sim": float(np.mean(sim_top1 == y)),
            "accuracy_fake": float(np.mean(fake_top1 == y)), "sim_vs_fake": float(np.mean(sim_top1 == fake_top1)),
            "ort_all_vs_sim": fused["top1_agreement"], "all_identical_integers": fused["identical_integers"],
            "inexact_warnings": len(caught),
            "weight_types": sorted(set(storage["type"])), "weight_bytes": int(storage["bytes"].sum()),
            "file_bytes": path.stat().st_size,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick-mode trained baselines (NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"
    import torch

    import nnlab

    with contextlib.redirect_stdout(sys.stderr):  # the data set's one-line description; stdout is the figures
        data = nnlab.data.load_data()
    images = torch.cat([x for x, _ in data.test])
    labels = torch.cat([y for _, y in data.test])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for wb, ab in SETTINGS:
                for row in measure(name, wb, ab, data, images, labels, Path(tmp)):
                    rows.append(row)
                    if not args.json:
                        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    result = {"quick_mode": nnlab.quick_mode(), "threads": 1, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
