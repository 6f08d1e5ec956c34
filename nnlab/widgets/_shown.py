"""What an explorer shows, in the words of its controls.

Each explorer computes from settings: the widgets' values, or the arguments
of ``update(...)`` (which then moves the widgets).  After each update it
writes the settings it used into its label as a hidden element::

    <span class="nnlab-shown" hidden data-shown='{"fraction": "0.90", "layer": "fc1"}'></span>

keyed by each control's description and formatted as that control displays
its value (a slider's readout, a dropdown's or toggle's label).  The browser
test reads every control on the page and checks that it displays what the
explorer says it computed, so a control that does not follow ``update`` (or a
figure that does not follow a control) is caught.
"""

from __future__ import annotations

import html
import json

__all__ = ["readout", "shown_html"]


def readout(slider, value) -> str:
    """``value`` as ``slider`` displays it (its ``readout_format``, as in the browser)."""
    return format(value, slider.readout_format)


def shown_html(shown: dict) -> str:
    """The hidden element that records ``{control description: displayed value}``."""
    data = json.dumps({str(k): str(v) for k, v in shown.items()}, sort_keys=True)
    return f'<span class="nnlab-shown" hidden data-shown="{html.escape(data, quote=True)}"></span>'
