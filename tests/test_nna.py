"""The NNA simulator: packing, storage, engine ops, compiler, report, and agreement with PyTorch."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnlab
from nnlab import nna
from nnlab.nna import engine, packing
from nnlab.nna.program import AddLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer
from nnlab.quant import Grid, QuantSpec


# ----------------------------------------------------------------------------- packing
@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 300), signed=st.booleans(),
       policy=st.sampled_from(["dense", "word16"]), seed=st.integers(0, 2 ** 31))
def test_pack_unpack_roundtrip(bits, n, signed, policy, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = rng.integers(lo, hi + 1, n)
    values[: min(n, 2)] = [lo, hi][: min(n, 2)]  # the extremes
    packed = nna.pack(values, bits, signed, policy)
    assert packed.dtype == np.uint8
    assert packed.size == nna.packed_bytes(n, bits, policy)
    np.testing.assert_array_equal(nna.unpack(packed, n, bits, signed, policy), values)


def test_pack_sizes_and_layout():
    assert nna.packed_bytes(8, 5, "dense") == 5  # 40 bits
    assert nna.packed_bytes(8, 5, "word16") == 6  # 3 per word -> 3 words
    packed = nna.pack([1, -1], 4, signed=True)
    assert packed.tolist() == [0xF1]  # little-endian bitstream: 0001 then 1111
    table = nna.bit_layout([3, -2, 5], 5)
    assert table["bits"].tolist() == ["00011", "11110", "00101"]


def test_pack_rejects_out_of_range_values_and_floats():
    with pytest.raises(ValueError, match="fit in 4 signed bits"):
        nna.pack([8], 4)
    with pytest.raises(ValueError, match="unsigned"):
        nna.pack([-1], 4, signed=False)
    with pytest.raises(TypeError, match="integer"):
        nna.pack(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="bits must be <= 16"):
        nna.pack([1], 17)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("policy", ["dense", "word16"])
def test_sparse_formats_roundtrip_and_choice(density, policy):
    rng = np.random.default_rng(1)
    codes = rng.integers(-7, 8, (20, 30)) * (rng.random((20, 30)) < density)
    sizes = {}
    for fmt in nna.SPARSE_FORMATS:
        enc = nna.encode_weights(codes, 4, formats=(fmt,), policy=policy)
        np.testing.assert_array_equal(nna.decode_weights(enc, codes.shape, policy), codes)
        assert 8 * enc.nbytes == enc.payload_bits + enc.index_bits_total + enc.padding_bits
        sizes[fmt] = enc.nbytes
    best = nna.encode_weights(codes, 4, policy=policy)
    assert best.nbytes == min(sizes.values())
    if density <= 0.1:
        assert best.format != "dense"
    if density == 1.0:
        assert best.format == "dense"


def test_runlength_fillers():
    flat = np.zeros(40, np.int64)
    flat[[0, 20, 39]] = [3, -1, 2]
    gaps, values = packing.runlength_gaps(flat, 3)  # a filler covers 8 positions: 19 = 8 + 8 + 3, 18 = 8 + 8 + 2
    assert gaps.tolist() == [0, 7, 7, 3, 7, 7, 2]
    assert values.tolist() == [3, 0, 0, -1, 0, 0, 2]


# ----------------------------------------------------------------------------- config and energy
def test_config_presets_and_energy_table():
    cfg = nna.SERIES2NX
    assert cfg.macs_per_cycle(8, 8) == 2048 and cfg.macs_per_cycle(4, 8) == 2048
    assert cfg.macs_per_cycle(16, 8) == 1024 and cfg.macs_per_cycle(32, 32) == 128
    assert cfg.peak_tops == pytest.approx(4.1, abs=0.05)
    e = cfg.energy
    assert e.mult(8, 8) == pytest.approx(0.2) and e.mult(4, 8) == pytest.approx(0.1)
    assert e.add(8) == pytest.approx(0.03) and e.add(32) == pytest.approx(0.1)
    assert e.sram_read(8 * 1024) == 10 and e.sram_read(32 * 1024) == 20 and e.sram_read(1 << 20) == 100
    assert 20 < e.sram_read(256 * 1024) < 100
    assert 1300 <= e.dram_64b <= 2600
    assert nna.FP32_BASELINE.arithmetic == "fp32" and nna.FP32_BASELINE.clock_hz == cfg.clock_hz


def test_config_validation():
    with pytest.raises(ValueError, match="packing"):
        nna.NNAConfig(packing="nibbles")
    with pytest.raises(ValueError, match="sparse_formats"):
        nna.NNAConfig(sparse_formats=("csr",))
    with pytest.raises(ValueError, match="macs_per_cycle_8bit"):
        nna.NNAConfig(macs_per_cycle_8bit=0)


# ----------------------------------------------------------------------------- engine ops
def _act(scale, zero_point=0, bits=8):
    """An activation grid: unsigned, zero point 0 (symmetric) or given (asymmetric)."""
    return Grid(QuantSpec(bits, signed=False, symmetric=zero_point == 0), scale, zero_point)


def _weight_layer(weight, weight_bits=8, **kw):
    out = weight.shape[0]
    fields = dict(name="w", op="conv2d" if weight.ndim == 4 else "linear", inputs=("in",),
                  weight=weight.astype(np.int32),
                  weight_grid=Grid(QuantSpec.for_weights(weight_bits), np.full(out, 0.01), np.zeros(out, int)),
                  bias=np.zeros(out, np.int32), in_grid=_act(0.02, 3), out_grid=_act(0.05), activation=(0.0, None))
    fields.update(kw)
    return WeightLayer(**fields)


def test_conv2d_sums_are_exact_against_torch():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (2, 3, 9, 9))
    w = rng.integers(-127, 128, (4, 3, 3, 3))
    layer = _weight_layer(w, stride=(2, 1), padding=(1, 1))
    acc = engine.conv2d(np.ascontiguousarray(q.swapaxes(0, 1)), layer)
    ref = torch.nn.functional.conv2d(torch.tensor(q - 3, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                     stride=(2, 1), padding=1).numpy()
    np.testing.assert_array_equal(engine.channel_first(acc), ref)


def test_accumulator_saturation_is_counted():
    layer = _weight_layer(np.full((1, 1000), 127), in_grid=_act(0.02), out_grid=None, activation=None)
    q = np.full((1000, 1), 255, np.int32)  # 1000 * 255 * 127 = 32.4 million > 2**23
    acc = engine.linear(q, layer)
    total, saturated = engine.accumulate_bias(acc, layer, accumulator_bits=24)
    assert saturated == 1 and total.max() == 2 ** 23 - 1
    assert engine.accumulate_bias(engine.linear(q, layer), layer, 32)[1] == 0


def test_fixed_point_multiplier_is_close():
    m = np.array([1e-6, 0.0123, 0.5, 0.99999, 3.7])
    m0, shift = engine.fixed_point_multiplier(m, 30)
    np.testing.assert_allclose(m0 * 2.0 ** -shift, m, rtol=2e-9)


def test_requantise_modes_agree_closely():
    rng = np.random.default_rng(2)
    layer = _weight_layer(rng.integers(-7, 8, (5, 40)), bias=rng.integers(-500, 500, 5).astype(np.int32))
    total = rng.integers(-20000, 20000, (5, 300)).astype(np.int64)
    a = engine.requantise(total, total, layer, "torch", 32)
    b = engine.requantise(total, total, layer, "integer", 32)
    assert a.min() >= 0 and a.max() <= 255
    assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01


def test_pooling_and_residual_add():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, (2, 3, 6, 6)).astype(np.int32)
    cnhw = np.ascontiguousarray(q.swapaxes(0, 1))
    grid = _act(0.1)
    mp = engine.maxpool2d(cnhw, PoolLayer("p", "maxpool2d", ("in",), (3, 3), (2, 2), (1, 1), grid, grid))
    ref = nn.functional.max_pool2d(torch.tensor(q, dtype=torch.float64), 3, 2, 1).numpy()
    np.testing.assert_array_equal(engine.channel_first(mp), ref)
    ap = engine.avgpool2d(cnhw, PoolLayer("a", "avgpool2d", ("in",), (2, 2), (2, 2), (0, 0), grid, grid,
                                          rounding="raw"))
    ref = np.rint(nn.functional.avg_pool2d(torch.tensor(q, dtype=torch.float64), 2).numpy())
    np.testing.assert_array_equal(engine.channel_first(ap), ref)
    add = AddLayer("add", ("a", "b"), (_act(0.1), _act(0.2, 10)), _act(0.3, 5))
    a, b = rng.integers(0, 256, 1000), rng.integers(0, 256, 1000)
    expect = np.clip(np.rint((a * 0.1 + (b - 10) * 0.2) / 0.3) + 5, 0, 255)
    for mode in nna.MODES:
        assert np.abs(engine.add(a, b, add, mode) - expect).max() <= 1


def test_program_with_residual_add_runs():
    rng = np.random.default_rng(4)
    inp = InputLayer("in", _act(0.05), (6,))
    fc = _weight_layer(rng.integers(-7, 8, (6, 6)), in_grid=_act(0.05), weight_bits=4)
    add = AddLayer("add", ("w", "in"), (_act(0.05), _act(0.05)), _act(0.1))
    prog = Program([inp, fc, add], "residual")
    x = rng.random((5, 6)).astype(np.float32)
    res = nna.run(prog, x, trace=True)
    q_in, q_fc = res.outputs["in"], res.outputs["w"]
    expect = np.clip(np.rint(q_fc * 0.5 + q_in * 0.5), 0, 255)
    assert np.abs(res.outputs["add"] - expect).max() <= 1
    assert nna.output_shapes(prog)["add"] == (6,)


def test_program_checks_its_graph():
    inp = InputLayer("in", _act(0.05), (6,))
    fc = _weight_layer(np.ones((6, 6)), in_grid=_act(0.05))
    with pytest.raises(ValueError, match="reads 'nowhere', which is not an earlier layer"):
        Program([inp, _weight_layer(np.ones((6, 6)), inputs=("nowhere",), in_grid=_act(0.05))])
    with pytest.raises(ValueError, match=r"expects its input 'in' on .* but 'in' outputs"):
        Program([inp, _weight_layer(np.ones((6, 6)), in_grid=_act(0.07))])
    with pytest.raises(ValueError, match="two layers named 'w'"):
        Program([inp, fc, FlattenLayer("w", ("w",), _act(0.05))])
    with pytest.raises(ValueError, match="must start with an InputLayer"):
        Program([fc])


def test_run_rejects_bad_inputs():
    prog = Program([InputLayer("in", _act(0.05), (1, 4, 4)),
                    _weight_layer(np.ones((2, 1, 3, 3)), in_grid=_act(0.05), out_grid=None, activation=None)], "tiny")
    with pytest.raises(ValueError, match=r"shape \(N, 1, 4, 4\)"):
        nna.run(prog, np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(TypeError, match="float images"):
        nna.run(prog, np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        nna.run(prog, np.zeros((2, 1, 4, 4), np.float32), mode="fast")


# ----------------------------------------------------------------------------- compiler
def _tiny_quantised(data, bits=8, model=None):
    torch.manual_seed(0)
    model = model or nnlab.models.LeNet5()
    return nnlab.quant.quantise_model(model, data, bits, 8, calibration_batches=2)


@pytest.fixture(scope="module")
def tiny_data():
    return nnlab.data.load_data(train_limit=256, test_limit=200, verbose=False)


def test_compile_rejects_unsupported_layers(tiny_data):
    with pytest.raises(ValueError, match="float weights|not quantised"):
        nna.compile_model(nnlab.quant.quantise_model(nnlab.models.LeNet5(), tiny_data, None, 8,
                                                     calibration_batches=1))
    with pytest.raises(ValueError, match="input quantiser"):
        nna.compile_model(nnlab.quant.quantise_model(nnlab.models.LeNet5(), tiny_data, 8, None))
    odd = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with pytest.raises(ValueError, match=r"node '1' \(Tanh\) is not supported; supported: Conv2d"):
        nnlab.quant.quantise_model(odd, tiny_data, 8, 8, calibration_batches=1)
    weights_only = nnlab.quant.quantise_model(odd, tiny_data, 8, None)  # weights alone need no graph ...
    with pytest.raises(ValueError, match=r"node '1' \(Tanh\) is not supported"):
        nna.compile_model(weights_only)  # ... the compiler refuses the node before anything else
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                            nn.Linear(2 * 28 * 28, 10))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        nnlab.quant.quantise_model(reflect, tiny_data, 8, 8, calibration_batches=1)
    with pytest.raises(ValueError, match="expects 400 input features"):
        nna.compile_model(_tiny_quantised(tiny_data), input_shape=(1, 32, 32))
    with pytest.raises(ValueError, match="input_shape"):
        nna.compile_model(_tiny_quantised(tiny_data), input_shape=(28, 28.0))


def test_batchnorm_is_folded_exactly(tiny_data):
    torch.manual_seed(0)
    net = nnlab.models.build_model("vgg-mnist")
    with torch.no_grad():  # give batch norm non-trivial statistics, one negative factor included
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.weight[0] = -1.0
    q = nnlab.quant.quantise_model(net.eval(), tiny_data, 8, 8, calibration_batches=2)
    prog = nna.compile_model(q)
    assert len(prog.weight_layers) == 7
    result = nna.agreement(prog, q, tiny_data)
    assert result["agreement"] >= 99.0


def test_compiled_program_matches_fake_quant_model(tiny_data):
    net = nnlab.cache.pretrained("lenet5", data=tiny_data, quick=True, verbose=False)
    q = nnlab.quant.quantise_model(net, tiny_data, 5, 8)
    prog = nna.compile_model(q)
    layer = prog.layer("fc1")
    codes, spec, scale, _ = nnlab.quant.quantised_weight(q.get_submodule("fc1"))
    np.testing.assert_array_equal(layer.weight, codes.numpy())
    assert layer.weight_bits == 5 and layer.bias.dtype == np.int32
    for mode in nna.MODES:
        result = nna.agreement(prog, q, tiny_data, mode=mode)
        assert result["agreement"] >= 99.5
        assert abs(result["accuracy_nna"] - result["accuracy_torch"]) <= 0.5
    modes = nna.compare_modes(prog, tiny_data)
    assert modes["share"].max() < 1.0


# ----------------------------------------------------------------------------- storage and report
def test_save_load_roundtrip_and_file_size(tiny_data, tmp_path):
    net = nnlab.cache.pretrained("lenet5", data=tiny_data, quick=True, verbose=False)
    pruned = nnlab.prune.core_by_fraction(net, 0.9)
    q = nnlab.quant.quantise_model(pruned, tiny_data, 5, 8)
    prog = nna.compile_model(q, name="lenet5-sparse")
    for cfg in (nna.SERIES2NX, nna.SERIES2NX.replace(packing="word16")):
        table = nna.report(prog, cfg)
        info = nna.save(prog, tmp_path / "p.nna", cfg)
        size = os.path.getsize(tmp_path / "p.nna")
        header, header_bytes = nna.read_header(tmp_path / "p.nna")
        assert size == info["file_bytes"] == header_bytes + int(table.iloc[-1]["storage_B"])
        assert header_bytes < 4096
        assert nna.load(tmp_path / "p.nna") == prog
    (tmp_path / "bad.nna").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a saved NNA program"):
        nna.load(tmp_path / "bad.nna")


def test_report_columns_and_ratios(tiny_data):
    net = nnlab.cache.pretrained("lenet5", data=tiny_data, quick=True, verbose=False)
    prog = nna.compile_model(nnlab.quant.quantise_model(net, tiny_data, 8, 8))
    sparse = nna.requantise_weights(prog, weight_bits=4, sparsity=0.9)
    dense_t, sparse_t = nna.report(prog), nna.report(sparse)
    # Written out, so that a column dropped, renamed or reordered in the report is caught here.
    assert list(dense_t.columns) == [
        "layer", "op", "w_bits", "a_bits", "density", "format", "payload_B", "index_B", "params_B", "padding_B",
        "storage_B", "fp32_B", "compression", "macs_dense", "macs", "dram_B", "sram_B", "energy_mac_nJ",
        "energy_sram_nJ", "energy_dram_nJ", "decode_symbols", "cycles_decode", "energy_decode_nJ", "energy_nJ",
        "fp32_energy_nJ", "energy_ratio", "cycles_compute",
        "cycles_memory", "cycles", "bound", "latency_us", "fp32_latency_us"]
    assert list(dense_t["layer"].iloc[:-1]) == [layer.name for layer in prog.layers]
    total = dense_t.iloc[-1]
    assert total["macs_dense"] == 416520 and total["fp32_B"] == 4 * 61706
    assert total["storage_B"] == pytest.approx(total[["payload_B", "index_B", "params_B", "padding_B"]].sum())
    assert 3.5 < total["compression"] < 4.0  # 8-bit dense: a bit under 4x because of the parameters
    s = nna.headline(sparse_t)
    assert s["compression"] > 15 and s["energy_ratio"] > 10
    assert s["macs"] < 0.2 * s["macs_dense"]
    assert set(sparse_t["bound"].iloc[:-1]) <= {"compute", "memory", ""}
    fp32 = nna.headline(nna.report(prog, nna.FP32_BASELINE))
    assert fp32["compression"] == pytest.approx(1.0) and fp32["energy_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="supports 4 to 16 bits"):
        nna.report(nna.requantise_weights(prog, weight_bits=2))


# ----------------------------------------------------------------------------- module layout
def test_names_keep_their_old_module_paths():
    import importlib

    from nnlab.nna import compiler, costs, import_torch, shapes, whatif

    old_report = importlib.import_module("nnlab.nna.report")
    for name in ("compile_torch_int8", "torch_conv_kernel", "torch_linear_kernel", "SUPPORTED_INT8", "QUINT8",
                 "_cpu_has_avx512_vnni", "_fbgemm_depthwise", "_import_torch_int8"):
        assert getattr(compiler, name) is getattr(import_torch, name), name
    assert compiler.output_shapes is shapes.output_shapes is nna.output_shapes
    assert compiler.requantise_weights is whatif.requantise_weights is nna.requantise_weights
    for name in ("report", "layer_costs", "summary", "COLUMNS", "OVERFLOW_COLUMNS"):
        assert getattr(old_report, name) is getattr(costs, name), name
    assert nna.report is costs.report and nna.layer_costs is costs.layer_costs


def test_nna_modules_import_each_other_without_cycles():
    """Top-level ``from .x import`` statements between nna's modules form no cycle (``report`` is costs' alias)."""
    import ast
    from pathlib import Path

    folder = Path(nna.__file__).parent
    needs = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        needs[path.stem] = {node.module for node in tree.body
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert needs["compiler"] >= {"import_torch", "shapes", "whatif", "program"}
    assert needs["report"] == {"costs"}
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for other in needs.get(module, ()):
            visit(other)
        visiting.pop()
        done.add(module)

    for module in needs:
        visit(module)
