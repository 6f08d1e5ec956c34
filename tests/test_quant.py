"""QuantSpec and tensor quantisation: PyTorch's exact semantics, scale choice, bad input."""

import pytest
import torch

from nnlab.quant import (QuantSpec, compute_qparams, dequantise, fake_quantise, grid_levels, quantise,
                         qparams_from_range)

BITS = list(range(2, 17))


def _specs(bits):
    for granularity in ("per_tensor", "per_channel"):
        yield QuantSpec(bits, signed=True, symmetric=True, granularity=granularity)
        yield QuantSpec(bits, signed=True, symmetric=True, granularity=granularity, narrow_range=True)
        yield QuantSpec(bits, signed=False, symmetric=False, granularity=granularity)
        yield QuantSpec(bits, signed=True, symmetric=False, granularity=granularity)
        yield QuantSpec(bits, signed=False, symmetric=True, granularity=granularity)


def _torch_fake_quant(x, spec, scale, zero_point):
    if spec.per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), spec.ch_axis,
                                                      spec.quant_min, spec.quant_max)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), spec.quant_min, spec.quant_max)


def test_spec_ranges():
    assert (QuantSpec(8).quant_min, QuantSpec(8).quant_max) == (-128, 127)
    assert (QuantSpec(8, narrow_range=True).quant_min, QuantSpec(8).quant_max) == (-127, 127)
    assert (QuantSpec(5, signed=False).quant_min, QuantSpec(5, signed=False).quant_max) == (0, 31)
    assert QuantSpec.for_weights(2).levels == 3  # ternary
    for b in BITS:
        assert QuantSpec(b).levels == 2 ** b
        assert QuantSpec.from_dict(QuantSpec(b, granularity="per_channel").to_dict()) == \
            QuantSpec(b, granularity="per_channel")
    assert QuantSpec(4).replace(bits=6).bits == 6


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits)


@pytest.mark.parametrize("bits", [4.5, 8.0, "8", True])
def test_bits_not_an_integer(bits):
    with pytest.raises(TypeError, match="bits"):
        QuantSpec(bits)


def test_unknown_granularity():
    with pytest.raises(ValueError, match="granularity.*per_row"):
        QuantSpec(8, granularity="per_row")


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantise_equals_pytorch(bits):
    """Random values, clamped values and exact ties (x.5 steps), every spec: bit-for-bit PyTorch."""
    gen = torch.Generator().manual_seed(bits)
    for spec in _specs(bits):
        x = torch.randn(6, 40, generator=gen) * 2
        scale, zp = compute_qparams(x, spec)
        scale = scale * (0.5 + torch.rand(scale.shape, generator=gen))  # some values now clamp
        # Ties: scales that are powers of two make x / scale exact, so k + 0.5 steps are exact ties.
        pow2 = torch.tensor(2.0 ** -3)
        k = torch.arange(spec.quant_min, spec.quant_max + 1, dtype=torch.float32)[:200]
        ties = ((k + 0.5) * pow2).reshape(1, -1).expand(6, -1).contiguous()
        for values, s in ((x, scale), (ties, pow2.expand_as(scale).contiguous() if spec.per_channel else pow2)):
            z = zp if not spec.per_channel else zp.expand(values.shape[0]).contiguous()
            if not spec.per_channel:
                z = zp.reshape(())
            ref = _torch_fake_quant(values, spec, s, z)
            ours = fake_quantise(values, spec, s, z)
            assert torch.equal(ours, ref), (spec, "fake_quantise")
            back = dequantise(quantise(values, spec, s, z), spec, s, z)
            assert torch.equal(back, ref), (spec, "quantise + dequantise")


def test_ties_round_half_to_even():
    spec = QuantSpec(4)
    q = quantise(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), spec, 1.0, 0)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_straight_through_gradient():
    spec = QuantSpec(3)  # integers -4..3
    x = torch.tensor([-10.0, -0.3, 0.2, 1.7, 10.0], requires_grad=True)
    fake_quantise(x, spec, 1.0, 0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # 1 inside the grid, 0 where clamped


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_scale_methods(method, granularity):
    spec = QuantSpec.for_weights(4, granularity=granularity)
    x = torch.randn(8, 200, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 20.0  # an outlier
    scale, zp = compute_qparams(x, spec, method=method)
    assert torch.all(zp == 0) and torch.all(scale > 0)
    max_scale, _ = compute_qparams(x, spec, method="max")
    err = (fake_quantise(x, spec, scale, zp) - x).pow(2).mean()
    max_err = (fake_quantise(x, spec, max_scale, zp) - x).pow(2).mean()
    if method == "max":
        assert torch.allclose(scale, x.abs().amax(1) / 7 if spec.per_channel else x.abs().max() / 7)
    else:
        assert torch.all(scale <= max_scale + 1e-9)
        assert err < max_err  # clipping the outlier lowers the error of the rest
    if method == "mse":
        other, _ = compute_qparams(x, spec, method="percentile")
        assert err <= (fake_quantise(x, spec, other, zp) - x).pow(2).mean() + 1e-9


def test_asymmetric_covers_range_and_zero_is_exact():
    spec = QuantSpec(5, signed=False, symmetric=False)
    x = torch.linspace(-0.42, 2.8, 1000)
    scale, zp = compute_qparams(x, spec)
    levels = grid_levels(spec, scale, zp)
    assert levels.min() <= -0.42 + scale and levels.max() >= 2.8 - scale
    assert 0.0 in levels.tolist()
    assert fake_quantise(torch.zeros(3), spec, scale, zp).eq(0).all()


@pytest.mark.parametrize("spec", [QuantSpec(2), QuantSpec(8, signed=False, symmetric=False),
                                  QuantSpec(4, granularity="per_channel"), QuantSpec(16, symmetric=False)])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_constant_and_all_zero_tensors(spec, value):
    x = torch.full((4, 9), value)
    scale, zp = compute_qparams(x, spec)
    assert torch.all(scale > 0) and torch.isfinite(scale).all()
    for method in ("percentile", "mse"):
        s2, _ = compute_qparams(x, spec, method=method)
        assert torch.isfinite(s2).all() and torch.all(s2 > 0)
    out = fake_quantise(x, spec, scale, zp)
    assert torch.isfinite(out).all()
    if value == 0.0:
        assert out.eq(0).all()


def test_empty_range_uses_scale_floor():
    scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), QuantSpec(8, symmetric=False))
    assert scale > 0 and int(zp) == -128


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        compute_qparams(torch.ones(3), QuantSpec(8), method="median")
    with pytest.raises(TypeError, match="QuantSpec"):
        fake_quantise(torch.ones(3), 8, 1.0, 0)
    with pytest.raises(ValueError, match="per-channel"):
        fake_quantise(torch.ones(4, 2), QuantSpec(8, granularity="per_channel"), torch.ones(3), torch.zeros(3))
