"""Sweeps: run a function for every combination of some settings and collect one table.

The course measures the same thing for many settings (bit-depths, sparsities,
methods).  Instead of writing the loop and the list of rows each time::

    rows = []
    for bits in [8, 6, 4]:
        rows.append({"bits": bits, **measure(bits)})
    table = pd.DataFrame(rows)

write what one setting measures and let :func:`sweep` do the rest::

    from nnlab.sweep import sweep

    table = sweep(lambda bits: {"accuracy": accuracy(quantise(bits), data)}, bits=[8, 6, 4])
"""

from __future__ import annotations

import itertools
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

__all__ = ["sweep"]


def sweep(fn: Callable[..., dict], /, *, progress: bool = True, desc: str | None = None, **grid) -> pd.DataFrame:
    """Call ``fn`` for every combination of the grid's values; one row per call.

    Args:
        fn: called as ``fn(**setting)`` for each combination, e.g.
            ``fn(bits=8, method="ste")``; returns a dict of measured values
            (column name -> value).
        progress: show a progress bar (``tqdm.auto``: a widget in Jupyter,
            text elsewhere; ``TQDM_DISABLE=1`` hides it).
        desc: the progress bar's label (default: the grid's names).
        **grid: name -> the values to try (a list, a tuple, a range ...).
            Combinations run in order, the last name varying fastest, as in
            nested ``for`` loops written in the same order.

    Returns:
        pandas DataFrame with one row per combination: the grid's names as
        the first columns, then the keys of ``fn``'s dicts (in the order they
        first appear).  Index 0..n-1; call ``.set_index(...)`` for another.

    Raises:
        TypeError: ``fn`` is not callable, a grid value is a string or not
            iterable, or ``fn`` returned something other than a dict.
        ValueError: no grid was given, a grid has no values, or ``fn``
            returned a key that is also a grid name.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function returning a dict, got {type(fn).__name__}")
    if not grid:
        raise ValueError("sweep needs at least one grid, e.g. sweep(fn, bits=[8, 4])")
    axes = {}
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"grid {name!r} must be a list (or other iterable) of values, got {values!r}")
        axes[name] = list(values)
        if not axes[name]:
            raise ValueError(f"grid {name!r} has no values; give at least one")
    combos = list(itertools.product(*axes.values()))
    rows = []
    for values in tqdm(combos, desc=desc or ", ".join(axes), disable=not progress, leave=False):
        setting = dict(zip(axes, values))
        result = fn(**setting)
        if not isinstance(result, dict):
            raise TypeError(f"fn must return a dict (column -> value), got {type(result).__name__} "
                            f"for {setting}")
        clash = sorted(set(result) & set(axes))
        if clash:
            raise ValueError(f"fn returned {clash}, which are also grid names; rename the measured values")
        rows.append({**setting, **result})
    return pd.DataFrame(rows)
