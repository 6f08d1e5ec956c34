"""ONNX export: the quantised network in ONNX, run in ONNX Runtime against the simulator.

ONNX Runtime (CPU) is a second, independent engine. The exact form must give the simulator's integers in every
layer and its logits, bit for bit, at every optimisation level; the qdq form its top-1 answers and, layer by layer,
its integers up to the float32 rounding the export module's docstring explains. The networks are small and
untrained (quantised and calibrated on real digits), so the tests are quick; the trained LeNet-5 and
MobileNetV2-style figures are in benchmarks/onnx_export.py.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx", reason='ONNX export needs the optional extra: pip install "nnlab[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='ONNX Runtime is the optional extra: pip install "nnlab[onnx]"')

import nnlab  # noqa: E402
from nnlab import export, graph, nna, quant  # noqa: E402
from nnlab.models import LeNet5  # noqa: E402
from nnlab.nna.program import FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return nnlab.data.load_data(batch_size=100)


@pytest.fixture(scope="module")
def images(data):
    return torch.cat([x for x, _ in data.test])[:300]


class Block(nn.Module):
    """Depthwise-separable block with batch norm and ReLU6, a residual add, and a concat of two branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.pw(F.relu6(self.bn(self.dw(x)))) + x
        z = torch.cat([F.relu(y), F.relu(self.side(x))], dim=1)
        return self.fc(torch.flatten(F.avg_pool2d(z, 2), 1))


def _net(kind):
    torch.manual_seed(0)
    net = LeNet5() if kind == "lenet5" else Block()
    if kind != "lenet5":  # batch-norm statistics that do something
        with torch.no_grad():
            net.bn.running_mean.uniform_(-0.2, 0.2)
            net.bn.running_var.uniform_(0.5, 2.0)
            net.bn.weight.uniform_(0.5, 1.5)
    return net.eval()


def _export(tmp_path, qmodel, **options):
    path = tmp_path / "model.onnx"
    proto = export.to_onnx(qmodel, path, **options)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path, proto


@pytest.mark.filterwarnings("error::nnlab.export.InexactExportWarning")
@pytest.mark.parametrize("kind", ["lenet5", "dag"])
@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (6, 4)])
def test_the_exact_form_computes_the_simulators_integers(tmp_path, data, images, kind, weight_bits, act_bits):
    qmodel = quant.quantise_model(_net(kind), data, weight_bits=weight_bits, act_bits=act_bits)
    program = nna.compile_model(qmodel)
    path, proto = _export(tmp_path, qmodel)  # the default form
    assert {p.key: p.value for p in proto.metadata_props}["nnlab.form"] == "exact"
    c = export.compare(path, program, images)
    # Bit for bit: every stored integer of every layer, and the float64 logits themselves.
    assert c["identical_integers"] == 1.0 and c["max_integer_difference"] == 0, c
    assert c["top1_agreement"] == 1.0 and c["max_logit_difference"] == 0.0, c
    assert set(c["layers"]) >= {layer.name for layer in program.layers if layer.out_grid is not None}
    # Whatever ONNX Runtime fuses at its other optimisation levels computes the same integers.
    logits, ints = export.run_onnx(path, images, intermediates=True)
    for level in ("none", "all"):
        other_logits, other = export.run_onnx(path, images, optimization=level, intermediates=True)
        np.testing.assert_array_equal(other_logits, logits, err_msg=level)
        for layer, values in ints.items():
            np.testing.assert_array_equal(other[layer], values, err_msg=f"{level}: {layer}")
    with torch.no_grad():
        fake = qmodel(images).argmax(1).numpy()
    assert np.mean(logits.argmax(1) == fake) >= 0.97  # the simulator's own agreement with fake-quant


@pytest.mark.parametrize("kind", ["lenet5", "dag"])
@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (6, 4)])
def test_the_qdq_form_agrees_with_the_simulator_up_to_float32_rounding(tmp_path, data, images, kind, weight_bits,
                                                                        act_bits):
    qmodel = quant.quantise_model(_net(kind), data, weight_bits=weight_bits, act_bits=act_bits)
    program = nna.compile_model(qmodel)
    path, _ = _export(tmp_path, qmodel, form="qdq")
    c = export.compare(path, program, images)
    # 8/8 keeps ties rare; coarse grids put more values exactly on a half-way point (untrained networks, whose
    # logits lie close together, turn a few of those into another top-1).
    top1, identical = (0.99, 0.99) if (weight_bits, act_bits) == (8, 8) else (0.98, 0.97)
    assert c["top1_agreement"] >= top1, c
    assert c["identical_integers"] >= identical, c
    # The first weight layer reads identical input integers: one rounding apart at most.
    first = program.weight_layers[0].name
    assert c["layers"]["input_quant"]["identical"] == 1.0 and c["layers"][first]["max_difference"] <= 1, c
    # Every stored activation is compared, the input's quantiser included.
    assert set(c["layers"]) >= {layer.name for layer in program.layers if layer.out_grid is not None}
    with torch.no_grad():
        fake = qmodel(images).argmax(1).numpy()
    assert np.mean(export.run_onnx(path, images).argmax(1) == fake) >= top1


def test_the_qdq_form_is_not_exact_where_the_exact_form_is(tmp_path, data, images):
    # The reason for the exact form: float32 sums and division by the scale round a few values the other way.
    qmodel = quant.quantise_model(_net("dag"), data, weight_bits=8, act_bits=8)
    program = nna.compile_model(qmodel)
    results = {form: export.compare(_export(tmp_path, qmodel, form=form)[0], program, images)
               for form in export.FORMS}
    assert results["exact"]["identical_integers"] == 1.0
    assert results["qdq"]["identical_integers"] < 1.0 and results["qdq"]["max_logit_difference"] > 0.0


def _pytorch_int8(data, kernel):
    """LeNet-5 from PyTorch's int8 flow (x86), compiled, each weight layer then set to run as ``kernel`` computes.

    The simulator's arithmetic for each of PyTorch's kernels is what the exact form must follow; the kernel is set
    by hand because which one PyTorch picks depends on the CPU (oneDNN's is refused on CPUs without AVX512-VNNI).
    """
    before = torch.backends.quantized.engine
    try:
        qmodel = nna.quantise_torch_int8(_net("lenet5"), data, calibration_batches=2, engine="fbgemm")
    finally:
        torch.backends.quantized.engine = before
    program = nna.compile_torch_int8(qmodel)
    layers = [dataclasses.replace(layer, kernel=kernel) if isinstance(layer, WeightLayer) else layer
              for layer in program.layers]
    return Program(layers, f"{program.name} ({kernel})")


@pytest.mark.parametrize("kernel", ["fbgemm", "fbgemm_avx2", "onednn"])
def test_the_exact_form_follows_pytorchs_int8_roundings(tmp_path, data, images, kernel):
    # A program compiled from PyTorch's own int8 model: float biases and each kernel's rounding (the average pools'
    # roundings are checked one by one below).
    program = _pytorch_int8(data, kernel)
    assert program.layer("body.conv1").kernel == kernel and program.layer("body.fc1").bias_float is not None
    path, _ = _export(tmp_path, program)
    c = export.compare(path, program, images)
    assert c["identical_integers"] == 1.0 and c["top1_agreement"] == 1.0 and c["max_logit_difference"] == 0.0, c


def _pool_program(op, rounding="requantise", padding=(1, 1)):
    """Input, a 3x3 stride-2 pool, flatten, a linear layer: each pooling arithmetic on its own."""
    g = quant.Grid(quant.QuantSpec(8, signed=False, symmetric=False), 0.02, 10)
    out = g if op == "maxpool2d" or rounding != "requantise" else quant.Grid(g.spec, 0.015, 3)
    wg = quant.Grid(quant.QuantSpec(8, signed=True, symmetric=True, granularity="per_channel", ch_axis=0),
                    np.full(10, 0.01, np.float32), np.zeros(10, np.int64))
    weight = np.random.default_rng(0).integers(-127, 128, (10, 196)).astype(np.int32)
    layers = [InputLayer("input_quant", g, (1, 28, 28)),
              PoolLayer("pool", op, ("input_quant",), (3, 3), (2, 2), padding, g, out, rounding=rounding),
              FlattenLayer("flatten", ("pool",), out),
              WeightLayer("fc", "linear", ("flatten",), weight, wg, np.arange(10, dtype=np.int32), out, None)]
    return Program(layers, f"{op}-{rounding}")


@pytest.mark.filterwarnings("error::nnlab.export.InexactExportWarning")
@pytest.mark.parametrize("op,rounding", [("maxpool2d", "requantise")] + [("avgpool2d", r) for r in
                                                                           nna.program.AVG_ROUNDINGS])
def test_every_pooling_arithmetic_is_exact(tmp_path, images, op, rounding):
    program = _pool_program(op, rounding)
    path, _ = _export(tmp_path, program)
    c = export.compare(path, program, images)
    assert c["identical_integers"] == 1.0 and c["max_logit_difference"] == 0.0, c
    assert c["layers"]["pool"]["values"] == len(images) * 14 * 14


def test_sums_float32_cannot_hold_exactly_are_warned_by_layer(tmp_path, images):
    g = quant.Grid(quant.QuantSpec(8, signed=False, symmetric=False), 0.02, 10)
    wg = quant.Grid(quant.QuantSpec(8, signed=True, symmetric=True, granularity="per_channel", ch_axis=0),
                    np.full(10, 0.01, np.float32), np.zeros(10, np.int64))
    weight = np.full((10, 784), 127, np.int32)  # 784 * 127 * (255 - 10) > 2**24
    weight[1:] = 1
    program = Program([InputLayer("input_quant", g, (1, 28, 28)), FlattenLayer("flatten", ("input_quant",), g),
                       WeightLayer("wide", "linear", ("flatten",), weight, wg, np.zeros(10, np.int32), g, None)],
                      "wide")
    with pytest.warns(export.InexactExportWarning, match="layer 'wide'.*24,394,160.*2\\*\\*24"):
        _, proto = _export(tmp_path, program)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["nnlab.inexact_layers"]) == {"wide": 784 * 127 * 245}
    _export(tmp_path, program, form="qdq")  # the qdq form makes no such promise


@pytest.mark.filterwarnings("error::nnlab.export.InexactExportWarning")
def test_signed_activations_in_the_exact_form(tmp_path, data, images):
    qmodel = quant.quantise_model(_net("dag"), data, weight_bits=8, act_bits=8)
    path, proto = _export(tmp_path, qmodel, signed_activations=True)
    assert {t.data_type for t in proto.graph.initializer if t.name.endswith("_zero_point")} == {onnx.TensorProto.INT8}
    c = export.compare(path, nna.compile_model(qmodel), images)
    assert c["identical_integers"] == 1.0 and c["max_logit_difference"] == 0.0, c


def test_the_file_stores_what_the_program_holds(tmp_path, data):
    qmodel = quant.quantise_model(_net("lenet5"), data, weight_bits=4, act_bits=8)
    program = nna.compile_model(qmodel)
    path, proto = _export(tmp_path, qmodel)
    table = export.weight_storage(path).set_index("tensor")
    inits = {t.name: t for t in proto.graph.initializer}
    for layer in program.weight_layers:
        row = table.loc[f"{layer.name}.weight_quantised"]
        assert row["type"] == "INT4" and row["shape"] == layer.weight.shape
        assert row["bytes"] == (layer.weight.size + 1) // 2  # two 4-bit integers a byte
        stored = onnx.numpy_helper.to_array(inits[f"{layer.name}.weight_quantised"]).astype(np.int64)
        np.testing.assert_array_equal(stored, layer.weight)  # the integers, zeros included, exactly
        assert row["zeros"] == np.count_nonzero(layer.weight == 0)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["nnlab.weight_bits"]) == {layer.name: 4 for layer in program.weight_layers}


@pytest.mark.parametrize("form", ["exact", "qdq"])
def test_pruned_zeros_stay_exact_zeros(tmp_path, data, form):
    net = _net("lenet5")
    with torch.no_grad():
        for m in (net.conv2, net.fc1):
            w = m.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    qmodel = quant.quantise_model(net, data, weight_bits=8, act_bits=8)
    path, proto = _export(tmp_path, qmodel, form=form)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("conv2", "fc1"):
        zeros = np.count_nonzero(inits[f"{name}.weight_quantised"] == 0)
        assert zeros >= 0.9 * inits[f"{name}.weight_quantised"].size - 1
    # Dequantised in ONNX Runtime, a zero integer is a zero weight.
    model = onnx.load(str(path))
    dequantised = next(n.output[0] for n in model.graph.node if n.input[0] == "fc1.weight_quantised")
    model.graph.output.append(onnx.helper.make_tensor_value_info(dequantised, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    w = sess.run([dequantised], {"input": np.zeros((1, 1, 28, 28), np.float32)})[0]
    np.testing.assert_array_equal(w == 0, inits["fc1.weight_quantised"] == 0)


@pytest.mark.filterwarnings("ignore::nnlab.export.InexactExportWarning")  # 12-bit grids: sums beyond 2**24
def test_weight_types_by_bit_depth_and_opset(tmp_path, data):
    net = _net("lenet5")
    for bits, opset, kind, low, high in [(3, 21, "INT4", -3, 3), (6, 21, "INT8", -31, 31), (4, 13, "INT8", -7, 7),
                                         (12, 21, "INT16", -2047, 2047)]:
        qmodel = quant.quantise_model(net, data, weight_bits=bits, act_bits=8)
        _, proto = _export(tmp_path, qmodel, opset=opset)
        inits = {t.name: t for t in proto.graph.initializer}
        t = inits["fc1.weight_quantised"]
        assert onnx.TensorProto.DataType.Name(t.data_type) == kind, (bits, opset)
        values = onnx.numpy_helper.to_array(t)
        assert low <= values.min() and values.max() <= high and values.max() == high, (bits, values.max())


def test_per_tensor_and_per_channel_scales(tmp_path, data):
    for granularity, shape in [("per_tensor", ()), ("per_channel", (120,))]:
        qmodel = quant.quantise_model(_net("lenet5"), data, weight_bits=8, act_bits=8, granularity=granularity)
        _, proto = _export(tmp_path, qmodel, form="qdq")
        scale = next(t for t in proto.graph.initializer if t.name == "fc1.weight_scale")
        assert tuple(scale.dims) == shape
        node = next(n for n in proto.graph.node if n.output[0] == "fc1.weight")
        assert [a.i for a in node.attribute if a.name == "axis"] == ([0] if shape else [])


@pytest.mark.parametrize("form", ["exact", "qdq"])
def test_narrow_grids_and_fused_clamps_become_clips(tmp_path, data, images, form):
    qmodel = quant.quantise_model(_net("dag"), data, weight_bits=8, act_bits=4)
    path, proto = _export(tmp_path, qmodel, form=form)
    ops = [n.op_type for n in proto.graph.node]
    assert "Clip" in ops  # a 4-bit grid inside a uint8 container
    c = export.compare(path, nna.compile_model(qmodel), images)
    assert c["layers"]["input_quant"]["identical"] == 1.0
    _, ints = export.run_onnx(path, images[:20], intermediates=True)
    assert max(int(v.max()) for v in ints.values()) <= 15  # never outside the 4-bit grid


@pytest.mark.parametrize("options", [{"bias": "int32"}, {"signed_activations": True}])
def test_other_qdq_storage_forms_compute_the_same(tmp_path, data, images, options):
    qmodel = quant.quantise_model(_net("dag"), data, weight_bits=8, act_bits=8)
    path, proto = _export(tmp_path, qmodel, form="qdq", **options)
    c = export.compare(path, nna.compile_model(qmodel), images)
    assert c["top1_agreement"] >= 0.99 and c["identical_integers"] >= 0.99, c
    if "bias" in options:
        assert any(t.name.endswith(".bias_quantised") and t.data_type == onnx.TensorProto.INT32
                   for t in proto.graph.initializer)
    else:
        assert {t.data_type for t in proto.graph.initializer if t.name.endswith("_zero_point")} == {
            onnx.TensorProto.INT8}


@pytest.mark.parametrize("form", ["exact", "qdq"])
def test_node_table_names_every_node(tmp_path, data, form):
    qmodel = quant.quantise_model(_net("dag"), data, weight_bits=8, act_bits=8)
    path, proto = _export(tmp_path, qmodel, form=form)
    table = export.node_table(path)
    assert len(table) == len(proto.graph.node)
    ops = set(table["op"])
    assert {"Conv", "Gemm", "Add", "Concat", "QuantizeLinear", "DequantizeLinear"} <= ops
    # The exact form sums an average pool's window with a Conv of ones and requantises as the simulator does.
    assert ("AveragePool" in ops) == (form == "qdq") and ("Cast" in ops) == (form == "exact")


# ----------------------------------------------------------------------------- refusals
def test_a_float_model_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="float model .*quantise it first"):
        export.to_onnx(_net("lenet5"), tmp_path / "float.onnx")
    assert not (tmp_path / "float.onnx").exists()


def test_an_operation_the_export_cannot_express_is_named(tmp_path, data):
    class Sigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(torch.sigmoid(torch.flatten(x, 1)))

    qmodel = quant.quantise_model(Sigmoid(), data, weight_bits=8, act_bits=None)
    with pytest.raises(graph.GraphError, match="sigmoid"):
        export.to_onnx(qmodel, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_a_pytorch_kernel_rounding_is_refused_in_the_qdq_form(tmp_path):
    # An average pool that keeps its input's grid and rounds as PyTorch's channels-last kernel does.
    g = quant.Grid(quant.QuantSpec(8, signed=False, symmetric=False), 0.02, 10)
    wg = quant.Grid(quant.QuantSpec(8, signed=True, symmetric=True, granularity="per_channel", ch_axis=0),
                    np.full(10, 0.01, np.float32), np.zeros(10, np.int64))
    layers = [InputLayer("input_quant", g, (1, 28, 28)),
              PoolLayer("pool", "avgpool2d", ("input_quant",), (2, 2), (2, 2), (0, 0), g, g, rounding="scaled"),
              FlattenLayer("flatten", ("pool",), g),
              WeightLayer("fc", "linear", ("flatten",), np.ones((10, 196), np.int32), wg, np.zeros(10, np.int32),
                          g, None)]
    with pytest.raises(ValueError, match="'pool' \\(avgpool2d\\).*cannot express"):
        export.to_onnx(Program(layers, "kept"), tmp_path / "bad.onnx", form="qdq")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("options,message", [
    ({"opset": 12}, "opset must be >= 13"),
    ({"bias": "int8"}, "bias must be one of"),
    ({"form": "integer"}, "form must be one of"),
    ({"bias": "int32"}, "bias='int32' applies to form='qdq'"),
    ({"signed_activations": "yes"}, "signed_activations"),
])
def test_bad_options_are_refused(tmp_path, data, options, message):
    qmodel = quant.quantise_model(_net("lenet5"), data, weight_bits=8, act_bits=8)
    with pytest.raises((ValueError, TypeError), match=message):
        export.to_onnx(qmodel, tmp_path / "m.onnx", **options)


@pytest.mark.filterwarnings("ignore::nnlab.export.InexactExportWarning")  # 12-bit grids: sums beyond 2**24
def test_wide_grids_need_opset_21(tmp_path, data):
    qmodel = quant.quantise_model(_net("lenet5"), data, weight_bits=8, act_bits=12)
    with pytest.raises(ValueError, match="12-bit integers.*opset=21"):
        export.to_onnx(qmodel, tmp_path / "m.onnx", opset=13)
    _export(tmp_path, qmodel)  # opset 21 stores them in 16 bits


def test_missing_onnx_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r'pip install "nnlab\[onnx\]"'):
        export.to_onnx(_net("lenet5"), tmp_path / "m.onnx")
