"""The NNA explorer: choose each layer's weight bit-depth and sparsity, see bytes, energy, latency and accuracy.

Each move re-targets the compiled program's weights
(:func:`nnlab.nna.requantise_weights`: prune to the chosen share of zeros,
round onto the chosen grid), runs the integer engine on the test images,
costs the result (:func:`nnlab.nna.report`) and redraws the bars; activations
keep their grids, and nothing is retrained.  Everything that does not depend
on the sliders (the test images, the figure) is prepared once.  Start from
a program compiled at high precision (16-bit weights), so each choice rounds
the weights only once.
"""

from __future__ import annotations

import time

import ipywidgets as widgets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._args import check_positive_int
from ..nna import SERIES2NX, NNAConfig, Program, headline, report, requantise_weights, run
from ..plots.nna import plot_nna_costs
from ..data import first_images
from ._explorer import Explorer
from ._shown import readout, shown_html

__all__ = ["NNAExplorer", "nna_explorer"]


class NNAExplorer(Explorer):
    """Per-layer weight bit-depth and sparsity sliders over a compiled program.

    Call :meth:`update` to apply settings from code: it moves the sliders to
    them, so the sliders always show what the bars show.

    Args:
        program: a compiled :class:`nnlab.nna.Program` (ideally 16-bit weights).
        data: DataBundle (its test set measures accuracy) or a test loader.
        config: the accelerator costed (its ``min_bits..max_bits`` bound the sliders).
        max_test: use at most this many test images.
        bits: the initial bit-depth of every layer (default: the config's ``min_bits`` or 8, whichever is larger).

    Attributes:
        widget: the ipywidgets box; ``bits`` and ``sparsity``: dicts layer -> slider.
        result: the last :meth:`update`'s figures.
    """

    def __init__(self, program: Program, data, config: NNAConfig = SERIES2NX, *, max_test: int = 1000,
                 bits: int | None = None):
        if not isinstance(program, Program):
            raise TypeError(f"program must be a nnlab.nna Program, got {type(program).__name__}")
        check_positive_int("max_test", max_test)
        self.program, self.config = program, config
        x, y = first_images(data, max_test)
        self.x, self.y = x.numpy(), y.numpy()
        self.names = [layer.name for layer in program.weight_layers]
        start_bits = bits if bits is not None else max(8, config.min_bits)
        self.bits = {n: widgets.IntSlider(value=start_bits, min=max(2, config.min_bits), max=min(16, config.max_bits),
                                          description=f"{n} bits", continuous_update=False) for n in self.names}
        self.sparsity = {n: widgets.FloatSlider(value=round(float(np.mean(layer.weight == 0)), 2), min=0.0,
                                                max=0.99, step=0.01, description=f"{n} zeros",
                                                continuous_update=False, readout_format=".2f")
                         for n, layer in zip(self.names, program.weight_layers)}
        self._quiet = False
        self.shown: dict = {}
        for w in (*self.bits.values(), *self.sparsity.values()):
            w.observe(lambda change: None if self._quiet else self.update(), names="value")
        self.label = widgets.HTML()
        self.image = widgets.Image(format="png")
        rows = [widgets.HBox([self.bits[n], self.sparsity[n]]) for n in self.names]
        self.widget = widgets.VBox([*rows, self.label, self.image])
        self.figure = Figure(figsize=(11, 3.2), dpi=72)
        FigureCanvasAgg(self.figure)
        self.last_seconds = float("nan")
        self.result: dict = {}

    def update(self, bits: dict | None = None, sparsity: dict | None = None, draw: bool = True) -> dict:
        """Apply settings (default: the sliders'), move the sliders to them, run and cost the program, redraw.

        Args:
            bits: layer name -> weight bit-depth (missing layers: their slider).
            sparsity: layer name -> share of zero weights.
            draw: redraw the bars.

        Returns:
            dict: ``accuracy`` (percent), ``storage_bytes``, ``compression``,
            ``energy_uj``, ``energy_ratio``, ``latency_us`` and ``seconds``.

        Raises:
            ValueError: an unknown layer, or a value outside its slider's range
                (the accelerator's bit-depths; shares of zeros 0 to 0.99).
        """
        start = time.perf_counter()
        b = {n: s.value for n, s in self.bits.items()} | dict(bits or {})
        z = {n: s.value for n, s in self.sparsity.items()} | dict(sparsity or {})
        program = requantise_weights(self.program, weight_bits=b, sparsity=z)  # checks names and values
        for kind, values, sliders in (("bits", b, self.bits), ("sparsity", z, self.sparsity)):
            for name, value in values.items():
                slider = sliders[name]
                if not slider.min <= value <= slider.max:
                    raise ValueError(f"{kind}[{name!r}] must be in {slider.min}..{slider.max} (the range of its "
                                     f"slider on {self.config.name}), got {value}")
        self._quiet = True
        try:
            for name, value in b.items():
                self.bits[name].value = value
            for name, value in z.items():
                self.sparsity[name].value = value
        finally:
            self._quiet = False
        self.shown = {**{s.description: readout(s, b[n]) for n, s in self.bits.items()},
                      **{s.description: readout(s, z[n]) for n, s in self.sparsity.items()}}
        accuracy = 100.0 * float(np.mean(run(program, self.x).predictions == self.y))
        table = report(program, self.config)
        s = headline(table)
        result = {"accuracy": accuracy, **{k: s[k] for k in ("storage_bytes", "compression", "energy_uj",
                                                             "energy_ratio", "latency_us")}}
        if draw:
            plot_nna_costs(table, self.figure)
            self._show_figure(self.figure)
            self.label.value = (f"<b>accuracy</b> {accuracy:.1f}% (no retraining) &nbsp; <b>storage</b> "
                                f"{s['storage_bytes']:,} B ({s['compression']:.1f}x smaller than fp32) &nbsp; "
                                f"<b>energy</b> {s['energy_uj']:.2f} µJ ({s['energy_ratio']:.1f}x less) &nbsp; "
                                f"<b>latency</b> {s['latency_us']:.2f} µs" + shown_html(self.shown))
        result["seconds"] = self.last_seconds = time.perf_counter() - start
        self.result = result
        return result


def nna_explorer(program: Program, data, config: NNAConfig = SERIES2NX, **kwargs) -> NNAExplorer:
    """Build an :class:`NNAExplorer` and draw its first state.

    Args:
        program: a compiled program (ideally 16-bit weights).
        data: DataBundle or test loader.
        config: the accelerator.
        **kwargs: ``max_test``, ``bits``.

    Returns:
        The explorer; display it in a notebook cell to get the widgets.
    """
    explorer = NNAExplorer(program, data, config, **kwargs)
    explorer.update()
    return explorer
