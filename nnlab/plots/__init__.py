"""Plots of the course, one module per chapter, re-exported here."""

from .elimination import *  # noqa: F401,F403
from .reduction import *  # noqa: F401,F403
from .nna import *  # noqa: F401,F403
