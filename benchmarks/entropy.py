"""Benchmark of Huffman-coded weight storage: compression against fp32 dense, and what it costs in accuracy and time.

For each setting (model, sparsity, weight bit-depth), :func:`nnlab.pipeline.compress`
runs the whole method (baseline, coring with distillation, quantisation with
random-subset retraining, 8-bit activations, the integer NNA simulator) on
the Series2NX-like accelerator with a Huffman decoder
(:data:`nnlab.nna.SERIES2NX_HUFFMAN`, ``min_bits`` lowered to the weight
bit-depth where it is below 4).  The same compiled program is costed twice:

* ``packed_bytes`` / ``compression_packed``: the fixed-width formats only
  (dense, bitmask, run-length), as :data:`nnlab.nna.SERIES2NX` stores it;
* ``entropy_bytes`` / ``compression_entropy``: Huffman-coded where smaller;
* ``latency_*_us`` / ``energy_*_uj``: per inference, decoding included;
* ``accuracy_fp32`` / ``accuracy_nna`` / ``drop_pp``: test accuracy (percent)
  of the fp32 baseline and of the integer program, and their difference;
* ``formats``: each layer's chosen format.

fp32 dense counts 4 bytes for every weight and bias, as :func:`nnlab.nna.report` does.

Usage::

    python benchmarks/entropy.py [--settings lenet5:0.94:3,lenet300:0.97:4] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: The default settings: ``model:sparsity:weight_bits``.
SETTINGS = ("lenet5:0.93:4", "lenet5:0.94:3", "lenet5:0.95:4", "lenet300:0.97:4")


def measure(model: str, sparsity: float, bits: int, data) -> dict:
    """The figures of one setting (see the module docstring)."""
    from nnlab import nna
    from nnlab.pipeline import compress

    hardware = nna.SERIES2NX_HUFFMAN.replace(min_bits=min(4, bits))
    start = time.perf_counter()
    result = compress(model, sparsity=sparsity, weight_bits=bits, act_bits=8, hardware=hardware, verbose=False)
    head = result.headline()
    packed = nna.headline(nna.report(result.program, nna.SERIES2NX.replace(min_bits=min(4, bits))))
    return {
        "model": model, "sparsity": sparsity, "weight_bits": bits,
        "accuracy_fp32": head["accuracy_fp32"], "accuracy_nna": head["accuracy_nna"],
        "drop_pp": head["accuracy_drop_pp"], "fp32_bytes": head["fp32_bytes"],
        "packed_bytes": packed["storage_bytes"], "compression_packed": packed["compression"],
        "entropy_bytes": head["nna_bytes"], "compression_entropy": head["compression"],
        "latency_packed_us": packed["latency_us"], "latency_entropy_us": head["nna_latency_us"],
        "energy_packed_uj": packed["energy_uj"], "energy_entropy_uj": head["nna_energy_uj"],
        "formats": {row.layer: row.format for row in result.report.iloc[:-1].itertuples() if row.format},
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated model:sparsity:weight_bits (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    settings = []
    for text in (s for s in args.settings.split(",") if s):
        try:
            model, sparsity, bits = text.split(":")
            settings.append((model, float(sparsity), int(bits)))
        except ValueError:
            parser.error(f"--settings: {text!r} is not model:sparsity:weight_bits (e.g. lenet5:0.94:3)")
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"

    import nnlab

    start = time.perf_counter()
    nnlab.set_threads(1)
    data = nnlab.data.load_data(verbose=False)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    rows = []
    for model, sparsity, bits in settings:
        rows.append(measure(model, sparsity, bits, data))
        r = rows[-1]
        say(f"{model} {sparsity:.0%} sparse {bits}-bit: accuracy {r['accuracy_nna']:.1f}% (fp32 {r['accuracy_fp32']:.1f}%, "
            f"-{r['drop_pp']:.1f} pp) | packed {r['compression_packed']:.1f}x ({r['packed_bytes']:,} B) | "
            f"Huffman {r['compression_entropy']:.1f}x ({r['entropy_bytes']:,} B) | latency "
            f"{r['latency_packed_us']:.2f} -> {r['latency_entropy_us']:.2f} us | energy "
            f"{r['energy_packed_uj']:.2f} -> {r['energy_entropy_uj']:.2f} uJ")
    results = {"settings": rows, "quick": nnlab.quick_mode(), "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
