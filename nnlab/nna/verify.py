"""Does the simulator compute what PyTorch computes?  Three checks.

* :func:`agreement`: top-1 agreement and accuracies of a compiled nnlab model
  against the PyTorch fake-quantised model it came from;
* :func:`compare_modes`: how often the ``"torch"`` and ``"integer"``
  requantisation modes give different integers, layer by layer;
* :func:`compare_torch_int8`: per-layer count of output integers that
  differ from PyTorch's own int8 model (``int_repr()``); the target is 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._args import check_choice
from ..base import loader_of
from .engine import MODES, run
from .import_torch import _import_torch_int8
from .program import Program
from .torch_int8 import layer_outputs

__all__ = ["agreement", "compare_modes", "compare_torch_int8", "test_batches"]


def test_batches(data, limit: int | None = None):
    """The ``(images, labels)`` test batches of a DataBundle (or loader), at most ``limit`` images in all."""
    seen = 0
    for x, y in loader_of(data, "test"):
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        yield x, y


@torch.no_grad()
def agreement(program: Program, model: nn.Module, data, mode: str = "torch", limit: int | None = None,
              accumulator_bits: int = 32) -> dict:
    """Compare the simulator with the PyTorch model on the test set.

    Args:
        program: the compiled model.
        model: the PyTorch model it was compiled from (fake-quantised, or a torch.ao int8 model).
        data: DataBundle (its test set) or a test loader.
        mode: requantisation mode of the simulator.
        limit: use at most this many images.
        accumulator_bits: the simulator's accumulator width.

    Returns:
        dict: ``agreement`` (percent of images with the same top-1 class),
        ``accuracy_torch`` and ``accuracy_nna`` (percent), ``n`` (images),
        ``saturations`` (accumulator overflows, all layers and images).
    """
    check_choice("mode", mode, MODES)
    model = model.eval()
    same = right_torch = right_nna = n = saturations = 0
    for x, y in test_batches(data, limit):
        p_torch = model(x).argmax(1).numpy()
        result = run(program, x, mode, accumulator_bits=accumulator_bits)
        p_nna = result.predictions
        saturations += sum(result.saturations.values())
        y = y.numpy()
        same += int((p_torch == p_nna).sum())
        right_torch += int((p_torch == y).sum())
        right_nna += int((p_nna == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("data has no test images")
    return {"agreement": 100.0 * same / n, "accuracy_torch": 100.0 * right_torch / n,
            "accuracy_nna": 100.0 * right_nna / n, "n": n, "saturations": saturations}


def compare_modes(program: Program, data, limit: int | None = None) -> pd.DataFrame:
    """Per layer: how many output integers differ between the ``"torch"`` and ``"integer"`` modes.

    Each mode runs the whole network on its own outputs, so differences
    propagate as they would on the device.

    Args:
        program: a compiled program.
        data: DataBundle or test loader.
        limit: at most this many images.

    Returns:
        DataFrame ``layer``, ``values``, ``differ``, ``share`` (percent),
        ``max_diff``; ``attrs["top1_agreement"]`` (percent of images with
        the same top-1 class).
    """
    counts, same, n = {}, 0, 0
    for x, _ in test_batches(data, limit):
        a, b = run(program, x, "torch", trace=True), run(program, x, "integer", trace=True)
        for name, qa in a.outputs.items():
            qb = b.outputs[name]
            d = np.abs(qa.astype(np.int64) - qb)
            c = counts.setdefault(name, [0, 0, 0])
            c[0] += d.size
            c[1] += int(np.count_nonzero(d))
            c[2] = max(c[2], int(d.max(initial=0)))
        same += int((a.predictions == b.predictions).sum())
        n += len(x)
    table = pd.DataFrame([{"layer": k, "values": v[0], "differ": v[1], "share": 100.0 * v[1] / max(v[0], 1),
                           "max_diff": v[2]} for k, v in counts.items()])
    table.attrs["top1_agreement"] = 100.0 * same / max(n, 1)
    return table


def compare_torch_int8(program: Program, qmodel: nn.Module, data, limit: int | None = None) -> pd.DataFrame:
    """Per layer: output integers of the simulator (``"torch"`` mode) that differ from PyTorch's int8 model.

    Every layer of the program is compared with the node of ``qmodel``
    whose integers it outputs (a layer with a fused ReLU6 with the ReLU6's
    node), on the same images; each runs on its own inputs, so differences
    propagate as they would.

    Args:
        program: from :func:`nnlab.nna.compile_torch_int8` (``qmodel``).
        qmodel: the converted PyTorch model, eager or FX.
        data: DataBundle or test loader (or anything :func:`test_batches` reads).
        limit: at most this many images.

    Returns:
        DataFrame ``layer``, ``node`` (the node of ``qmodel`` compared),
        ``values``, ``mismatches``, ``max_diff``, ``int16_saturations`` (pair
        sums that saturated at int16 in PyTorch's fbgemm AVX2 kernel, emulated
        by the simulator; 0 for inputs in the calibrated range);
        ``attrs["total"]`` the sum of mismatches, ``attrs["int16_saturations"]``
        the sum of saturations.

    Raises:
        ValueError: a layer of the program that is not a layer of ``qmodel``
            (compile the program from ``qmodel``), or no test images.
    """
    _, nodes, _ = _import_torch_int8(qmodel, program.input.shape, None)
    missing = [layer.name for layer in program.layers if layer.name not in nodes]
    if missing:
        raise ValueError(f"layers {missing} of program {program.name!r} are not layers of qmodel "
                         f"({', '.join(nodes)}); compile the program from qmodel with nnlab.nna.compile_torch_int8")
    counts = {layer.name: [0, 0, 0, 0] for layer in program.layers}
    images = 0
    for x, _ in test_batches(data, limit):
        ref = layer_outputs(qmodel, x)
        result = run(program, x, "torch", trace=True)
        for name, q in result.outputs.items():
            theirs = ref[nodes[name]]
            if theirs.size != q.size:
                raise ValueError(f"layer {name!r} outputs shape {q.shape[1:]} per image but node {nodes[name]!r} of "
                                 f"qmodel {theirs.shape[1:]}")
            d = np.abs(theirs.reshape(q.shape) - q.astype(np.int64))  # a mean's (N, C) is its pool's (N, C, 1, 1)
            c = counts[name]
            c[0] += d.size
            c[1] += int(np.count_nonzero(d))
            c[2] = max(c[2], int(d.max(initial=0)))
        for name, n in result.int16_saturations.items():
            counts[name][3] += n
        images += len(x)
    if images == 0:
        raise ValueError("data has no test images")
    table = pd.DataFrame([{"layer": k, "node": nodes[k], "values": v[0], "mismatches": v[1], "max_diff": v[2],
                           "int16_saturations": v[3]} for k, v in counts.items()])
    table.attrs["total"] = int(table["mismatches"].sum())
    table.attrs["int16_saturations"] = int(table["int16_saturations"].sum())
    return table
