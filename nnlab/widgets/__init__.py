"""Interactive explorers of the course (ipywidgets), one module per chapter, re-exported here."""

from .coring import *  # noqa: F401,F403
from .bits import *  # noqa: F401,F403
from .nna import *  # noqa: F401,F403
from .budget import *  # noqa: F401,F403
