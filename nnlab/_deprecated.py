"""Old names that still work for one release, with a warning that names the new one.

A module lists its renamed names and installs the returned function as its
module-level ``__getattr__`` (PEP 562), so that ``from nnlab.quant import
WeightQuantizer`` and ``nnlab.quant.WeightQuantizer`` both return the new
object and emit a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import warnings
from typing import Callable


def warn_renamed(module: str, old: str, new: str, stacklevel: int = 2) -> None:
    """Warn (DeprecationWarning) that ``module.old`` is now ``module.new``.

    Args:
        module: the module's dotted name, as users import it (``"nnlab.nna"``).
        old, new: the deprecated name and the name to use instead.
        stacklevel: as for :func:`warnings.warn`: the frame the warning is attributed to.
    """
    warnings.warn(f"{module}.{old} is deprecated and will be removed in the next release; "
                  f"use {module}.{new} (same object)", DeprecationWarning, stacklevel=stacklevel + 1)


def renamed(module: str, renames: dict, namespace: dict) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves each old name in ``renames`` (old -> new) with a warning.

    Args:
        module: the module's dotted name, for the message (``"nnlab.quant"``).
        renames: old name -> new name; the new name must be in ``namespace``.
        namespace: the module's ``globals()``.

    Returns:
        A function ``__getattr__(name)`` that returns ``namespace[renames[name]]``
        after a :class:`DeprecationWarning`, and raises AttributeError for any
        other name.
    """

    def __getattr__(name: str):
        if name in renames:
            warn_renamed(module, name, renames[name])
            return namespace[renames[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
