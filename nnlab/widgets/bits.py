"""The bit-depth explorer: pick weight and activation bits (per layer too), see accuracy and both grids.

Each move quantises a copy of the float model after training (no
retraining), calibrates its activations on one fixed batch of training
images and evaluates the test images in one batch, then redraws the chosen
layer's weights on their grid and the activations entering that layer on
theirs: well under a second on one core for LeNet-5.
"""

from __future__ import annotations

import time

import ipywidgets as widgets
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .._args import check_choice, check_int, check_positive_int
from ..quant import MAX_BITS, MIN_BITS, GRANULARITIES, ActQuantiser, quantise_model, weight_layers
from ..data import first_images
from ..base import loader_of, resolve_device
from ..plots.reduction import plot_levels
from ._explorer import Explorer
from ._shown import readout, shown_html

__all__ = ["BitExplorer", "bit_explorer"]

SAME = "same as all"


class BitExplorer(Explorer):
    """Interactive post-training quantisation of a trained network.

    Widgets: ``weight_bits`` and ``act_bits`` (sliders, 2 to 16),
    ``granularity`` (per-tensor or per-channel weight scales), ``layer`` (the
    layer whose weights and input activations are drawn, each on its grid)
    and ``layer_bits`` (that layer's own weight bit-depth, or "same as all").
    Call :meth:`update` to apply settings from code: it moves the widgets to
    them (so the controls always show what the figure shows) and returns the
    accuracy; ``last_seconds`` says how long the update took.

    Args:
        model: a trained float network (not changed).
        data: DataBundle: its test images are evaluated, and one batch of its
            training images calibrates the activations.
        calibration_images: how many training images calibrate activations.
        max_test: use at most this many test images.
        bins: histogram bins.
        device: where to evaluate.
    """

    def __init__(self, model: nn.Module, data, *, calibration_images: int = 256, max_test: int = 1000,
                 bins: int = 80, device="cpu"):
        check_positive_int("calibration_images", calibration_images)
        check_positive_int("max_test", max_test)
        self.bins = check_positive_int("bins", bins)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.names = list(weight_layers(model))
        self.x, self.y = self._take(loader_of(data, "test"), max_test)
        x_cal, _ = self._take(loader_of(data, "train"), calibration_images, seed=0)
        self.calibration = [(x_cal, None)]
        self.overrides: dict = {}
        self.quantised = None
        self.last_seconds = float("nan")
        self.result: dict = {}
        self.shown: dict = {}
        self.activations = None
        self._quiet = False
        self._build_widgets()
        self._build_figure()

    def _take(self, loader, n, seed=None):
        with torch.random.fork_rng(devices=[]):  # a shuffled loader draws its order from torch's RNG
            if seed is not None:
                torch.manual_seed(seed)
            x, y = first_images(loader, n)
        return x.to(self.device), y.to(self.device)

    # -- widgets and figure -------------------------------------------------
    def _build_widgets(self):
        style = {"description_width": "110px"}
        self.weight_bits = widgets.IntSlider(value=8, min=MIN_BITS, max=MAX_BITS, description="weight bits",
                                             continuous_update=False, style=style)
        self.act_bits = widgets.IntSlider(value=8, min=MIN_BITS, max=MAX_BITS, description="activation bits",
                                          continuous_update=False, style=style)
        self.granularity = widgets.ToggleButtons(options=GRANULARITIES, value="per_channel",
                                                 description="weight scales", style=style)
        self.layer = widgets.Dropdown(options=self.names, value=self.names[0], description="layer", style=style)
        self.layer_bits = widgets.Dropdown(options=[SAME, *range(MIN_BITS, MAX_BITS + 1)], value=SAME,
                                           description="its weight bits", style=style)
        self.label = widgets.HTML()
        self.image = widgets.Image(format="png")
        for w in (self.weight_bits, self.act_bits, self.granularity):
            w.observe(lambda change: self._on_change(), names="value")
        self.layer.observe(lambda change: self._on_layer(), names="value")
        self.layer_bits.observe(lambda change: self._on_layer_bits(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.weight_bits, self.act_bits]), self.granularity,
                                    widgets.HBox([self.layer, self.layer_bits]), self.label, self.image])

    def _build_figure(self):
        self.figure = Figure(figsize=(10, 3.2), dpi=80)
        FigureCanvasAgg(self.figure)
        self.ax, self.act_ax = self.figure.subplots(1, 2)
        # Fixed margins with room for a one-line title (a layout engine would double the drawing time).
        self.figure.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.9, wspace=0.22)

    def _on_change(self):
        if not self._quiet:
            self.update()

    def _on_layer(self):
        if not self._quiet:
            self.update()

    def _on_layer_bits(self):
        if self._quiet:
            return
        if self.layer_bits.value == SAME:
            self.overrides.pop(self.layer.value, None)
        else:
            self.overrides[self.layer.value] = int(self.layer_bits.value)
        self.update()

    # -- the computation ------------------------------------------------------
    @torch.no_grad()
    def update(self, *, weight_bits: int | None = None, act_bits: int | None = None, granularity: str | None = None,
               layer: str | None = None, overrides: dict | None = None, draw: bool = True) -> dict:
        """Quantise with these settings (default: the widgets' current ones), evaluate, redraw.

        Args:
            weight_bits: bits of every weight layer (2..16).
            act_bits: bits of the activations (2..16).
            granularity: ``"per_channel"`` or ``"per_tensor"`` weight scales.
            layer: the layer whose weights and input activations are drawn.
            overrides: per-layer weight bits, ``{"conv1": 8}`` (replaces the
                explorer's current per-layer choices).
            draw: redraw the histograms (rendered to the widget's image).

        Returns:
            dict with ``accuracy`` (percent, no retraining), ``bits`` (weight
            bits of each layer), ``act_bits``, ``act_distinct`` (distinct
            activation values entering the drawn layer on the test images)
            and ``seconds``.
        """
        start = time.perf_counter()
        weight_bits = check_int("weight_bits", self.weight_bits.value if weight_bits is None else weight_bits,
                                MIN_BITS, MAX_BITS)
        act_bits = check_int("act_bits", self.act_bits.value if act_bits is None else act_bits, MIN_BITS, MAX_BITS)
        granularity = check_choice("granularity", self.granularity.value if granularity is None else granularity,
                                   GRANULARITIES)
        layer = check_choice("layer", self.layer.value if layer is None else layer, self.names)
        if overrides is not None:
            for name, bits in overrides.items():
                check_choice("overrides layer", name, self.names)
                check_int(f"overrides[{name!r}]", bits, MIN_BITS, MAX_BITS)
            self.overrides = dict(overrides)
        self._set_controls(weight_bits, act_bits, granularity, layer)
        self.quantised = quantise_model(self.model, self.calibration, weight_bits, act_bits,
                                        granularity=granularity, overrides=self.overrides,
                                        calibration_batches=1, device=self.device)
        captured = []
        hook = self.quantised.get_submodule(layer).register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0].detach()))
        try:
            correct = (self.quantised(self.x).argmax(1) == self.y).sum().item()
        finally:
            hook.remove()
        self.activations = captured[0]
        bits = {n: self.overrides.get(n, weight_bits) for n in self.names}
        result = {"accuracy": 100.0 * correct / len(self.y), "bits": bits, "act_bits": act_bits,
                  "act_distinct": int(torch.unique(self.activations).numel())}
        layer_bits = self.overrides.get(layer, SAME)
        self.shown = {self.weight_bits.description: readout(self.weight_bits, weight_bits),
                      self.act_bits.description: readout(self.act_bits, act_bits),
                      self.granularity.description: granularity, self.layer.description: layer,
                      self.layer_bits.description: str(layer_bits)}
        if draw:
            self._draw(layer, result, act_bits)
        result["seconds"] = self.last_seconds = time.perf_counter() - start
        self.result = result
        return result

    def _set_controls(self, weight_bits, act_bits, granularity, layer):
        """Move every widget to these settings without triggering updates."""
        self._quiet = True
        try:
            self.weight_bits.value, self.act_bits.value, self.granularity.value = weight_bits, act_bits, granularity
            self.layer.value = layer
            self.layer_bits.value = self.overrides.get(layer, SAME)
        finally:
            self._quiet = False

    def _input_quantiser(self, layer: str) -> ActQuantiser:
        """The activation quantiser whose output enters ``layer``, found by following its input back in the graph.

        Raises:
            RuntimeError: no activation quantiser feeds ``layer`` (the quantised model is not a traced graph with
                quantised activations), so its input has no grid to draw.
        """
        graph = getattr(self.quantised, "graph", None)
        if graph is not None:
            node = next((n for n in graph.nodes if n.op == "call_module" and n.target == layer), None)
            while node is not None and node.all_input_nodes:
                node = node.all_input_nodes[0]
                if node.op == "call_module" and isinstance(self.quantised.get_submodule(node.target), ActQuantiser):
                    return self.quantised.get_submodule(node.target)
        raise RuntimeError(f"no activation quantiser feeds layer {layer!r} of the quantised model, so the "
                           f"activations entering it have no grid to draw")

    def _draw(self, layer, result, act_bits):
        self.ax.clear()
        bits = result["bits"][layer]
        plot_levels(self.quantised.get_submodule(layer), ax=self.ax, bins=self.bins)
        self.ax.set_title(f"{layer} weights, {bits} bits: " + self.ax.get_title().split(": ", 1)[-1], fontsize=9)
        self.act_ax.clear()
        q = self._input_quantiser(layer)
        values = self.activations.flatten().float().cpu()
        plot_levels(values, q.spec, q.scale, q.zero_point, ax=self.act_ax, bins=self.bins)
        self.act_ax.set_yscale("log")
        self.act_ax.set_title(f"activations entering {layer}, {act_bits} bits: {result['act_distinct']} "
                              f"distinct values", fontsize=9)
        self.act_ax.set_xlabel("activation value (red: quantisation levels)")
        self.act_ax.set_ylabel("count (log scale)")
        self._show_figure(self.figure)
        per_layer = ", ".join(f"{n}: {b}" for n, b in result["bits"].items())
        self.label.value = (f"<b>test accuracy</b> {result['accuracy']:.1f}% (no retraining) &nbsp; "
                            f"<b>activation bits</b> {act_bits} &nbsp; <b>weight bits per layer</b> {per_layer}"
                            + shown_html(self.shown))


def bit_explorer(model: nn.Module, data, **kwargs) -> BitExplorer:
    """Build a :class:`BitExplorer` for ``model`` on ``data`` and draw its first state.

    Args:
        model: a trained float network (not changed).
        data: DataBundle.
        **kwargs: ``calibration_images``, ``max_test``, ``bins``, ``device``.

    Returns:
        The explorer; display it in a notebook cell to get the widgets.
    """
    explorer = BitExplorer(model, data, **kwargs)
    explorer.update()
    return explorer
