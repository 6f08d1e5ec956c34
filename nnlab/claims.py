"""Claims: every figure a notebook states, checked where it is stated.

A notebook that says "retraining wins back more than a point at 90%
sparsity" proves it in the next cell with::

    from nnlab.claims import claim
    claim("retraining at 90% sparsity beats no retraining", retrained - pruned, above=1.0, unit=" pp",
          means="on this machine retraining recovered less than the course says; ...")

:func:`claim` compares the measured value with its bounds and prints one
line (``✓ ... measured 1.7 pp, claimed > 1 pp``).  When the value is outside
its bounds it raises :class:`ClaimFailed`, an ``AssertionError`` whose
message says what was claimed, what was measured and what that means, so a
student knows whether something is broken or merely noisy.

The course's margins come from measurements: ``benchmarks/claims.py`` runs
the notebooks in full mode for several seeds (``NNLAB_SEED``) and thread
counts and prints every claim's measured values.  Two environment variables
serve it (nobody else needs them):

``NNLAB_CLAIMS_LOG=FILE``
    append every claim (text, measured value, bounds, passed, seed, threads,
    quick mode) to ``FILE`` as one JSON line;
``NNLAB_CLAIMS_KEEP_GOING=1``
    print a failed claim instead of raising, so that one run measures every
    claim of a notebook (the spread must include the failures).
"""

from __future__ import annotations

import json
import math
import numbers
import os

from .config import course_seed, quick_mode

__all__ = ["claim", "ClaimFailed"]

_BOUNDS = {"above": ">", "below": "<", "at_least": ">=", "at_most": "<=", "equals": "=="}
_TRUE = {"1", "true", "yes", "on"}


class ClaimFailed(AssertionError):
    """A notebook's claim that this run's numbers do not show."""


def _number(name: str, value) -> float:
    if hasattr(value, "item") and callable(value.item):  # NumPy and PyTorch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return value


def _fmt(value) -> str:
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if abs(value) < 1e-9:  # float round-off of an exact zero
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{value:.4g}"


def claim(text: str, measured, *, above=None, below=None, at_least=None, at_most=None, equals=None,
          unit: str = "", means: str) -> None:
    """Check that ``measured`` lies within the given bounds; print the result, raise if it does not.

    Args:
        text: the statement checked, as the notebook's prose makes it.
        measured: the figure this run measured (a number, or a NumPy/PyTorch scalar).
        above, below: strict bounds (``measured > above``, ``measured < below``).
        at_least, at_most: inclusive bounds.
        equals: the exact value (counts, structural facts).
        unit: appended to every printed number, e.g. ``"%"``, ``" pp"``, ``"x"``.
        means: what it means when the claim fails: what to check, or why
            the figure can move (said to a student).

    Raises:
        ClaimFailed: the measured value is outside the bounds (unless
            ``NNLAB_CLAIMS_KEEP_GOING=1``).
        TypeError, ValueError: no bound, a bound or value that is not a
            number, or an empty ``text`` or ``means``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must say what is claimed, got {text!r}")
    if not isinstance(means, str) or not means.strip():
        raise ValueError(f"means must say what a failure of {text!r} means, got {means!r}")
    value = _number("measured", measured)
    given = {"above": above, "below": below, "at_least": at_least, "at_most": at_most, "equals": equals}
    bounds = {k: _number(k, v) for k, v in given.items() if v is not None}
    if not bounds:
        raise ValueError(f"claim {text!r} needs a bound: one of {', '.join(_BOUNDS)}")
    ok = not math.isnan(value) and all((
        value > b if k == "above" else value < b if k == "below" else value >= b if k == "at_least"
        else value <= b if k == "at_most" else value == b) for k, b in bounds.items())
    expected = " and ".join(f"{_BOUNDS[k]} {_fmt(b)}{unit}" for k, b in bounds.items())
    _record(text, value, bounds, ok, unit)
    if ok:
        print(f"✓ {text}: measured {_fmt(value)}{unit}, claimed {expected}")
        return
    message = (f"claim not shown by this run: {text}\n"
               f"  expected: {expected}\n"
               f"  measured: {_fmt(value)}{unit}\n"
               f"  what it means: {means}")
    if os.environ.get("NNLAB_CLAIMS_KEEP_GOING", "").strip().lower() in _TRUE:
        print("✗ " + message)
        return
    raise ClaimFailed(message)


def _record(text, value, bounds, ok, unit):
    path = os.environ.get("NNLAB_CLAIMS_LOG")
    if not path:
        return
    # lazy: claims is imported without PyTorch; only logging a claim needs it
    import torch

    line = json.dumps({"claim": text, "measured": value, "bounds": bounds, "passed": ok, "unit": unit,
                       "seed": course_seed(), "threads": torch.get_num_threads(), "quick": quick_mode()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
