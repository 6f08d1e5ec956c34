"""Tests of nnlab.prune (coring, masks, schedules, reports), its plots and the coring explorer."""

import copy

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from nnlab import prune as P
from nnlab.models import LeNet5
from nnlab.train import accuracy, fit


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def mask_of(module):
    return module.weight_mask.detach().clone()


# --- coring rules -------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_coring_matches_l1_unstructured(amount, seed):
    torch.manual_seed(seed)
    ours, theirs = nn.Linear(37, 23), nn.Linear(37, 23)
    theirs.load_state_dict(ours.state_dict())
    assert ours.weight.abs().unique().numel() == ours.weight.numel()  # no ties
    P.core_by_fraction(ours, amount, scope="layer")
    torch_prune.l1_unstructured(theirs, "weight", amount=amount)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert int((ours.weight_mask == 0).sum()) == round(amount * ours.weight.numel())


def test_global_fraction_matches_torch_global_unstructured():
    ours, theirs = tiny_net(3), tiny_net(3)
    P.core_by_fraction(ours, 0.8, scope="global")
    torch_prune.global_unstructured([(theirs[0], "weight"), (theirs[3], "weight")],
                                    pruning_method=torch_prune.L1Unstructured, amount=0.8)
    for i in (0, 3):
        assert torch.equal(ours[i].weight_mask, theirs[i].weight_mask)
    assert P.sparsity(ours) == pytest.approx(round(0.8 * P.sparsity_report(ours)["weights"].iloc[-1])
                                             / P.sparsity_report(ours)["weights"].iloc[-1])


@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 0.2, 10.0])
def test_threshold_keeps_exactly_weights_at_or_above_t(t):
    net = tiny_net(1)
    before = [m.weight.detach().clone() for m in (net[0], net[3])]
    # put some weights exactly on the threshold: they must be kept
    with torch.no_grad():
        net[3].weight[0, :5] = t
        net[3].weight[1, :5] = -t
    before[1] = net[3].weight.detach().clone()
    P.core_by_threshold(net, t)
    for m, w in zip((net[0], net[3]), before):
        keep = w.abs() >= t
        assert torch.equal(m.weight_mask.bool(), keep)
        assert torch.equal(m.weight, torch.where(keep, w, torch.zeros_like(w)))


def test_layer_scope_threshold_is_in_units_of_std():
    net = tiny_net(2)
    stds = {i: float(net[i].weight.detach().std()) for i in (0, 3)}
    w3 = net[3].weight.detach().clone()
    P.core_by_threshold(net, 1.0, scope="layer")
    assert torch.equal(net[3].weight_mask.bool(), w3.abs() >= stds[3])


def test_threshold_dict_and_layer_subset():
    net = tiny_net(2)
    P.core_by_threshold(net, {"3": 0.01})
    assert not P.is_pruned(net[0]) and P.is_pruned(net[3])
    P.core_by_fraction(net, 0.5, scope="layer", layers=["0"])
    assert P.sparsity_report(net).set_index("layer").loc["0", "sparsity"] == pytest.approx(round(0.5 * 36) / 36)


def test_coring_composes_and_never_revives():
    net = tiny_net(4)
    P.core_by_fraction(net, 0.5, scope="global")
    first = [mask_of(net[i]) for i in (0, 3)]
    P.core_by_fraction(net, 0.3, scope="global")  # lower than now: nothing changes
    assert all(torch.equal(a, mask_of(net[i])) for a, i in zip(first, (0, 3)))
    P.core_by_fraction(net, 0.8, scope="layer")
    P.core_by_threshold(net, 0.02)
    for a, i in zip(first, (0, 3)):
        new = mask_of(net[i])
        assert torch.all(new <= a)  # every weight pruned before is still pruned
        assert (new == 0).float().mean() >= 0.8 - 1e-6
    assert isinstance(net[3]._forward_pre_hooks[next(iter(net[3]._forward_pre_hooks))],
                      torch_prune.PruningContainer)


def test_core_channels_removes_whole_filters():
    net = LeNet5()
    P.core_channels(net, 0.5, dim=0, layers=["conv2"])
    w = net[3].weight
    dead = (w.flatten(1) == 0).all(1)
    assert int(dead.sum()) == 8
    alive_norms = w.flatten(1).norm(dim=1)[~dead]
    orig_norms = net[3].weight_orig.flatten(1).norm(dim=1)
    assert orig_norms[dead].max() <= alive_norms.min()


# --- masks through training -----------------------------------------------------------------

def test_pruned_weights_stay_exactly_zero_through_retraining(small_data):
    net = LeNet5()
    fit(net, small_data, 1, progress=False)
    P.core_by_fraction(net, 0.9, scope="global")
    masks = {n: m.weight_mask.clone() for n, m in P.prunable_layers(net)}
    fit(net, small_data, 2, lr=0.05, weight_decay=1e-3, progress=False)  # momentum + weight decay
    for n, m in P.prunable_layers(net):
        assert torch.equal(m.weight_mask, masks[n])
        w = P.effective_weight(m)
        assert torch.all(w[masks[n] == 0] == 0)
        assert torch.all(m.weight[masks[n] == 0] == 0)
    assert P.sparsity(net) >= 0.9 - 1e-6
    P.make_permanent(net)
    assert not any(P.is_pruned(m) for m in net.modules())
    assert P.sparsity(net) >= 0.9 - 1e-6


def test_make_permanent_and_report_agree(small_data):
    net = tiny_net(5)
    P.core_by_fraction(net, 0.6)
    before = P.sparsity_report(net)
    assert before["masked"].all()
    assert list(before["layer"]) == ["0", "3", "total"]
    P.make_permanent(net)
    after = P.sparsity_report(net)
    assert list(after["zeros"]) == list(before["zeros"])
    assert not after["masked"].any()
    assert "weight_orig" not in dict(net[3].named_parameters())


def test_apply_masks_restores_a_state_dict():
    net = tiny_net(6)
    P.core_by_fraction(net, 0.7)
    state = copy.deepcopy(net.state_dict())
    fresh = tiny_net(7)
    masks = {k[: -len(".weight_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")}
    P.apply_masks(fresh, masks)
    fresh.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(fresh(x), net(x))
    assert P.sparsity(fresh) == P.sparsity(net)


# --- schedules ----------------------------------------------------------------------------

def test_cubic_schedule():
    values = [P.cubic_sparsity(k, 10, 0.9) for k in range(11)]
    assert values[0] == 0 and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] > values[-1] - values[-2]  # fast first, slow at the end


def test_gradual_coring_callback_reaches_target(small_data):
    net = LeNet5()
    cb = P.GradualCoring(0.8, every=2)
    fit(net, small_data, 1, callbacks=[cb], progress=False)
    assert P.sparsity(net) == pytest.approx(0.8, abs=1e-4)
    assert cb.history[-1][1] == pytest.approx(0.8)


def test_iterative_coring_history(small_data):
    net = LeNet5()
    calls = []
    table = P.iterative_coring(net, lambda m: calls.append(P.sparsity(m)), target=0.9, steps=3,
                               eval_data=small_data)
    assert len(calls) == 3 and list(table["step"]) == [1, 2, 3]
    assert table["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1e-4)
    assert table["sparsity"].is_monotonic_increasing
    assert {"acc_pruned", "acc_retrained"} <= set(table.columns)


def test_sensitivity_analysis_leaves_model_alone(small_data):
    net = LeNet5()
    state = copy.deepcopy(net.state_dict())
    table = P.sensitivity_analysis(net, small_data, sparsities=(0.0, 0.9), layers=["conv1", "fc3"])
    assert len(table) == 4 and set(table["layer"]) == {"conv1", "fc3"}
    base = accuracy(net, small_data)
    assert (table[table.sparsity == 0.0]["accuracy"] == base).all()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


# --- bad input -------------------------------------------------------------------------------

def test_errors_name_the_argument():
    net = tiny_net()
    with pytest.raises(ValueError, match="threshold"):
        P.core_by_threshold(net, -0.1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            P.core_by_fraction(net, bad)
    with pytest.raises(ValueError, match="scope"):
        P.core_by_fraction(net, 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="nothing to prune"):
        P.core_by_fraction(nn.Sequential(nn.ReLU(), nn.Flatten()), 0.5)
    with pytest.raises(ValueError, match="not a prunable layer"):
        P.core_by_fraction(net, 0.5, layers=["1"])
    with pytest.raises(ValueError, match="sparsities"):
        P.iterative_coring(net, lambda m: None, sparsities=[0.5, 0.3])


# --- plots and widget ------------------------------------------------------------------------

