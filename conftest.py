"""pytest settings for the whole repository: the notebook runs (nbval) wait long enough for a busy kernel.

This file sits at the repository's root so that it applies however the
notebooks are collected: with the unit tests (``make test``) or alone
(``pytest --nbval-lax notebooks/03_l1_regularisation.ipynb``).  It loads
nothing heavy (no PyTorch).
"""

#: Seconds nbval waits for a kernel's messages once a cell has finished (nbval's fixed default, 5 s, is too
#: short on a busy machine: "Timeout of 5 seconds exceeded waiting for output").  A cell that raises still
#: fails at once (its error message arrives with the others); only a kernel that stops answering waits this long.
NBVAL_OUTPUT_TIMEOUT = 60
#: Seconds nbval waits for a kernel to start (nbval's default 60), used unless given on the command line.
NBVAL_KERNEL_STARTUP_TIMEOUT = 180


def pytest_configure(config):
    option = config.option
    if getattr(option, "nbval_kernel_startup_timeout", None) == 60:  # nbval's default, not a user's choice
        option.nbval_kernel_startup_timeout = NBVAL_KERNEL_STARTUP_TIMEOUT


def pytest_collection_modifyitems(config, items):
    for item in items:
        # nbval's notebook cells (IPyNbCell) keep the output wait in an attribute of their own.
        if hasattr(item, "output_timeout") and hasattr(item, "cell_num"):
            item.output_timeout = max(item.output_timeout, NBVAL_OUTPUT_TIMEOUT)
