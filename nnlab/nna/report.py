"""The old name of :mod:`nnlab.nna.costs`, the cost model: ``from nnlab.nna.report import layer_costs`` still works.

``nnlab.nna.report`` itself is the function :func:`nnlab.nna.costs.report`,
even after this module has been imported.
"""

from .costs import *  # noqa: F401,F403
from .costs import __all__  # noqa: F401
from .costs import __getattr__  # noqa: F401  (the deprecated names, e.g. summary)
