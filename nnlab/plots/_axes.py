"""What the course's line plots share: a fresh axes when none is given, the column check, the accuracy axes' finish."""

from __future__ import annotations

import matplotlib.pyplot as plt


def axes_or_new(ax, figsize: tuple):
    """``ax``, or the axes of a new figure ``figsize`` inches wide and high when ``ax`` is None."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def require_columns(table, columns, what: str) -> None:
    """Refuse a table without every one of ``columns``.

    Raises:
        ValueError: naming ``what`` (how the caller's argument is called), the first missing column and the
            columns the table has.
    """
    for col in columns:
        if col not in table:
            raise ValueError(f"{what} needs a {col!r} column, has {list(table.columns)}")


def finish_accuracy_axes(ax, xlabel: str, title: str, legend_size=None):
    """Label ``ax`` as test accuracy (%) against ``xlabel``, title it, add a light grid and the legend; return it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return ax
