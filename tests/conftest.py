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


# The data sets tests share, each loaded once per session (the offline MNIST subset, no network).
# Tests must not change them (their loaders, transforms or tensors).

@pytest.fixture(scope="session")
def data():
    """The whole offline MNIST subset, as the notebooks load it."""
    from nnlab.data import load_data

    return load_data(verbose=False)


@pytest.fixture(scope="session")
def medium_data():
    """1,000 training and 200 test images: enough to train and quantise LeNet-5 to a meaningful accuracy."""
    from nnlab.data import load_data

    return load_data(train_limit=1000, test_limit=200, verbose=False)


@pytest.fixture(scope="session")
def small_data():
    """512 training and 200 test images: for short training runs (pruning, distillation)."""
    from nnlab.data import load_data

    return load_data(train_limit=512, test_limit=200, verbose=False)


@pytest.fixture(scope="session")
def tiny_data():
    """256 training and 128 test images: for calibration, shapes and error paths, not for accuracy."""
    from nnlab.data import load_data

    return load_data(train_limit=256, test_limit=128, verbose=False)


@pytest.fixture(scope="session")
def lenet(data):
    """LeNet-5 trained for one epoch (seed 0): trained enough for the explorers to react."""
    from nnlab.models import LeNet5
    from nnlab.train import fit

    torch.manual_seed(0)
    model = LeNet5()
    fit(model, data, 1, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def program(lenet, data):
    """``lenet`` quantised (16-bit weights, 8-bit activations) and compiled for the NNA."""
    from nnlab import nna, quant

    return nna.compile_model(quant.quantise_model(lenet, data, 16, 8))


@pytest.fixture(scope="session")
def pretrained_program(data):
    """The cached quick-mode LeNet-5 (16-bit weights, 8-bit activations), compiled for the NNA."""
    import nnlab
    from nnlab import nna

    net = nnlab.cache.pretrained("lenet5", data=data, quick=True, verbose=False)
    return nna.compile_model(nnlab.quant.quantise_model(net, data, 16, 8))


@pytest.fixture(scope="session")
def picker_grid():
    """The bit-depths and sparsities ``picker_table`` measures."""
    return {"bits": (4, 8, 16), "sparsities": (0.0, 0.5)}


@pytest.fixture(scope="session")
def picker_net():
    """An untrained LeNet-5 (seed 0): costs and the budget picker's knapsack do not need accuracy."""
    from nnlab.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5").eval()


@pytest.fixture(scope="session")
def picker_table(picker_net, data, picker_grid):
    """``picker.measure_sensitivity`` of ``picker_net`` over ``picker_grid``, on 32 images."""
    from nnlab import picker

    return picker.measure_sensitivity(picker_net, data, bits=picker_grid["bits"], sparsities=picker_grid["sparsities"],
                                     images=32)


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
