"""The coring explorer: move a slider, see the weight histogram, the sparsity and the accuracy.

Each move must feel immediate (well under half a second on one core), so
everything that does not depend on the slider is prepared once:

* the original weights of every layer and their magnitude ranks (per layer
  and across the network), so a fraction turns into a mask by one comparison;
* the whole test set as one tensor, evaluated in one batch under ``no_grad``;
* one matplotlib figure whose bars are updated in place.

The explorer works on its own copy of the model; the model passed in is not changed.
"""

from __future__ import annotations

import copy
import time

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .._args import check_choice, check_float, check_positive_int
from ..prune import SCOPES, effective_weight, make_permanent, prunable_layers
from ..base import resolve_device
from ..data import first_images
from ._explorer import Explorer
from ._shown import shown_html

__all__ = ["CoringExplorer", "coring_explorer"]

ALL = "all layers"
CORING_MODES = ("fraction", "threshold")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry by magnitude (0 = smallest), ties broken by position."""
    order = torch.argsort(values.abs(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


class CoringExplorer(Explorer):
    """Interactive coring of a trained network, without retraining.

    Widgets: ``mode`` (fraction or threshold), ``value`` (the slider),
    ``scope`` and ``layer`` (whose histogram is shown).  As in
    :func:`nnlab.prune.core_by_fraction` and :func:`~nnlab.prune.core_by_threshold`:

    * ``scope="global"``: one ranking of all weights (fraction), or one
      magnitude for every layer (threshold);
    * ``scope="layer"``: each layer on its own, the fraction of its weights
      or the threshold in units of its standard deviation; only the picked
      layer is cored (every layer when ``"all layers"`` is picked).

    Call :meth:`update` to apply settings from code: it moves the widgets to
    them (so the controls always show what the figure shows) and returns the
    sparsity and accuracy; ``last_seconds`` says how long it took.

    Args:
        model: a trained network (copied; the original is not changed).
        data: DataBundle or test loader; its test images are evaluated in one batch.
        bins: histogram bins.
        max_test: use at most this many test images.
        device: where to evaluate.
    """

    def __init__(self, model: nn.Module, data, *, bins: int = 80, max_test: int = 1000, device="cpu"):
        self.bins = check_positive_int("bins", bins)
        check_positive_int("max_test", max_test)
        self.device = resolve_device(device)
        self.model = copy.deepcopy(model).to(self.device).eval()
        make_permanent(self.model)  # the copy runs on plain weights, set directly at each update
        self.layers = prunable_layers(self.model)
        self.names = [n for n, _ in self.layers]
        self.original = {n: effective_weight(m).clone() for n, m in self.layers}
        self.layer_ranks = {n: _ranks(w.flatten()) for n, w in self.original.items()}
        self.layer_std = {n: float(w[w != 0].std()) if int((w != 0).sum()) > 1 else 0.0
                          for n, w in self.original.items()}
        flat = torch.cat([w.flatten() for w in self.original.values()])
        ranks = _ranks(flat)
        self.global_ranks, start = {}, 0
        for n, w in self.original.items():
            self.global_ranks[n] = ranks[start:start + w.numel()]
            start += w.numel()
        self.max_abs = float(flat.abs().max())
        x, y = first_images(data, max_test)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.edges = np.linspace(-self.max_abs, self.max_abs, self.bins + 1)
        self.last_seconds = float("nan")
        self.result: dict = {}
        self.shown: dict = {}
        self._quiet = False
        self._build_widgets()
        self._build_figure()

    # -- widgets and figure -------------------------------------------------
    def _build_widgets(self):
        self.mode = widgets.ToggleButtons(options=CORING_MODES, value="fraction", description="coring")
        self.scope = widgets.ToggleButtons(options=SCOPES, value="global", description="scope")
        self.layer = widgets.Dropdown(options=[ALL, *self.names], value=ALL, description="layer")
        settings, value = self._slider_settings("fraction", "global")
        self.value = widgets.FloatSlider(value=value, continuous_update=False, **settings)
        self.label = widgets.HTML()
        # Shown at the figure's own pixel size (6.5 x 3 inches at 80 dpi), not stretched to the cell.
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="520px", height="240px"))
        for w in (self.layer, self.value):
            w.observe(lambda change: self._on_change(), names="value")
        for w in (self.mode, self.scope):
            w.observe(lambda change: self._on_knob(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.mode, self.scope]), widgets.HBox([self.layer, self.value]),
                                    self.label, self.image])

    def _build_figure(self):
        self.figure = Figure(figsize=(6.5, 3.0), dpi=80)
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot(1, 1, 1)
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        self.bars = self.ax.bar(centres, np.ones(self.bins), width=np.diff(self.edges), color="tab:blue")
        self.ax.set_xlabel("weight value (pruned zeros not shown)")
        self.ax.set_ylabel("count")
        # Fixed margins with room for a one-line title (a layout engine would double the drawing time).
        self.figure.subplots_adjust(left=0.12, right=0.97, bottom=0.16, top=0.9)

    def _slider_settings(self, mode: str, scope: str) -> tuple[dict, float]:
        """The slider's range, step, description and readout for a knob, and the knob's starting value."""
        if mode == "fraction":
            return dict(min=0.0, max=1.0, step=0.01, description="fraction", readout_format=".2f"), 0.5
        if scope == "global":
            return (dict(min=0.0, max=round(self.max_abs, 3), step=round(self.max_abs / 200, 4) or 1e-4,
                         description="threshold", readout_format=".3f"), round(self.max_abs / 10, 4))
        return dict(min=0.0, max=4.0, step=0.05, description="t / std", readout_format=".2f"), 1.0

    def _set_controls(self, mode: str, value: float, scope: str, layer: str):
        """Move every widget to these settings without triggering updates."""
        self._quiet = True
        try:
            settings, _ = self._slider_settings(mode, scope)
            settings["max"] = max(settings["max"], value)  # a threshold above the largest weight is allowed
            self.mode.value, self.scope.value, self.layer.value = mode, scope, layer
            # Widen before narrowing, so the value never falls outside the range on the way.
            self.value.max = max(self.value.max, settings["max"])
            self.value.value = value
            for key, v in settings.items():
                setattr(self.value, key, v)
        finally:
            self._quiet = False

    def _on_knob(self):
        """Mode or scope changed: give the slider the range and starting value of the new knob, then update once."""
        if self._quiet:
            return
        _, value = self._slider_settings(self.mode.value, self.scope.value)
        self.update(value=value)

    def _on_change(self):
        if self._quiet:
            return
        self.update()

    # -- the computation ------------------------------------------------------
    def masks(self, mode: str, value: float, scope: str, layer: str) -> dict:
        """The 0/1 mask of every layer for these settings (see :meth:`update`)."""
        check_choice("mode", mode, CORING_MODES)
        check_choice("scope", scope, SCOPES)
        check_choice("layer", layer, [ALL, *self.names])
        if mode == "fraction":
            value = check_float("fraction", value, 0, 1)
        else:
            value = check_float("threshold", value, low=0)
        cored = self.names if (scope == "global" or layer == ALL) else [layer]
        out = {}
        if mode == "threshold":
            for n, w in self.original.items():
                t = value if scope == "global" else value * self.layer_std[n]
                out[n] = (w.abs() >= t) if n in cored else torch.ones_like(w, dtype=torch.bool)
            return out
        if scope == "global":
            total = sum(w.numel() for w in self.original.values())
            k = round(value * total)
            for n, w in self.original.items():
                out[n] = (self.global_ranks[n] >= k).view_as(w)
            return out
        for n, w in self.original.items():
            k = round(value * w.numel()) if n in cored else 0
            out[n] = (self.layer_ranks[n] >= k).view_as(w)
        return out

    @torch.no_grad()
    def update(self, *, mode: str | None = None, value: float | None = None, scope: str | None = None,
               layer: str | None = None, draw: bool = True) -> dict:
        """Apply settings (default: the widgets' current ones), move the widgets to them, redraw.

        Args:
            mode: ``"fraction"`` or ``"threshold"``.
            value: the fraction in ``[0, 1]``, or the threshold ``>= 0``
                (a magnitude with ``scope="global"``, in units of each
                layer's standard deviation with ``scope="layer"``).
            scope: ``"layer"`` or ``"global"``.
            layer: a layer name, or ``"all layers"``: the layer shown (and,
                with ``scope="layer"``, the one cored).
            draw: redraw the histogram (rendered to the widget's image).

        Returns:
            dict with ``sparsity`` (fraction of all prunable weights),
            ``layer_sparsity`` (of the shown layer), ``accuracy`` (percent,
            no retraining) and ``seconds``.
        """
        start = time.perf_counter()
        mode = self.mode.value if mode is None else mode
        value = self.value.value if value is None else value
        scope = self.scope.value if scope is None else scope
        layer = self.layer.value if layer is None else layer
        masks = self.masks(mode, value, scope, layer)  # checks every setting before anything moves
        self._set_controls(mode, float(value), scope, layer)
        zeros, total = 0, 0
        for n, m in self.layers:
            w = self.original[n] * masks[n]
            m.weight.copy_(w)
            zeros += int((w == 0).sum())
            total += w.numel()
        correct = (self.model(self.x).argmax(1) == self.y).sum().item()
        shown = self.names if layer == ALL else [layer]
        w_shown = torch.cat([(self.original[n] * masks[n]).flatten() for n in shown])
        layer_zeros = int((w_shown == 0).sum())
        result = {"sparsity": zeros / total, "layer_sparsity": layer_zeros / w_shown.numel(),
                  "accuracy": 100.0 * correct / len(self.y)}
        settings, _ = self._slider_settings(mode, scope)
        self.shown = {self.mode.description: mode, self.scope.description: scope, self.layer.description: layer,
                      settings["description"]: format(float(value), settings["readout_format"])}
        if draw:
            self._draw(w_shown, layer, result)
        result["seconds"] = self.last_seconds = time.perf_counter() - start
        self.result = result
        return result

    def _draw(self, w_shown, layer, result):
        values = w_shown[w_shown != 0].cpu().numpy()
        counts, _ = np.histogram(values, bins=self.edges)
        for bar, c in zip(self.bars, counts):
            bar.set_height(c)
        self.ax.set_ylim(0, max(1, counts.max()) * 1.05)
        self.ax.set_title(f"{layer}: {result['layer_sparsity']:.1%} of the weights are zero", fontsize=10)
        self._show_figure(self.figure)
        self.label.value = (f"<b>sparsity</b> {result['sparsity']:.1%} of all weights &nbsp; "
                            f"<b>test accuracy</b> {result['accuracy']:.1f}% (no retraining)" + shown_html(self.shown))


def coring_explorer(model: nn.Module, data, **kwargs) -> CoringExplorer:
    """Build a :class:`CoringExplorer` for ``model`` on ``data`` and draw its first state.

    Args:
        model: a trained network (not changed).
        data: DataBundle or test loader.
        **kwargs: ``bins``, ``max_test``, ``device``.

    Returns:
        The explorer; display it in a notebook cell to get the widgets.
    """
    explorer = CoringExplorer(model, data, **kwargs)
    explorer.update()
    return explorer
