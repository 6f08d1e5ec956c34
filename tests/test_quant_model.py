"""Quantising whole networks: PTQ, retraining, pruned zeros, per-layer choices, bad input."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from nnlab import quant
from nnlab.models import LeNet5, LeNet300100
from nnlab.train import accuracy, fit


@pytest.fixture(scope="module")
def trained(medium_data):
    torch.manual_seed(0)
    net = LeNet5()
    fit(net, medium_data, 4, optimizer="adam", lr=3e-3, progress=False)
    assert accuracy(net, medium_data) > 85
    return net


def _prune(net, amount):
    for layer in quant.weight_layers(net).values():
        prune.l1_unstructured(layer, "weight", amount=amount)
    return net


def _check_levels(model, spec_bits):
    table = quant.distinct_values(model)
    for row in table.itertuples():
        bits = spec_bits.get(row.layer, None) if isinstance(spec_bits, dict) else spec_bits
        assert row.max_per_channel <= 2 ** bits, row
    return table


def test_ptq_keeps_an_ordinary_module_and_the_levels(medium_data, trained):
    q = quant.quantise_model(trained, medium_data, weight_bits=3, act_bits=8)
    # A rewritten copy: a torch.fx GraphModule named after the model; the float model is untouched.
    assert isinstance(q, torch.fx.GraphModule) and type(q).__name__ == "LeNet5"
    assert not any(isinstance(m, quant.ActQuantiser) for m in trained.modules())
    _check_levels(q, 3)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        layer = q.get_submodule(name)
        wq = quant.weight_quantiser(layer)
        assert wq.spec.bits == 3 and wq.scale.shape == (layer.weight.shape[0],)
        codes, spec, scale, zp = quant.quantised_weight(layer)
        assert torch.equal(quant.dequantise(codes, spec, scale, zp), layer.weight)
    # Activation quantisers in medium_data-flow order: input, then after each ReLU (or its max pool).
    assert list(quant.act_quantisers(q)) == ["input_quant", "pool1_quant", "pool2_quant", "relu3_quant", "relu4_quant"]
    assert quant.act_quantisers(q)["input_quant"].spec.symmetric is False
    x, _ = next(iter(medium_data.test))
    with torch.no_grad():
        h = q.get_submodule("input_quant")(x)
        a = quant.act_quantisers(q)["input_quant"]
        assert torch.equal(h, quant.fake_quantise(x, a.spec, a.scale, a.zero_point))
    table = quant.describe_quantisers(q)
    assert list(table.kind) == ["activation", "weight"] * 5
    assert accuracy(q, medium_data) > accuracy(trained, medium_data) - 5


def test_quantiser_after_pool_is_the_same_as_after_relu(medium_data, trained):
    """Max pooling commutes with rounding: quantising after the pool changes no value."""
    q = quant.quantise_model(trained, medium_data, None, 4)
    aq = quant.act_quantisers(q)["pool1_quant"]
    x, _ = next(iter(medium_data.test))
    with torch.no_grad():
        h = trained[1](trained[0](x))
        after_relu = nn.functional.max_pool2d(quant.fake_quantise(h, aq.spec, aq.scale, aq.zero_point), 2)
        after_pool = aq(nn.functional.max_pool2d(h, 2))
    assert torch.equal(after_relu, after_pool)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_high_bits_match_float(medium_data, trained, bits):
    q = quant.quantise_model(trained, medium_data, weight_bits=bits, act_bits=None)
    w, wq = trained[3].weight, q.get_submodule("conv2").weight
    err = (w - wq).abs().max()
    scale = quant.weight_quantiser(q.get_submodule("conv2")).scale.max()
    assert err <= scale / 2 + 1e-6
    if bits == 8:
        assert abs(accuracy(q, medium_data) - accuracy(trained, medium_data)) <= 1.0


def test_per_layer_overrides(medium_data, trained):
    spec = quant.QuantSpec(6, granularity="per_tensor")
    q = quant.quantise_model(trained, medium_data, 3, 8, overrides={"conv1": 8, "fc3": spec}, act_overrides={"input_quant": 6})
    bits = {"conv1": 8, "conv2": 3, "fc1": 3, "fc2": 3, "fc3": 6}
    table = _check_levels(q, bits)
    assert dict(zip(table.layer, table.bits)) == bits
    assert quant.weight_quantiser(q.get_submodule("fc3")).spec == spec
    assert quant.act_quantisers(q)["input_quant"].spec.bits == 6
    assert quant.act_quantisers(q)["pool1_quant"].spec.bits == 8


def test_bad_arguments(medium_data, trained):
    with pytest.raises(ValueError, match="'5'.*valid names: 'conv1', 'conv2', 'fc1', 'fc2', 'fc3'"):
        quant.quantise_model(trained, medium_data, 4, 8, overrides={"5": 8})
    with pytest.raises(ValueError, match="act_overrides.*'1_quant'"):
        quant.quantise_model(trained, medium_data, 4, 8, act_overrides={"1_quant": 8})
    with pytest.raises(ValueError, match="bits must be <= 16"):
        quant.quantise_model(trained, medium_data, 17, 8)
    with pytest.raises(ValueError, match="bits must be >= 2"):
        quant.quantise_model(trained, medium_data, 4, 1)
    with pytest.raises(TypeError, match="bits must be an integer"):
        quant.quantise_model(trained, medium_data, 4.0, 8)
    with pytest.raises(TypeError, match="overrides"):
        quant.quantise_model(trained, medium_data, 4, 8, overrides={"conv1": 4.5})
    with pytest.raises(ValueError, match="granularity"):
        quant.quantise_model(trained, medium_data, 4, 8, granularity="per_row")
    with pytest.raises(ValueError, match="weight_method"):
        quant.quantise_model(trained, medium_data, 4, 8, weight_method="median")
    with pytest.raises(ValueError, match="cannot trace ModuleList"):
        quant.attach_quantisers(nn.ModuleList([nn.Linear(2, 2)]), 4, 8)
    q = quant.quantise_model(trained, medium_data, 4, 8)
    with pytest.raises(ValueError, match="already quantised"):
        quant.quantise_model(q, medium_data, 4, 8)
    with pytest.raises(ValueError, match="method"):
        quant.retrain(q, medium_data, 1, method="adaround")
    with pytest.raises(ValueError, match="schedule"):
        quant.retrain(q, medium_data, 1, schedule="cubic")


def test_fully_pruned_and_constant_layers(medium_data, trained):
    net = LeNet5()
    net.load_state_dict(trained.state_dict())
    prune.l1_unstructured(net[0], "weight", amount=1.0)  # every weight of the first conv is zero
    with torch.no_grad():
        net[9].weight.fill_(0.25)  # a constant layer
    q = quant.quantise_model(net, medium_data, 2, 4)
    for _, m in q.named_modules():
        for buf in (getattr(m, "scale", None),):
            if buf is not None:
                assert torch.isfinite(buf).all() and (buf > 0).all()
    x, _ = next(iter(medium_data.test))
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all()
    assert q.get_submodule("conv1").weight.eq(0).all()
    assert torch.equal(q.get_submodule("fc2").weight, torch.full_like(net[9].weight, 0.25))
    quant.retrain(q, medium_data, 1, method="ste", progress=False)
    assert q.get_submodule("conv1").weight.eq(0).all() and all(torch.isfinite(p).all() for p in q.parameters())


@pytest.mark.parametrize("method", ["ste", "random_subset"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_retraining_keeps_levels_and_pruned_zeros(medium_data, trained, method, granularity):
    net = LeNet5()
    net.load_state_dict(trained.state_dict())
    _prune(net, 0.7)
    zeros = {n: (layer.weight == 0) for n, layer in quant.weight_layers(net).items()}
    q = quant.quantise_model(net, medium_data, 3, 6, granularity=granularity)
    for n, layer in quant.weight_layers(q).items():
        assert torch.equal(layer.weight == 0, zeros[n] | (layer.weight == 0))
        assert layer.weight[zeros[n]].eq(0).all()
        assert isinstance(layer.parametrizations.weight[0], quant.FixedMask)
    before = {n: layer.weight.detach().clone() for n, layer in quant.weight_layers(q).items()}
    quant.retrain(q, medium_data, 2, method=method, lr=0.05, progress=False)
    _check_levels(q, 3)
    for n, layer in quant.weight_layers(q).items():
        assert layer.weight[zeros[n]].eq(0).all(), n  # pruned stays exactly zero
        assert not torch.equal(layer.weight, before[n])  # it did train
        # freeze() wrote the grid values into the stored weight itself
        stored = layer.parametrizations.weight.original
        assert quant.distinct_values(q).set_index("layer").loc[n, "max_per_channel"] <= 8
        assert torch.equal(stored * layer.parametrizations.weight[0].mask, layer.weight)
    # evaluation after freezing is stable: quantising again changes nothing
    x, _ = next(iter(medium_data.test))
    with torch.no_grad():
        assert torch.equal(q(x), q(x))


def test_random_subset_schedules():
    lin = quant.RandomSubset("linear", start=0.2, full_at=0.5)
    assert lin.fraction(0.0) == pytest.approx(0.2) and lin.fraction(0.25) == pytest.approx(0.6)
    assert lin.fraction(0.5) == 1.0 and lin.fraction(0.99) == 1.0
    steps = quant.RandomSubset("steps", start=0.5, full_at=0.8, stages=3)
    assert [steps.fraction(p) for p in (0.0, 0.3, 0.6, 0.8)] == [0.5, 0.75, 0.875, 1.0]
    const = quant.RandomSubset("constant", start=0.3, full_at=0.5)
    assert const.fraction(0.4) == 0.3 and const.fraction(0.6) == 1.0
    custom = quant.RandomSubset(lambda p: p)
    assert custom.fraction(0.3) == 0.3


@pytest.mark.parametrize("redraw", [True, False])
def test_random_subset_quantises_a_growing_subset(redraw):
    torch.manual_seed(0)
    layer = nn.Linear(50, 40)
    q = quant.attach_quantisers(nn.Sequential(layer), 3, None, inplace=True)
    lin = q[0]
    wq = quant.weight_quantiser(lin)
    w = lin.parametrizations.weight.original
    full = quant.fake_quantise(w, wq.spec, wq.scale, wq.zero_point)
    q.train()
    subsets = []
    for frac in (0.25, 0.5, 1.0):
        wq.set_subset(frac, redraw=redraw)
        out = lin.weight
        on_grid = (out == full) & (out != w)
        stays_float = out == w
        assert torch.all(on_grid | stays_float | (full == w))
        share = (~stays_float | (full == w)).float().mean().item()
        assert abs(share - frac) < 0.08
        subsets.append(wq.priority < frac)
    if not redraw:  # the subset only grows
        assert torch.all(subsets[1] >= subsets[0]) and torch.all(subsets[2] >= subsets[1])
    q.eval()
    assert torch.equal(lin.weight, full)  # evaluation quantises every weight


def test_random_subset_gradient_is_straight_through_on_the_subset_and_plain_elsewhere():
    torch.manual_seed(0)
    q = quant.attach_quantisers(nn.Sequential(nn.Linear(30, 20)), 3, None, inplace=True)
    lin, wq = q[0], quant.weight_quantiser(q[0])
    w = lin.parametrizations.weight.original
    q.train()
    wq.set_subset(0.5, redraw=True)
    g = torch.randn(20, 30)
    (lin.weight * g).sum().backward()
    inside = wq.priority < 0.5
    wd = w.detach().clone().requires_grad_(True)
    expected = torch.where(inside, quant.fake_quantise(wd, wq.spec, wq.scale, wq.zero_point), wd)
    (expected * g).sum().backward()
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(lin.weight, expected)
    assert torch.equal(w.grad, wd.grad)  # g outside the subset, g times the clamp mask inside


def test_retraining_recovers_accuracy_at_two_bits(medium_data, trained):
    ptq = quant.quantise_model(trained, medium_data, 2, 8, granularity="per_tensor")
    acc_ptq = accuracy(ptq, medium_data)
    accs = {}
    for method in ("ste", "random_subset"):
        q = quant.quantise_model(trained, medium_data, 2, 8, granularity="per_tensor")
        # lr 0.01: at 0.05 two-bit retraining diverges on some seeds and thread counts (it fell below PTQ on one
        # thread); at 0.01 the random subset gained 16-25 points over PTQ for seeds 0-2 on one and two threads.
        history = quant.retrain(q, medium_data, 3, method=method, lr=0.01, progress=False)
        accs[method] = accuracy(q, medium_data)
        if method == "random_subset":
            fractions = history.attrs["subset"].history
            assert fractions[0] == pytest.approx(0.25) and fractions[-1] == 1.0
            assert all(a <= b for a, b in zip(fractions, fractions[1:]))
    assert accs["random_subset"] > acc_ptq + 5, (acc_ptq, accs)


def test_weights_only_on_any_module(medium_data):
    torch.manual_seed(0)
    net = LeNet300100()
    q = quant.attach_quantisers(net, 5, None)
    _check_levels(q, 5)
    assert not quant.act_quantisers(q)


def test_pretrained_quantised_is_cached(medium_data, monkeypatch):
    import nnlab.cache as cache
    from nnlab import recipes
    calls = []
    real = quant.retrain

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr("nnlab.recipes.retrain", counting)  # where the recipe looks it up
    a = recipes.pretrained_quantised("lenet5", 4, 8, data=medium_data, quick=True, epochs=1, verbose=False)
    b = recipes.pretrained_quantised("lenet5", 4, 8, data=medium_data, quick=True, epochs=1, verbose=False)
    assert len(calls) == 1
    assert a.nnlab_metrics["top1"] == b.nnlab_metrics["top1"] == accuracy(b, medium_data)
    _check_levels(b, 4)
    assert all(not q.calibrating for q in quant.act_quantisers(b).values())
