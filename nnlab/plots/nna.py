"""Plots of the deployment chapter: where the bytes, the joules and the time go (NNA simulator)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ._axes import require_columns

__all__ = ["plot_nna_costs", "plot_weight_codes", "plot_stages", "style_report", "REPORT_FORMATS"]

_BYTES = [("payload_B", "weights"), ("index_B", "index"), ("params_B", "parameters"), ("padding_B", "padding")]
_ENERGY = [("energy_mac_nJ", "MACs"), ("energy_sram_nJ", "SRAM"), ("energy_dram_nJ", "DRAM")]


#: How a person reads each column of an :func:`nnlab.nna.report` table (format strings).
REPORT_FORMATS = {
    "w_bits": "{:.0f}", "a_bits": "{:.0f}", "density": "{:.1%}",
    **{c: "{:,.0f}" for c in ("payload_B", "index_B", "params_B", "padding_B", "storage_B", "fp32_B", "macs_dense",
                              "macs", "dram_B", "sram_B", "cycles_compute", "cycles_memory", "cycles",
                              "decode_symbols", "cycles_decode")},
    "compression": "{:.1f}x", "energy_ratio": "{:.1f}x",
    **{c: "{:,.1f}" for c in ("energy_mac_nJ", "energy_sram_nJ", "energy_dram_nJ", "energy_decode_nJ", "energy_nJ",
                              "fp32_energy_nJ")},
    "latency_us": "{:.3f}", "fp32_latency_us": "{:.3f}", "saturated": "{:,.0f}", "sum_bits": "{:.0f}",
}


def style_report(table: pd.DataFrame):
    """A report table as a person reads it: whole bytes and MACs, density in %, no NaN.

    Cells that do not apply to a layer (bits of a pooling layer, the
    compression of the input quantiser) are left empty; the table itself is
    not changed, so its exact figures remain available.

    Args:
        table: a :func:`nnlab.nna.report` table, or some of its columns.

    Returns:
        A pandas ``Styler`` (displays in a notebook; ``.to_html()`` for a page).
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame from nnlab.nna.report, got {type(table).__name__}")
    formats = {c: f for c, f in REPORT_FORMATS.items() if c in table.columns}
    return table.style.format(formats, na_rep="").hide(axis="index")


def _layers(table: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame) or "storage_B" not in table:
        raise TypeError("table must be a report from nnlab.nna.report")
    return table[(table["layer"] != "total") & ((table["macs_dense"] > 0) | (table["op"] == "quantise"))]


def plot_nna_costs(table: pd.DataFrame, fig: Figure | None = None, log: bool = True) -> Figure:
    """Three panels per layer: storage bytes, energy per inference and latency, NNA next to fp32.

    Storage and energy bars are stacked by kind (weights / index /
    parameters / padding; MACs / SRAM / DRAM); a grey bar shows the fp32
    dense network on the same accelerator.

    Args:
        table: a :func:`nnlab.nna.report` table.
        fig: a matplotlib Figure to draw into (cleared); default a new one.
        log: logarithmic y axes (the fp32 bars are tens of times taller).

    Returns:
        The Figure.
    """
    rows = _layers(table)
    fig = fig or Figure(figsize=(11, 3.4))
    fresh = len(fig.axes) != 3
    if fresh:
        fig.clear()
        axes = fig.subplots(1, 3)
    else:  # redraw into the same axes (the explorer does, at every move): no new layout to compute
        axes = fig.axes
        for ax in axes:
            ax.clear()
    x = np.arange(len(rows))
    width = 0.4
    energy = _ENERGY + ([("energy_decode_nJ", "Huffman decoding")]  # only where some layer is Huffman-coded
                        if "energy_decode_nJ" in rows and rows["energy_decode_nJ"].sum() > 0 else [])
    panels = [(axes[0], _BYTES, "fp32_B", "bytes stored"),
              (axes[1], energy, "fp32_energy_nJ", "energy per inference (nJ)"),
              (axes[2], [("latency_us", "NNA")], "fp32_latency_us", "latency (µs)")]
    for ax, parts, base_col, title in panels:
        ax.bar(x - width / 2, rows[base_col], width, color="0.75", label="fp32 dense")
        bottom = np.zeros(len(rows))
        for col, label in parts:
            ax.bar(x + width / 2, rows[col], width, bottom=bottom, label=label)
            bottom += rows[col].to_numpy(dtype=float)
        ax.set_xticks(x, rows["layer"], rotation=30, ha="right", rotation_mode="anchor")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_xlabel("layer")
    if fresh:
        fig.tight_layout()
    return fig


def plot_weight_codes(layer, fig: Figure | None = None) -> Figure:
    """Histogram of a compiled layer's integer weights (zeros included), on its grid.

    Args:
        layer: a :class:`nnlab.nna.WeightLayer`.
        fig: a Figure to draw into; default a new one.

    Returns:
        The Figure.
    """
    fig = fig or Figure(figsize=(5, 2.8))
    fig.clear()
    ax = fig.subplots()
    top = 2 ** (layer.weight_bits - 1)
    if top <= 32:  # one bar per level of the grid
        values, counts = np.unique(layer.weight, return_counts=True)
        ax.bar(values, counts, width=0.8)
    else:  # too many levels to show one by one
        ax.hist(layer.weight.reshape(-1), bins=63, range=(-top, top))
    ax.set_yscale("log")
    ax.set_xlim(-top - 0.5, top - 0.5)
    ax.set_xlabel(f"integer weight ({layer.weight_bits}-bit grid)")
    ax.set_ylabel("count")
    zeros = np.mean(layer.weight == 0)
    ax.set_title(f"layer {layer.name}: {layer.weight.size:,} weights, {zeros:.0%} zero", fontsize=10)
    fig.tight_layout()
    return fig


def plot_stages(stages: pd.DataFrame, x: str = "energy_uj", fig: Figure | None = None) -> Figure:
    """Accuracy against energy (or bytes) per inference for each stage of the compression story.

    One hollow marker per stage, each with its own shape and colour and
    numbered as in the legend, so stages with the same cost (e.g. every
    float stage on the fp32 accelerator) stay distinguishable where they
    overlap; their numbers are set left and right of the markers in turn.
    Nothing is moved: every marker sits at its stage's figures.

    Args:
        stages: DataFrame with a ``stage`` column, ``accuracy`` (percent) and the ``x`` column.
        x: the cost column, e.g. ``"energy_uj"`` or ``"storage_bytes"``.
        fig: a Figure to draw into; default a new one.

    Returns:
        The Figure (log x axis).
    """
    require_columns(stages, ("stage", "accuracy", x), "stages")
    fig = fig or Figure(figsize=(6.5, 3.6))
    fig.clear()
    ax = fig.subplots()
    markers = "osD^vP*Xh"
    colours = colormaps["tab10"]
    seen: dict = {}
    for k, (_, row) in enumerate(stages.iterrows()):
        ax.scatter(row[x], row["accuracy"], s=70, marker=markers[k % len(markers)], facecolors="none",
                   edgecolors=[colours(k % 10)], linewidths=1.6, label=f"{k + 1}  {row['stage']}", zorder=3)
        side = seen.get(row[x], 0)  # stages at the same cost: numbers to the right, left, right ...
        seen[row[x]] = side + 1
        ax.annotate(str(k + 1), (row[x], row["accuracy"]), xytext=(7 if side % 2 == 0 else -13, -3),
                    textcoords="offset points", fontsize=8, color=colours(k % 10))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = stages[x].min(), stages[x].max()
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.margins(y=0.15)
    label = {"energy_uj": "energy per inference (µJ)", "storage_bytes": "weight storage (bytes)",
             "latency_us": "latency per inference (µs)"}.get(x, x.replace("_", " "))
    ax.set_xlabel(label + ", log scale")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig
