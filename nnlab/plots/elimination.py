"""Plots of the elimination chapter: weight histograms, accuracy against sparsity, layer sensitivity."""

from __future__ import annotations

from typing import Iterable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..prune import effective_weight, prunable_layers
from ._axes import axes_or_new, finish_accuracy_axes, require_columns

__all__ = ["weights_of", "plot_weight_histograms", "plot_accuracy_vs_sparsity", "plot_sensitivity"]


def weights_of(model_or_tensor, layers: Iterable[str] | None = None) -> np.ndarray:
    """All prunable weights of a model (the weights each layer really uses) as one flat NumPy array.

    Args:
        model_or_tensor: a model, or a tensor / array (returned flattened).
        layers: layer names (default every Conv2d/Linear).

    Returns:
        1-D float array.
    """
    if isinstance(model_or_tensor, nn.Module):
        return torch.cat([effective_weight(m).flatten().cpu() for _, m in prunable_layers(model_or_tensor, layers)
                          ]).numpy()
    return np.asarray(torch.as_tensor(model_or_tensor).detach().cpu()).ravel()


def plot_weight_histograms(panels: Mapping[str, object], *, bins: int = 121, layers: Iterable[str] | None = None,
                           log: bool = True, limit: float | None = None, axes=None):
    """Side-by-side weight histograms, e.g. original / pruned / after L1 and further pruning.

    Exact zeros (pruned weights) are left out of the bars, so the gap that
    coring opens around zero is visible; each title says how many there are.

    Args:
        panels: ``{title: model or tensor}``, one panel each, left to right.
        bins: number of bins, the same edges in every panel.
        layers: layer names to include (default every Conv2d/Linear).
        log: logarithmic count axis (shows the tails).
        limit: show ``[-limit, limit]``; default the largest magnitude.
        axes: existing axes to draw into (one per panel).

    Returns:
        The matplotlib Figure.
    """
    if not panels:
        raise ValueError("panels is empty; give at least one {title: model or tensor}")
    values = {title: weights_of(v, layers) for title, v in panels.items()}
    if limit is None:
        limit = max(float(np.abs(v).max()) if v.size else 0.0 for v in values.values()) or 1.0
    edges = np.linspace(-limit, limit, bins + 1)
    if axes is None:
        fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 3.2), sharey=True, squeeze=False)
        axes = axes[0]
    else:
        axes = list(np.ravel(axes))
        fig = axes[0].figure
    for ax, (title, v) in zip(axes, values.items()):
        zeros = int((v == 0).sum())
        ax.hist(v[v != 0], bins=edges, color="tab:blue", log=log)
        ax.set_title(f"{title}\n{v.size - zeros:,} non-zero, {zeros / max(v.size, 1):.0%} zero", fontsize=10)
        ax.set_xlabel("weight value")
    axes[0].set_ylabel("count (log scale)" if log else "count")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_sparsity(curves: Mapping[str, pd.DataFrame | Mapping], *, dense_acc: float | None = None,
                              ax=None, title: str = "Accuracy against sparsity"):
    """Accuracy-vs-sparsity curves, e.g. without retraining and with distillation retraining.

    Args:
        curves: ``{label: table}``; a table is a DataFrame (or dict) with
            columns ``sparsity`` (fraction) and ``accuracy`` (percent).
        dense_acc: draw the dense network's accuracy as a dashed line.
        ax: axes to draw into (default a new figure).
        title: axes title.

    Returns:
        The matplotlib Axes.
    """
    ax = axes_or_new(ax, (6, 4))
    for label, table in curves.items():
        table = pd.DataFrame(table)
        require_columns(table, ("sparsity", "accuracy"), f"curves[{label!r}]")
        ax.plot(100 * table["sparsity"], table["accuracy"], marker="o", label=label)
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle="--", label=f"dense ({dense_acc:.1f}%)")
    return finish_accuracy_axes(ax, "sparsity (% of weights that are zero)", title)


def plot_sensitivity(table: pd.DataFrame, *, ax=None, title: str = "Sensitivity of each layer to coring"):
    """Accuracy as each layer alone is cored, one line per layer (from :func:`nnlab.prune.sensitivity_analysis`).

    Args:
        table: long table with columns ``layer``, ``sparsity``, ``accuracy``.
        ax: axes to draw into (default a new figure).
        title: axes title.

    Returns:
        The matplotlib Axes.
    """
    ax = axes_or_new(ax, (6, 4))
    require_columns(table, ("layer", "sparsity", "accuracy"), "table")
    for layer, rows in table.groupby("layer", sort=False):
        label = f"layer {layer}"
        if "type" in rows and "weights" in rows:
            label += f" ({rows['type'].iloc[0]}, {int(rows['weights'].iloc[0]):,} weights)"
        ax.plot(100 * rows["sparsity"], rows["accuracy"], marker="o", label=label)
    return finish_accuracy_axes(ax, "sparsity of that layer alone (%)", title, legend_size=8)
