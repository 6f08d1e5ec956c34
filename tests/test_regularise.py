"""Tests of nnlab.regularise: L1 and group-lasso penalties."""

import pytest
import torch
from torch import nn

from nnlab import prune as P
from nnlab import regularise as R
from nnlab.data import load_data
from nnlab.models import LeNet5
from nnlab.train import fit


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def test_l1_value_and_gradient():
    net = tiny_net()
    pen = R.l1_penalty(1e-3)(net)
    expected = 1e-3 * (net[1].weight.abs().sum() + net[3].weight.abs().sum())
    assert pen.item() == pytest.approx(expected.item(), rel=1e-6)
    pen.backward()
    assert torch.allclose(net[1].weight.grad, 1e-3 * net[1].weight.sign())
    assert net[1].bias.grad is None  # biases are not penalised


def test_l1_counts_only_surviving_weights_of_pruned_layers():
    net = tiny_net()
    P.core_by_fraction(net, 0.5, scope="layer")
    pen = R.l1_penalty(1.0, layers=["1"])(net)
    assert pen.item() == pytest.approx(P.effective_weight(net[1]).abs().sum().item(), rel=1e-6)


def test_group_lasso_value():
    net = tiny_net()
    pen = R.group_lasso_penalty(0.5, dim=0, layers=["3"])(net)
    assert pen.item() == pytest.approx(0.5 * net[3].weight.norm(dim=1).sum().item(), rel=1e-5)
    pen_in = R.group_lasso_penalty(1.0, dim=1, layers=["3"])(net)
    assert pen_in.item() == pytest.approx(net[3].weight.norm(dim=0).sum().item(), rel=1e-5)


def test_l1_training_creates_near_zero_weights():
    data = load_data(train_limit=640, test_limit=100, verbose=False)
    plain, l1 = tiny_net(1), tiny_net(1)
    fit(plain, data, 2, progress=False)
    fit(l1, data, 2, penalty=R.l1_penalty(1e-2), progress=False)
    assert R.share_near_zero(l1) > R.share_near_zero(plain) + 0.1


def test_group_lasso_training_shrinks_filters():
    data = load_data(train_limit=640, test_limit=100, verbose=False)
    plain, gl = LeNet5(), LeNet5()
    gl.load_state_dict(plain.state_dict())
    fit(plain, data, 1, progress=False)
    fit(gl, data, 1, penalty=R.group_lasso_penalty(1e-2), progress=False)
    assert gl[3].weight.flatten(1).norm(dim=1).sum() < plain[3].weight.flatten(1).norm(dim=1).sum()


def test_bad_input():
    with pytest.raises(ValueError, match="strength"):
        R.l1_penalty(-1.0)
    with pytest.raises(ValueError, match="dim"):
        R.group_lasso_penalty(1.0, dim=2)
    with pytest.raises(ValueError, match="nothing to prune"):
        R.l1_penalty(1.0)(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="tol"):
        R.share_near_zero(tiny_net(), tol=0)
