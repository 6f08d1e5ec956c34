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
from ..train import _loader
from .engine import MODES, run
from .program import Program

__all__ = ["agreement", "compare_modes", "compare_torch_int8", "test_batches"]


def test_batches(data, limit: int | None = None):
    """The ``(images, labels)`` test batches of a DataBundle (or loader), at most ``limit`` images in all."""
    seen = 0
    for x, y in _loader(data, "test"):
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

    Args:
        program: from :func:`nnlab.nna.compile_torch_int8` (``qmodel``).
        qmodel: the converted PyTorch model.
        data: DataBundle or test loader.
        limit: at most this many images.

    Returns:
        DataFrame ``layer``, ``values``, ``mismatches``, ``max_diff``; ``attrs["total"]`` the sum of mismatches.
    """
    from .torch_int8 import layer_outputs

    counts = {}
    for x, _ in test_batches(data, limit):
        ref = layer_outputs(qmodel, x)
        ours = run(program, x, "torch", trace=True).outputs
        for name, q in ours.items():
            if name not in ref:
                continue
            d = np.abs(ref[name] - q.astype(np.int64))
            c = counts.setdefault(name, [0, 0, 0])
            c[0] += d.size
            c[1] += int(np.count_nonzero(d))
            c[2] = max(c[2], int(d.max(initial=0)))
    if not counts:
        raise ValueError("no layer of the program matches a quantized layer of qmodel by name")
    table = pd.DataFrame([{"layer": k, "values": v[0], "mismatches": v[1], "max_diff": v[2]}
                          for k, v in counts.items()])
    table.attrs["total"] = int(table["mismatches"].sum())
    return table
