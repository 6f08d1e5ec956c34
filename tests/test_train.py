import pytest
import torch

from nnlab.data import load_data
from nnlab.models import LeNet5
from nnlab.train import Callback, evaluate, fit, resolve_device


@pytest.fixture(scope="module")
def small_data():
    return load_data(train_limit=512, test_limit=200, augment=True, verbose=False)


def train_once(data, seed=0):
    torch.manual_seed(seed)
    m = LeNet5()
    fit(m, data, 1, seed=seed, progress=False)
    return m


def test_same_seed_gives_identical_weights(small_data):
    a, b = train_once(small_data), train_once(small_data)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    c = train_once(small_data, seed=1)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_training_learns(small_data):
    torch.manual_seed(0)
    m = LeNet5()
    before = evaluate(m, small_data)["top1"]
    hist = fit(m, small_data, 4, optimizer="adam", lr=3e-3, progress=False, eval_data=small_data)
    assert list(hist.columns) == ["epoch", "loss", "train_acc", "seconds", "test_acc"]
    assert hist["test_acc"].iloc[-1] > before + 40
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]


def test_evaluate_topk(small_data):
    torch.manual_seed(0)
    r = evaluate(LeNet5(), small_data, topk=(1, 5, 10))
    assert r["n"] == 200 and r["top10"] == 100.0 and r["top1"] <= r["top5"] <= r["top10"]


def test_callbacks_and_penalty_are_called(small_data):
    seen = []

    class Count(Callback):
        def on_step_end(self, step, total, model):
            seen.append((step, total))

    calls = []
    torch.manual_seed(0)
    fit(LeNet5(), small_data, 1, progress=False, callbacks=[Count(), lambda s, t, m: calls.append(s)],
        penalty=lambda m: 0.0 * m[0].weight.sum())
    assert seen == [(i, 8) for i in range(8)] and calls == list(range(8))


@pytest.mark.parametrize("epochs", [0, -1])
def test_non_positive_epochs_rejected(small_data, epochs):
    with pytest.raises(ValueError, match=f"epochs must be a positive integer, got {epochs}"):
        fit(LeNet5(), small_data, epochs)


def test_bad_device_strings_rejected():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; got 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(TypeError, match="device must be a string or torch.device"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_lr_and_schedule_rejected(small_data):
    with pytest.raises(ValueError, match=r"lr must be in \(0"):
        fit(LeNet5(), small_data, 1, lr=0)
    with pytest.raises(ValueError, match="schedule must be one of 'onecycle', 'cosine', 'constant'; got 'step'"):
        fit(LeNet5(), small_data, 1, schedule="step")


@pytest.mark.gpu
def test_fit_on_cuda(small_data):
    torch.manual_seed(0)
    m = LeNet5()
    fit(m, small_data, 1, device="cuda", progress=False)
    assert m[0].weight.is_cuda
    assert evaluate(m, small_data)["top1"] > 50


@pytest.mark.parametrize("n_images", [64, 128, 256, 320])
def test_very_short_runs_train(n_images):
    """1 to 5 optimisation steps: the one-cycle schedule must not divide by zero."""
    data = load_data(train_limit=n_images, test_limit=50, verbose=False)
    torch.manual_seed(0)
    m = LeNet5()
    before = m[0].weight.clone()
    fit(m, data, 1, progress=False)
    assert not torch.equal(before, m[0].weight)


def test_time_training_steps_times_each_model_and_trains_it():
    from nnlab.train import time_training_steps

    torch.manual_seed(0)
    a, b = LeNet5(), LeNet5()
    before = a[0].weight.clone()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    times = time_training_steps({"a": a, "b": b}, (x, y), rounds=3, steps=2, warmup=1)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert not torch.equal(before, a[0].weight)


def test_time_training_steps_rejects_bad_arguments():
    from nnlab.train import time_training_steps

    batch = (torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,)))
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        time_training_steps({"a": LeNet5()}, batch, rounds=0)
    with pytest.raises(ValueError, match="models must name at least one model"):
        time_training_steps({}, batch)


def test_fit_returns_the_network_without_the_last_gradients(small_data):
    seen = []

    class Last(Callback):
        def on_step_end(self, step, total, model):
            seen.append(all(p.grad is not None for p in model.parameters()))

    net = LeNet5()
    fit(net, small_data, 1, progress=False, callbacks=[Last()])
    assert seen and all(seen)  # the callbacks saw every step's gradients
    assert all(p.grad is None for p in net.parameters())
