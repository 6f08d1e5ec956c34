import os
import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session gets its own model cache, so tests never see a user's files."""
    if "NNLAB_TEST_CACHE" not in os.environ:
        os.environ["NNLAB_TEST_CACHE"] = str(tmp_path_factory.mktemp("nnlab-cache"))
    monkeypatch.setenv("NNLAB_CACHE", os.environ["NNLAB_TEST_CACHE"])
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a network connection."""
    def guard(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    yield


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
