"""The simulator against PyTorch on the whole 1,000-image test set: exact for PyTorch's int8, close for nnlab's."""

import pytest
import torch

import nnlab
from nnlab import nna


@pytest.fixture(scope="module")
def lenet5(data):
    return nnlab.cache.pretrained("lenet5", data=data, quick=True, verbose=False)


def test_torch_int8_model_is_matched_exactly_in_every_layer(data, lenet5):
    before = torch.backends.quantized.engine
    try:
        qmodel = nna.quantise_torch_int8(lenet5, data, calibration_batches=4)
        program = nna.compile_torch_int8(qmodel)
        table = nna.compare_torch_int8(program, qmodel, data)
    finally:
        torch.backends.quantized.engine = before
    assert set(table["layer"]) >= {"quant", "body.conv1", "body.pool1", "body.conv2", "body.fc1", "body.fc2", "body.fc3"}
    assert table["values"].iloc[0] == 1000 * 28 * 28
    assert table.attrs["total"] == 0, table.to_string()
    assert program.layer("body.fc1").kernel == nna.torch_linear_kernel("x86")
    assert program.layer("body.conv1").kernel == nna.torch_conv_kernel("x86")


@pytest.mark.parametrize("bits", [8, 5, 4])
def test_nnlab_model_agrees_with_fake_quant(data, lenet5, bits):
    qmodel = nnlab.quant.quantise_model(lenet5, data, bits, 8)
    program = nna.compile_model(qmodel)
    result = nna.agreement(program, qmodel, data)
    assert result["n"] == 1000
    assert result["agreement"] >= 99.5
    assert abs(result["accuracy_nna"] - result["accuracy_torch"]) <= 0.2


def test_two_bit_weights_and_sixteen_bit_layers(data, lenet5):
    # ternary weights: a network on the edge of its accuracy, where a rare rounding tie flips an answer
    qmodel = nnlab.quant.quantise_model(lenet5, data, 2, 8)
    result = nna.agreement(nna.compile_model(qmodel), qmodel, data)
    assert result["agreement"] >= 99.0, result
    # 16-bit weights and activations overflow 32-bit accumulators: counted, and cured by wider ones
    qmodel = nnlab.quant.quantise_model(lenet5, data, 16, 16)
    program = nna.compile_model(qmodel)
    assert nna.agreement(program, qmodel, data, limit=200)["saturations"] > 0
    result = nna.agreement(program, qmodel, data, limit=500, accumulator_bits=48)
    assert result["saturations"] == 0 and result["agreement"] >= 99.5, result
