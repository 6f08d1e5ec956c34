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


# nbval's waits for a busy kernel are raised in the repository's root conftest.py, which also applies when the
# notebooks are run without the unit tests.


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
