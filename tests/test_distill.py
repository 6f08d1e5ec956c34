"""Tests of nnlab.distill: the loss, training from a teacher, and the cached sparse model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nnlab import distill as D
from nnlab import prune as P
from nnlab.data import load_data
from nnlab.models import LeNet5
from nnlab.train import fit


@pytest.fixture(scope="module")
def teacher(small_data):
    net = LeNet5()
    fit(net, small_data, 2, progress=False)
    return net


def test_loss_conventions():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    # alpha = 0: plain cross-entropy on the labels
    assert D.distillation_loss(s, t, y, T=3.0, alpha=0.0) == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    # alpha = 1: T^2 * KL(teacher || student) of the softened distributions, averaged over the batch
    T = 3.0
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert D.distillation_loss(s, t, None, T=T, alpha=1.0) == pytest.approx(kl.item(), rel=1e-5)
    # mixture, and zero when the student already matches the teacher
    mix = 0.7 * kl + 0.3 * F.cross_entropy(s, y)
    assert D.distillation_loss(s, t, y, T=T, alpha=0.7) == pytest.approx(mix.item(), rel=1e-5)
    assert D.distillation_loss(t, t, None, T=T, alpha=1.0).abs() < 1e-6


def test_loss_bad_input():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    for T in (0.0, -1.0):
        with pytest.raises(ValueError, match="T must be"):
            D.distillation_loss(s, t, y, T=T)
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="alpha must be"):
            D.distillation_loss(s, t, y, alpha=alpha)
    with pytest.raises(ValueError, match="same output size"):
        D.distillation_loss(s, torch.randn(4, 5), y)


def test_distill_rejects_mismatched_models(small_data, teacher):
    with pytest.raises(ValueError, match="same output size"):
        D.distill(LeNet5(num_classes=5), teacher, small_data, 1, progress=False)
    with pytest.raises(ValueError, match="T must be"):
        D.distill(LeNet5(), teacher, small_data, 1, T=0, progress=False)
    with pytest.raises(ValueError, match="alpha must be"):
        D.distill(LeNet5(), teacher, small_data, 1, alpha=2, progress=False)


def test_distill_moves_student_towards_teacher_and_keeps_zeros(small_data, teacher):
    student = copy.deepcopy(teacher)
    P.core_by_fraction(student, 0.9)
    masks = {n: m.weight_mask.clone() for n, m in P.prunable_layers(student)}
    x, _ = next(iter(small_data.test))

    def gap():
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1),
                            log_target=True, reduction="batchmean").item()

    before = gap()
    teacher_state = copy.deepcopy(teacher.state_dict())
    history = D.distill(student, teacher, small_data, 2, T=4.0, alpha=0.9, progress=False)
    assert len(history) == 2
    assert gap() < before
    for n, m in P.prunable_layers(student):
        assert torch.all(P.effective_weight(m)[masks[n] == 0] == 0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # teacher untouched
    assert all(p.requires_grad for p in teacher.parameters())


def test_prune_and_distill_history(small_data, teacher):
    student = copy.deepcopy(teacher)
    table = D.prune_and_distill(student, teacher, small_data, sparsities=[0.5, 0.8], epochs_per_step=1,
                                progress=False)
    assert list(table.columns) == ["step", "sparsity", "acc_pruned", "acc_retrained"]
    assert table["sparsity"].iloc[-1] == pytest.approx(0.8, abs=1e-4)


def test_pretrained_sparse_is_cached_with_masks(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    data = load_data(train_limit=640, test_limit=200, verbose=False)
    first = D.pretrained_sparse("lenet5", 0.9, data=data, quick=True, verbose=False)
    assert all(P.is_pruned(m) for _, m in P.prunable_layers(first))
    assert P.sparsity(first) == pytest.approx(0.9, abs=1e-4)
    assert first.nnlab_metrics["sparsity"] == pytest.approx(P.sparsity(first))
    files = list((tmp_path / "models").glob("lenet5-sparse90-*.pt"))
    assert len(files) == 1
    second = D.pretrained_sparse("lenet5", 0.9, data=data, quick=True, verbose=False)
    for (k, v), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert second.nnlab_metrics["top1"] == first.nnlab_metrics["top1"]
    with pytest.raises(ValueError, match="sparsity"):
        D.pretrained_sparse("lenet5", 1.0, data=data, quick=True, verbose=False)


def test_prune_and_distill_without_evaluation_trains_the_same_network(small_data):
    torch.manual_seed(0)
    teacher = LeNet5().eval()
    a, b = copy.deepcopy(teacher), copy.deepcopy(teacher)
    full = D.prune_and_distill(a, teacher, small_data, target=0.5, steps=2, epochs_per_step=1, progress=False)
    bare = D.prune_and_distill(b, teacher, small_data, target=0.5, steps=2, epochs_per_step=1, progress=False,
                               evaluate=False)
    assert {"acc_pruned", "acc_retrained"} <= set(full.columns)
    assert list(bare.columns) == ["step", "sparsity"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
