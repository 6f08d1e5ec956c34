"""The budget picker against every uniform setting, at three storage budgets.

For each model (trained by its recipe, quick mode with ``--quick``, offline
MNIST), the per-layer sensitivity is measured once
(:func:`nnlab.picker.measure_sensitivity`), every uniform setting (one
bit-depth and one sparsity for all layers) is run on the test images, and
:func:`nnlab.picker.pick_per_layer` chooses for three storage budgets between
the cheapest network the options make (``floor``) and the network at uniform
8-bit dense weights (``dense8``): ``floor + f * (dense8 - floor)`` for
``f`` = 0.15, 0.35 and 0.6 (the per-channel parameters make the floor of a
network with many thin layers, such as the MobileNetV2-style one, high).
Printed per budget: the picker's test accuracy, the best test accuracy of a
uniform setting that fits (any sparsity), the best of a uniform *dense*
bit-depth that fits (None when none does), and whether the predicted storage
equals the saved file's payload.

    python benchmarks/picker.py [--quick] [--models lenet5 mobilenet-mnist] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nnlab
from nnlab import picker, quant
from nnlab.data import load_data

FRACTIONS = (0.15, 0.35, 0.6)


def measure(name, data, *, quick, bits, sparsities, images):
    model = nnlab.cache.pretrained(name, data=data, quick=quick, verbose=False)
    start = time.perf_counter()
    table = picker.measure_sensitivity(model, data, bits=bits, sparsities=sparsities, images=images)
    sens_s = time.perf_counter() - start
    uniform = picker.uniform_settings(table, data)
    dense8 = float(uniform[(uniform.bits == 8) & (uniform.sparsity == 0)].storage_B.iloc[0])
    floor = table.cost_range("storage_B")[0]
    rows = []
    for frac in FRACTIONS:
        budget = round(floor + frac * (dense8 - floor))
        choice = picker.pick_per_layer(model, data, budget_bytes=budget, sensitivity=table)
        fits = uniform[uniform.storage_B <= budget]
        dense = fits[fits.sparsity == 0]
        best = fits.loc[fits.accuracy.idxmax()] if len(fits) else None
        rows.append({
            "model": name, "budget_bytes": budget, "fraction_floor_to_8bit_dense": frac, "floor_bytes": floor, "dense8_bytes": dense8, "how": choice.how,
            "bits": choice.bits, "sparsity": choice.sparsity,
            "picker_accuracy": choice.measured["accuracy"],
            "best_uniform_accuracy": None if best is None else float(best.accuracy),
            "best_uniform": None if best is None else f"{int(best.bits)} bits, {best.sparsity:.2f} zeros",
            "best_uniform_dense_accuracy": float(dense.accuracy.max()) if len(dense) else None,
            "predicted_storage_bytes": choice.predicted["storage_bytes"],
            "file_storage_bytes": choice.measured["file_storage_bytes"],
            "storage_equal": choice.predicted["storage_bytes"] == choice.measured["file_storage_bytes"],
        })
    return {"model": name, "sensitivity_seconds": sens_s, "options": len(table.options),
            "uniform": uniform.to_dict(orient="records"), "budgets": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick-mode trained models")
    parser.add_argument("--models", nargs="+", default=["lenet5", "mobilenet-mnist"])
    parser.add_argument("--bits", type=int, nargs="+", default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument("--images", type=int, default=256, help="sensitivity images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("mnist", verbose=False)
    results = [measure(m, data, quick=args.quick, bits=args.bits, sparsities=args.sparsities, images=args.images)
               for m in args.models]
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    for r in results:
        print(f"{r['model']}: {r['options']} options measured in {r['sensitivity_seconds']:.0f} s")
        for b in r["budgets"]:
            print(f"  {b['budget_bytes']:>7,} B (floor {b['floor_bytes']:,.0f} + {b['fraction_floor_to_8bit_dense']:.0%} of the way to 8-bit dense {b['dense8_bytes']:,.0f}): picker "
                  f"{b['picker_accuracy']:.1f}% ({b['how']}) | best uniform {b['best_uniform_accuracy']}% "
                  f"({b['best_uniform']}) | best uniform dense {b['best_uniform_dense_accuracy']} | "
                  f"storage predicted {b['predicted_storage_bytes']:,} = file {b['file_storage_bytes']:,}: "
                  f"{b['storage_equal']}")
            print(f"      bits {b['bits']}\n      zeros {b['sparsity']}")


if __name__ == "__main__":
    main()
