"""Learned quantisation steps (LSQ): exact forward values, the step's gradient, retraining, and the grid the NNA reads."""

import numpy as np
import pytest
import torch
from torch import nn

from nnlab import nna, quant
from nnlab.models import LeNet5
from nnlab.train import accuracy, fit


@pytest.fixture(scope="module")
def trained(medium_data):
    torch.manual_seed(0)
    net = LeNet5()
    fit(net, medium_data, 4, optimizer="adam", lr=3e-3, progress=False)
    assert accuracy(net, medium_data) > 85
    return net


def _lsq_reference(x, spec, scale, zero_point, grad_factor):
    """The LSQ gradients written out (Esser et al. 2020): straight-through for x; for the step, the rounding
    error in steps inside the range and q_min - z / q_max - z where clipped; summed per scale."""
    shape = [1] * x.dim()
    if spec.per_channel:
        shape[spec.ch_axis] = -1
    s, z = scale.reshape(shape), zero_point.reshape(shape).float()
    v = x * (1.0 / s)
    r = torch.round(v)
    q = r + z
    below, above = q < spec.quant_min, q > spec.quant_max
    inside = ~(below | above)
    d_step = torch.where(inside, r - v, torch.where(below, spec.quant_min - z, spec.quant_max - z))
    return inside.float(), d_step, grad_factor


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 4])
def test_values_are_fake_quantise_and_gradients_are_lsq(granularity, bits):
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    spec = quant.QuantSpec.for_weights(bits, granularity=granularity)
    scale0 = quant.lsq_init(w, spec) * 0.6  # a step that clips the largest weights
    zp = torch.zeros_like(scale0, dtype=torch.int32)
    x = w.clone().requires_grad_()
    scale = scale0.clone().requires_grad_()
    g = quant.lsq_grad_factor(w[0].numel() if spec.per_channel else w.numel(), spec)
    out = quant.fake_quantise_learned(x, spec, scale, zp, g)
    assert torch.equal(out, quant.fake_quantise(w, spec, scale0, zp))  # the very values the simulator computes
    upstream = torch.randn_like(w)
    out.backward(upstream)
    inside, d_step, factor = _lsq_reference(w, spec, scale0, zp, g)
    assert torch.equal(x.grad, upstream * inside)
    expected = upstream * d_step
    expected = expected.sum(dim=(1, 2, 3)) if spec.per_channel else expected.sum()
    assert torch.allclose(scale.grad, expected * factor, rtol=1e-4, atol=1e-6)
    assert scale.grad.abs().sum() > 0
    assert (d_step.abs() == spec.quant_max).any()  # some weights were clipped: both branches are checked


def test_asymmetric_activation_step_gradient_matches_reference():
    torch.manual_seed(1)
    x0 = torch.randn(8, 20) * 2
    spec = quant.QuantSpec.for_inputs(3)
    scale0, zp = quant.compute_qparams(x0, spec)
    scale0 = scale0 * 0.6  # clip some values at both ends
    assert zp != 0
    x = x0.clone().requires_grad_()
    s = scale0.clone().requires_grad_()
    quant.fake_quantise_learned(x, spec, s, zp, 0.5).sum().backward()
    inside, d_step, _ = _lsq_reference(x0, spec, scale0, zp, 0.5)
    assert torch.equal(x.grad, inside)
    assert torch.allclose(s.grad, d_step.sum() * 0.5, rtol=1e-4)
    assert (~inside.bool()).any()


def test_learn_scale_trains_then_freeze_keeps_the_learned_grid(trained):
    q = quant.attach_quantisers(trained, 2, None, granularity="per_tensor")
    layer = q.fc1
    wq = quant.weight_quantiser(layer)
    max_scale = wq.scale.clone()
    wq.learn_scale(quant.quantiser_input(layer))
    assert wq.learning and isinstance(wq.scale, nn.Parameter)
    assert any(p is wq.scale for p in q.parameters())
    lsq_start = quant.lsq_init(quant.quantiser_input(layer), wq.spec)
    assert torch.equal(wq.scale.detach(), lsq_start) and lsq_start < max_scale  # LSQ starts finer than max|w|
    q.train()
    loss = layer.weight.pow(2).sum()  # any loss: the step must get a gradient
    loss.backward()
    assert wq.scale.grad is not None and wq.scale.grad.abs() > 0
    with torch.no_grad():
        wq.scale.mul_(0.9)
    learned = wq.scale.detach().clone()
    quant.freeze(q)
    assert not wq.learning and "scale" in dict(wq.named_buffers())
    assert torch.equal(wq.scale, learned)  # not recomputed from max |w|
    assert float(wq.grid().scale) == float(learned)
    stored = layer.parametrizations.weight.original
    assert torch.equal(stored, quant.fake_quantise(stored, wq.spec, learned, 0))
    # the state dict loads into an ordinary quantised model
    fresh = quant.attach_quantisers(trained, 2, None, granularity="per_tensor")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(quant.weight_quantiser(fresh.fc1).scale, learned)


def test_bad_arguments(medium_data, trained):
    q = quant.quantise_model(trained, medium_data, 2, 8, granularity="per_tensor")
    layer = q.get_submodule("fc1")
    with pytest.raises(ValueError, match="init"):
        quant.weight_quantiser(layer).learn_scale(quant.quantiser_input(layer), init="median")
    with pytest.raises(ValueError, match="scales"):
        quant.retrain(q, medium_data, 1, scales="learnt", progress=False)
    fresh = quant.attach_quantisers(trained, 2, 8)
    with pytest.raises(ValueError, match="calibrat"):
        quant.act_quantisers(fresh)["input_quant"].learn_scale()
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quant.weight_quantiser(layer).learn_scale(bad)


@pytest.mark.parametrize("method", ["ste", "random_subset"])
def test_learned_steps_beat_max_based_at_two_bits_and_compile_exactly(medium_data, trained, method):
    accs = {}
    for scales in ("follow", "learned"):
        q = quant.quantise_model(trained, medium_data, 2, 8, granularity="per_tensor")
        before = {n: a.scale.clone() for n, a in quant.act_quantisers(q).items()}
        quant.retrain(q, medium_data, 3, method=method, scales=scales, lr=0.05, seed=0, progress=False)
        accs[scales] = accuracy(q, medium_data)
    assert accs["learned"] > accs["follow"] + 2, accs
    acts = quant.act_quantisers(q)
    assert not any(a.learning for a in acts.values())
    assert any(not torch.equal(a.scale, before[n]) for n, a in acts.items())  # activation steps were learned
    # the compiler reads exactly the learned grids, and the program agrees with the fake-quantised model
    program = nna.compile_model(q)
    for name, layer in quant.weight_layers(q).items():
        wg = program.layer(name).weight_grid
        assert np.all(wg.scale == np.float32(quant.weight_quantiser(layer).scale.item())), name
    assert program.layer("fc1").in_grid == acts["pool2_quant"].grid()
    result = nna.agreement(program, q, medium_data)
    assert result["agreement"] >= 99.0, result


def test_pretrained_quantised_refuses_bad_scales():
    with pytest.raises(ValueError, match="scales"):
        quant.pretrained_quantised("lenet5", 2, 8, scales="bogus", verbose=False)
    with pytest.raises(ValueError, match="ptq"):
        quant.pretrained_quantised("lenet5", 2, 8, method="ptq", scales="learned", verbose=False)
