"""Deprecated spelling of :mod:`nnlab.regularise`; importing it warns.  Removed in the next release."""

import warnings

warnings.warn("nnlab.regularize is deprecated and will be removed in the next release; use nnlab.regularise "
              "(same functions)", DeprecationWarning, stacklevel=2)

from .regularise import *  # noqa: E402,F401,F403
from .regularise import __all__  # noqa: E402,F401
