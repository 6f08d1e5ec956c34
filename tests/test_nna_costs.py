"""The cost model, one function per cost, against costs worked out by hand for one conv and one linear layer."""

import numpy as np
import pytest

from nnlab import nna
from nnlab.nna import costs
from nnlab.nna.program import FlattenLayer, InputLayer, Program, WeightLayer
from nnlab.quant import Grid, QuantSpec

#: Dense storage only, so that the bytes are easy to count by hand; otherwise the Series2NX-like preset:
#: 2,048 MACs per clock at 4..8 bits, 1 GHz, 12.8 GB/s, a 256 KB buffer, a 32-bit accumulator, zero skipping.
CONFIG = nna.SERIES2NX.replace(sparse_formats=("dense",))


def _act(bits=8):
    return Grid(QuantSpec(bits, signed=False, symmetric=True), 0.05, 0)


def _weights(shape, bits, nonzero):
    """Integer weights of ``shape`` with exactly ``nonzero`` non-zero entries (values 1..3, alternating sign)."""
    w = np.zeros(int(np.prod(shape)), np.int32)
    w[:nonzero] = [(1 + i % 3) * (-1) ** i for i in range(nonzero)]
    out = shape[0]
    return w.reshape(shape), Grid(QuantSpec.for_weights(bits), np.full(out, 0.01), np.zeros(out, int))


def _program():
    """in (1, 6, 6) 8-bit -> conv 2x3x3, 4-bit weights, 5 of 18 non-zero -> (2, 4, 4) -> flatten (32,)
    -> linear 3x32, 8-bit weights, 48 of 96 non-zero -> int32 sums (the last layer)."""
    conv_w, conv_g = _weights((2, 1, 3, 3), 4, 5)
    fc_w, fc_g = _weights((3, 32), 8, 48)
    layers = [InputLayer("in", _act(), (1, 6, 6)),
              WeightLayer("conv", "conv2d", ("in",), conv_w, conv_g, np.zeros(2, np.int32), _act(), _act()),
              FlattenLayer("flat", ("conv",), _act()),
              WeightLayer("fc", "linear", ("flat",), fc_w, fc_g, np.zeros(3, np.int32), _act(), None)]
    return Program(layers, "hand", "nnlab")


# Worked out by hand.  Energies in pJ: Horowitz's table; the 256 KB buffer's SRAM sits between 32 KB (20 pJ)
# and 1 MB (100 pJ) at log2 position (18 - 15) / (20 - 15) = 0.6: 20 + 0.6 * 80 = 68 pJ per 64 bits.
SRAM_PJ, DRAM_PJ = 68.0, 1950.0
ADD32_PJ = 0.1  # the 32-bit accumulator's add
HAND = {
    "conv": {
        # storage: 18 weights x 4 bits = 9 B; parameters: 2 channels x (int32 bias + float32 scale) = 16 B
        "format": "dense", "payload_B": 9.0, "index_B": 0.0, "params_B": 16.0, "padding_B": 0.0, "storage_B": 25.0,
        # compute: 4 x 4 = 16 output positions x 18 weights; zero skipping: 16 x 5
        "density": 5 / 18, "macs_dense": 288, "macs": 80,
        # traffic: DRAM reads the 25 stored bytes; SRAM: 25 B of weights, 36 inputs x 8 bits, 32 outputs x 8 bits
        "dram_B": 25.0, "sram_B": (8 * 25 + 36 * 8 + 32 * 8) / 8,
        # energy: a 4x8-bit multiply is 0.2 x 32 / 64 = 0.1 pJ, plus the add
        "energy_mac_nJ": 80 * (0.1 + ADD32_PJ) / 1000, "energy_sram_nJ": 744 / 64 * SRAM_PJ / 1000,
        "energy_dram_nJ": 25 * 8 / 64 * DRAM_PJ / 1000,
        # time: 2,048 MACs per clock at 4x8 bits; 12.8 bytes per clock: memory-bound
        "cycles_compute": 80 / 2048, "cycles_memory": 25 / 12.8, "cycles": 25 / 12.8, "bound": "memory",
        "latency_us": 25 / 12.8 / 1000,
    },
    "fc": {
        # storage: 96 weights x 8 bits = 96 B; parameters: 3 x 8 B
        "format": "dense", "payload_B": 96.0, "index_B": 0.0, "params_B": 24.0, "padding_B": 0.0, "storage_B": 120.0,
        "density": 0.5, "macs_dense": 96, "macs": 48,
        # traffic: the stored 120 B, and the 3 int32 sums leave the chip (12 B); SRAM: 120 B, 32 x 8 bits in,
        # 3 x 32 bits out
        "dram_B": 132.0, "sram_B": (8 * 120 + 32 * 8 + 3 * 32) / 8,
        # energy: an 8x8-bit multiply is 0.2 pJ
        "energy_mac_nJ": 48 * (0.2 + ADD32_PJ) / 1000, "energy_sram_nJ": 1312 / 64 * SRAM_PJ / 1000,
        "energy_dram_nJ": 132 * 8 / 64 * DRAM_PJ / 1000,
        "cycles_compute": 48 / 2048, "cycles_memory": 132 / 12.8, "cycles": 132 / 12.8, "bound": "memory",
        "latency_us": 132 / 12.8 / 1000,
    },
}


def _check(measured: dict, expected: dict, where: str):
    for key, want in expected.items():
        got = measured[key]
        if isinstance(want, str):
            assert got == want, f"{where} {key}: expected {want!r}, got {got!r}"
        else:
            assert got == pytest.approx(want, rel=1e-12), f"{where} {key}: expected {want}, got {got}"


def test_energy_table_figures_the_hand_costs_use():
    e = CONFIG.energy
    assert e.sram_read(CONFIG.buffer_bytes) == pytest.approx(SRAM_PJ)
    assert e.dram_64b == DRAM_PJ and e.add(32) == pytest.approx(ADD32_PJ)
    assert e.mult(4, 8) == pytest.approx(0.1) and e.mult(8, 8) == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["conv", "fc"])
def test_each_cost_function_matches_the_hand_computed_layer(name):
    program = _program()
    layer = next(layer for layer in program.layers if layer.name == name)
    shapes = nna.output_shapes(program)
    inputs = {"conv": [(36, 8)], "fc": [(32, 8)]}[name]
    output = {"conv": (32, 8), "fc": (3, 32)}[name]
    hand = HAND[name]
    storage = costs.storage_cost(layer, CONFIG)
    compute = costs.compute_cost(layer, shapes[name], CONFIG)
    traffic = costs.traffic_cost(layer, inputs, output, storage["storage_B"], name == "fc", CONFIG)
    energy = costs.energy_cost(layer, compute["macs"], traffic["sram_B"], traffic["dram_B"], CONFIG)
    time = costs.time_cost(layer, compute["macs"], traffic["dram_B"], CONFIG)
    for part in (storage, compute, traffic, energy, time):
        _check(part, {k: v for k, v in hand.items() if k in part}, name)
    assert energy["energy_nJ"] == pytest.approx(hand["energy_mac_nJ"] + hand["energy_sram_nJ"]
                                                + hand["energy_dram_nJ"], rel=1e-12)
    assert costs.operand_bits(layer, CONFIG) == {"conv": (4, 8), "fc": (8, 8)}[name]


def test_layer_costs_assembles_the_cost_functions():
    table = nna.layer_costs(_program(), CONFIG)
    assert list(table.columns) == costs.LAYER_COLUMNS
    assert table["layer"].tolist() == ["in", "conv", "flat", "fc"]
    rows = table.set_index("layer")
    for name, hand in HAND.items():
        _check(rows.loc[name].to_dict(), hand, f"layer_costs row {name!r}")
    # the input reads the 36-byte image once and costs nothing else; the flatten costs nothing at all
    _check(rows.loc["in"].to_dict(), {"dram_B": 36.0, "sram_B": 0.0, "macs": 0, "storage_B": 0.0, "a_bits": 8,
                                      "energy_nJ": 36 * 8 / 64 * DRAM_PJ / 1000, "bound": "memory"}, "in")
    _check(rows.loc["flat"].to_dict(), {"dram_B": 0.0, "sram_B": 0.0, "energy_nJ": 0.0, "cycles": 0.0, "bound": ""},
           "flat")
    total = nna.report(_program(), CONFIG).iloc[-1]
    assert total["storage_B"] == 25 + 120 and total["macs"] == 80 + 48 and total["dram_B"] == 36 + 25 + 132


def test_fp32_costs_every_weight_in_float32_dense():
    fp32 = CONFIG.as_fp32()
    layer = _program().layers[1]
    assert costs.operand_bits(layer, fp32) == (32, 32)
    _check(costs.storage_cost(layer, fp32), {"format": "dense", "payload_B": 72.0, "params_B": 8.0,
                                             "storage_B": 80.0}, "fp32 conv")
    compute = costs.compute_cost(layer, (2, 4, 4), fp32)
    assert compute["macs"] == compute["macs_dense"] == 288  # no zero skipping
    energy = costs.energy_cost(layer, 288, 0.0, 0.0, fp32)
    assert energy["energy_mac_nJ"] == pytest.approx(288 * (3.7 + 0.9) / 1000, rel=1e-12)
    assert costs.time_cost(layer, 288, 0.0, fp32)["cycles_compute"] == pytest.approx(288 / 128)  # 32x32: 16 lanes


def test_traffic_spills_an_output_that_does_not_fit_the_buffer():
    conv = _program().layers[1]
    fits = costs.traffic_cost(conv, [(36, 8)], (32, 8), 25.0, False, CONFIG.replace(buffer_bytes=68))
    spills = costs.traffic_cost(conv, [(36, 8)], (32, 8), 25.0, False, CONFIG.replace(buffer_bytes=67))
    assert fits["dram_B"] == 25.0  # 36 + 32 bytes of activations fit in 68
    assert spills["dram_B"] == 25.0 + 2 * 32  # the output is written out and read back
    assert spills["sram_B"] == fits["sram_B"]
