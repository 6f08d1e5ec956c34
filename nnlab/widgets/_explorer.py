"""What every explorer does alike: draw its figure into its image, and show itself when a notebook cell ends with it."""

from __future__ import annotations

import io

from IPython.display import display

__all__ = ["Explorer"]


class Explorer:
    """Base of the explorers (:class:`~nnlab.widgets.CoringExplorer` and the others).

    A subclass sets ``widget`` (the box of controls and outputs it shows), ``image`` (an ``ipywidgets.Image``)
    and ``result`` (an empty dict until its first ``update()``), and defines ``update()``.
    """

    def _show_figure(self, figure) -> None:
        """Render ``figure`` as a PNG into ``self.image`` (here, so an update's timing includes the drawing)."""
        png = io.BytesIO()
        figure.savefig(png, format="png")
        self.image.value = png.getvalue()

    def _ipython_display_(self):
        """Shown in a notebook: computed first if no update has run yet, then the widgets."""
        if not self.result:
            self.update()
        display(self.widget)
