"""The budget explorer: set a budget, see the bits and zeros chosen per layer and where the choice lands.

The sensitivity of every layer is measured once
(:func:`nnlab.picker.measure_sensitivity`) and every uniform setting (all
layers at one bit-depth and one sparsity) is run once on the test images.
Each move of the budget slider then asks :func:`nnlab.picker.pick_per_layer`
for a choice (the knapsack, the check against the uniform settings, the
measured cost and test accuracy of the chosen program) and redraws two
panels: the bit-depth and the share of zeros of each layer, and the
accuracy/cost plane with every uniform setting, the Pareto front of the
uniform settings, the budget and the choice.
"""

from __future__ import annotations

import html
import time

import ipywidgets as widgets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .._args import check_choice, check_positive_int
from ..picker import BUDGETS, SensitivityTable, measure_sensitivity, pick_per_layer, uniform_settings
from ._explorer import Explorer

__all__ = ["BudgetExplorer", "budget_explorer"]

_LABELS = {"budget_bytes": "storage (bytes)", "budget_energy_uj": "energy per inference (µJ)",
           "budget_latency_us": "latency per inference (µs)"}


class BudgetExplorer(Explorer):
    """A budget slider over :func:`nnlab.picker.pick_per_layer`.

    Args:
        model: the trained float network (not changed).
        data: DataBundle: training images measure the sensitivity, test images the accuracy.
        budget: which budget the slider sets: ``"budget_bytes"``,
            ``"budget_energy_uj"`` or ``"budget_latency_us"``.
        sensitivity: a :class:`nnlab.picker.SensitivityTable` measured before
            (default: measured here with ``bits``, ``sparsities``, ``images``).
        bits, sparsities, images, hardware, act_bits: as for :func:`nnlab.picker.measure_sensitivity`.
        max_test: test images per evaluation.
        value: the first budget (default the middle of the reachable range, in the budget's unit).

    Attributes:
        widget: the ipywidgets box; ``slider``: the budget slider.
        table: the sensitivity table; ``uniform``: every uniform setting with its test accuracy.
        choice: the last :class:`nnlab.picker.PerLayerChoice`.
        result: the last :meth:`update`'s figures (``budget``, ``bits``, ``sparsity``,
            ``accuracy``, the three costs, ``how``, ``seconds``).
    """

    def __init__(self, model: nn.Module, data, *, budget: str = "budget_bytes",
                 sensitivity: SensitivityTable | None = None, bits=None, sparsities=None, images: int = 128,
                 hardware=None, act_bits: int = 8, max_test: int = 500, value: float | None = None):
        check_choice("budget", budget, BUDGETS)
        self.max_test = check_positive_int("max_test", max_test)
        self.model, self.data, self.budget = model, data, budget
        if sensitivity is None:
            sensitivity = measure_sensitivity(model, data, bits=bits, sparsities=sparsities, images=images,
                                              hardware=hardware, act_bits=act_bits)
        elif not isinstance(sensitivity, SensitivityTable):
            raise TypeError(f"sensitivity must be a SensitivityTable, got {type(sensitivity).__name__}")
        self.table = sensitivity
        self.column, self.unit, self.factor = BUDGETS[budget]
        self.uniform = uniform_settings(self.table, data, max_test=max_test)
        lo, hi = (v * self.factor for v in self.table.cost_range(self.column))
        start = (lo + hi) / 2 if value is None else float(value)
        if not lo <= start <= hi:
            raise ValueError(f"value must be a {budget} between {lo:,.6g} and {hi:,.6g} {self.unit}, got {value!r}")
        step = (hi - lo) / 200
        self.slider = widgets.FloatSlider(value=start, min=lo, max=hi, step=step, description="budget",
                                          continuous_update=False, readout_format=",.4g",
                                          layout=widgets.Layout(width="520px"))
        self.slider.observe(lambda change: self.update(), names="value")
        self.label = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.widget = widgets.VBox([self.slider, self.label, self.image])
        self.figure = Figure(figsize=(11, 3.6), dpi=72)
        FigureCanvasAgg(self.figure)
        self.choice = None
        self.result: dict = {}
        self.last_seconds = float("nan")

    def update(self, value: float | None = None, draw: bool = True) -> dict:
        """Choose for a budget (default the slider's), measure it and redraw.

        Args:
            value: the budget, in the slider's unit.
            draw: redraw the label and the figure.

        Returns:
            :attr:`result`.
        """
        start = time.perf_counter()
        value = self.slider.value if value is None else value
        choice = pick_per_layer(self.model, self.data, sensitivity=self.table, max_test=self.max_test,
                                **{self.budget: value})
        self.choice = choice
        m = choice.measured
        self.result = {"budget": value, "bits": choice.bits, "sparsity": choice.sparsity, "how": choice.how,
                       "accuracy": m["accuracy"], "storage_bytes": m["storage_bytes"], "energy_uj": m["energy_uj"],
                       "latency_us": m["latency_us"]}
        if draw:
            self._draw(choice, value)
        self.result["seconds"] = self.last_seconds = time.perf_counter() - start
        return self.result

    def _measured_cost(self, choice) -> float:
        key = {"storage_B": "storage_bytes", "energy_nJ": "energy_uj", "latency_us": "latency_us"}[self.column]
        return choice.measured[key]

    def _draw(self, choice, value):
        layers = choice.layers
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{b}</td><td>{s:.0%}</td></tr>"
                       for n, b, s in zip(layers["layer"], layers["bits"], layers["sparsity"]))
        fits = self.uniform[self.uniform[self.column] * self.factor <= value]
        best = fits.loc[fits["accuracy"].idxmax()] if len(fits) else None
        uniform_text = ("no uniform setting fits" if best is None else
                        f"best uniform setting that fits: {int(best['bits'])} bits, {best['sparsity']:.0%} zeros, "
                        f"{best['accuracy']:.1f}%")
        m = choice.measured
        self.label.value = (
            f"<b>budget</b> {value:,.6g} {self.unit} &nbsp; <b>choice</b> ({choice.how}): accuracy "
            f"<b>{m['accuracy']:.1f}%</b>, {m['storage_bytes']:,} B, {m['energy_uj']:.3f} µJ, "
            f"{m['latency_us']:.3f} µs &nbsp; ({uniform_text})"
            f"<table><tr><th>layer</th><th>bits</th><th>zeros</th></tr>{rows}</table>")
        fig = self.figure
        fig.clear()
        ax_bits, ax_pareto = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
        x = np.arange(len(layers))
        ax_bits.bar(x - 0.2, layers["bits"], width=0.4, color="tab:blue", label="bits")
        ax_bits.set_ylabel("weight bits")
        ax_bits.set_ylim(0, 17)
        ax_bits.set_xticks(x, layers["layer"], rotation=60 if len(layers) > 6 else 0, fontsize=8)
        ax_zeros = ax_bits.twinx()
        ax_zeros.bar(x + 0.2, 100 * layers["sparsity"], width=0.4, color="tab:orange", label="zeros")
        ax_zeros.set_ylim(0, 100)
        ax_zeros.set_ylabel("zeros (%)")
        ax_bits.set_title("chosen per layer: bits (blue), zeros (orange)", fontsize=10)
        u = self.uniform
        cost = u[self.column] * self.factor
        ax_pareto.scatter(cost, u["accuracy"], c=u["bits"], cmap="viridis", s=18, label="uniform settings")
        order = np.argsort(cost.to_numpy())
        front = np.maximum.accumulate(u["accuracy"].to_numpy()[order])
        ax_pareto.step(cost.to_numpy()[order], front, where="post", color="grey", lw=1, label="uniform front")
        ax_pareto.axvline(value, color="tab:red", ls="--", lw=1, label="budget")
        ax_pareto.scatter([self._measured_cost(choice)], [m["accuracy"]], marker="*", s=180, color="tab:red",
                          zorder=5, label="per-layer choice")
        ax_pareto.set_xscale("log")
        ax_pareto.set_xlabel(_LABELS[self.budget] + ", log scale")
        ax_pareto.set_ylabel("test accuracy (%)")
        ax_pareto.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        self._show_figure(fig)


def budget_explorer(model: nn.Module, data, **kwargs) -> BudgetExplorer:
    """Build a :class:`BudgetExplorer` and draw its first state.

    Args:
        model: the trained float network.
        data: DataBundle.
        **kwargs: as for :class:`BudgetExplorer` (``budget``, ``sensitivity``, ``bits``,
            ``sparsities``, ``images``, ``hardware``, ``act_bits``, ``max_test``, ``value``).

    Returns:
        The explorer; display it in a notebook cell to get the widgets.
    """
    explorer = BudgetExplorer(model, data, **kwargs)
    explorer.update()
    return explorer
