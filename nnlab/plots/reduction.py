"""Plots of the reduction chapter: accuracy against bit-depth, weight histograms with their grid."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..quant import QuantSpec, grid_levels, weight_quantiser
from ._axes import axes_or_new, finish_accuracy_axes

__all__ = ["plot_accuracy_vs_bits", "plot_levels", "plot_subset_schedule"]

_STYLE = {"ptq": ("post-training", "o", "tab:gray"), "ste": ("straight-through QAT", "s", "tab:orange"),
          "random_subset": ("random-subset retraining", "^", "tab:green"),
          "per_tensor": ("one scale per tensor", "o", "tab:blue"),
          "per_channel": ("one scale per output channel", "s", "tab:orange")}


def plot_accuracy_vs_bits(table: pd.DataFrame, *, fp32_acc: float | None = None, columns=None, ax=None,
                          title: str = "Accuracy against weight bit-depth"):
    """Accuracy curves against bit-depth, one line per method (e.g. PTQ vs retrained).

    Args:
        table: DataFrame with a ``bits`` column (or index) and one accuracy
            column (percent) per method, e.g. ``ptq``, ``ste``, ``random_subset``.
        fp32_acc: draw the float model's accuracy as a dashed line.
        columns: which columns to draw (default every column but ``bits``).
        ax: matplotlib axes to draw on (default a new figure).
        title: axes title.

    Returns:
        The matplotlib axes.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    if "bits" in table.columns:
        table = table.set_index("bits")
    columns = [c for c in table.columns] if columns is None else list(columns)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; it has {list(table.columns)}")
    ax = axes_or_new(ax, (6.5, 3.8))
    bits = np.asarray(table.index, dtype=int)
    for col in columns:
        label, marker, colour = _STYLE.get(col, (col, "o", None))
        ax.plot(bits, table[col], marker=marker, color=colour, label=label)
    if fp32_acc is not None:
        ax.axhline(fp32_acc, ls="--", color="black", lw=1, label=f"float 32 ({fp32_acc:.1f}%)")
    ax.set_xticks(sorted(set(bits)))
    ax.invert_xaxis()  # from many bits (left) to few (right), the direction of the chapter
    return finish_accuracy_axes(ax, "weight bits", title, legend_size=8)


def plot_levels(source, spec: QuantSpec | None = None, scale=None, zero_point=None, *, channel: int | None = None,
                bins: int = 120, ax=None, title: str | None = None):
    """Histogram of weights with the quantisation levels drawn on it as vertical lines.

    Args:
        source: a quantised Conv2d/Linear layer (its float weights and its
            WeightQuantiser are used), or a tensor of values (then give
            ``spec``, ``scale`` and ``zero_point``).
        spec, scale, zero_point: the grid, for a tensor ``source``.
        channel: for per-channel grids, the output channel to show (default:
            the channel with the widest grid); per-tensor grids show every weight.
        bins: histogram bins.
        ax: matplotlib axes (default a new figure).
        title: axes title (default says the grid).

    Returns:
        The matplotlib axes.
    """
    if isinstance(source, nn.Module):
        q = weight_quantiser(source)
        if q is None:
            raise ValueError(f"{type(source).__name__} has no WeightQuantiser; pass a quantised layer "
                             f"or a tensor with spec, scale and zero_point")
        chain = source.parametrizations.weight
        with torch.no_grad():
            values = chain.original
            for p in chain:
                if p is q:
                    break
                values = p(values)  # the pruning mask, if any
        spec, scale, zero_point = q.spec, q.scale, q.zero_point
    else:
        if spec is None or scale is None or zero_point is None:
            raise ValueError("for a tensor source, give spec, scale and zero_point")
        values = torch.as_tensor(source)
    values = values.detach().float().cpu()
    levels = grid_levels(spec, scale, zero_point)
    shown = values
    if levels.dim() == 2:
        if channel is None:
            channel = int(torch.as_tensor(scale).argmax())
        if not 0 <= channel < levels.shape[0]:
            raise ValueError(f"channel must be in 0..{levels.shape[0] - 1}, got {channel}")
        levels = levels[channel]
        shown = values.movedim(spec.ch_axis, 0)[channel]
    ax = axes_or_new(ax, (6.5, 3.2))
    shown = shown.flatten().numpy()
    lo = min(shown.min(initial=0.0), float(levels.min()))
    hi = max(shown.max(initial=0.0), float(levels.max()))
    counts, edges = np.histogram(shown, bins=np.linspace(lo, hi, bins + 1))
    ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
    step = len(levels) // 64 + 1  # at high bit-depths, draw every step-th level only
    for v in levels[::step].tolist():
        ax.axvline(v, color="tab:red", lw=0.7, alpha=0.6)
    where = "" if channel is None else f", channel {channel}"
    ax.set_title(title or f"{spec}: {spec.levels} levels{where}" + (f" (every {step}th drawn)" if step > 1 else ""),
                 fontsize=9)
    ax.set_xlabel("weight value (red: quantisation levels)")
    ax.set_ylabel("count")
    return ax


def plot_subset_schedule(fractions: Mapping[str, list] | list, *, ax=None):
    """The quantised fraction of the weights at each training step of random-subset retraining.

    Args:
        fractions: a list of fractions (e.g. ``history.attrs["subset"].history``)
            or a dict ``label -> list`` to compare schedules.
        ax: matplotlib axes (default a new figure).

    Returns:
        The matplotlib axes.
    """
    if not isinstance(fractions, Mapping):
        fractions = {"quantised fraction": fractions}
    ax = axes_or_new(ax, (5.5, 3.0))
    for label, values in fractions.items():
        values = list(values)
        ax.plot(np.arange(len(values)), values, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of weights quantised")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax
