"""PyTorch's graph-mode (FX) int8 flow as the oracle: every integer of every layer, on the first 300 test images.

nnlab's networks of the shapes embedded inference ships (``mobilenet-mnist``: inverted residuals, depthwise
convolutions, ReLU6 and global average pooling; ``resnet-mnist``: BasicBlocks with projected shortcuts) and
LeNet-5 are trained with their quick-mode recipes on the offline digits (cached), converted with
``prepare_fx``/``convert_fx`` (x86 qconfig), compiled with ``compile_torch_int8`` and compared layer by layer with
PyTorch's ``int_repr()`` (the README gives the same comparison over all 1,000 test images).  Inputs beyond the calibrated range make fbgemm's AVX2 kernels saturate pair sums at
int16: the simulator emulates that, and must match those integers too.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnlab
from nnlab import graph, nna
from nnlab.nna import import_torch
from nnlab.nna.program import AddLayer, PoolLayer, WeightLayer
from nnlab.nna.verify import test_batches as first_batches

VNNI = import_torch._cpu_has_avx512_vnni()


#: nnlab's own networks of the shapes embedded inference ships, trained with their quick-mode recipes (cached)
NETWORKS = ("mobilenet-mnist", "resnet-mnist")


@pytest.fixture(scope="module")
def engine():
    before = torch.backends.quantized.engine
    yield "x86"
    torch.backends.quantized.engine = before


@pytest.fixture(scope="module")
def converted(data, engine):
    """name -> (float network, FX int8 model, program), each converted and compiled once."""
    nets = {name: nnlab.cache.pretrained(name, data=data, quick=True, verbose=False).eval()
            for name in (*NETWORKS, "lenet5")}
    out = {}
    for name, net in nets.items():
        qmodel = nna.quantise_torch_int8(net, data, calibration_batches=2, engine=engine, flow="fx")
        out[name] = (net, qmodel, nna.compile_torch_int8(qmodel))
    return out


def _assert_exact(table, program):
    assert list(table["layer"]) == [layer.name for layer in program.layers]  # every layer is compared
    assert (table["mismatches"] == 0).all(), table.to_string()
    assert table.attrs["total"] == 0


# ----------------------------------------------------------------------------- in range: every integer
def test_networks_learn(converted, data):
    for name in NETWORKS:
        assert nnlab.train.accuracy(converted[name][0], data) > 80, name  # far above chance: realistic activations


@pytest.mark.parametrize("name", [*NETWORKS, "lenet5"])
def test_fx_model_is_matched_exactly_in_every_layer(converted, data, name):
    _, qmodel, program = converted[name]
    table = nna.compare_torch_int8(program, qmodel, data, limit=300)
    assert table["values"].iloc[0] == 300 * 28 * 28  # every input value of 300 images
    _assert_exact(table, program)
    assert table.attrs["int16_saturations"] == 0  # in range, reduce_range keeps pair sums within int16


def test_programs_hold_the_operations_of_the_networks(converted):
    mobilenet, resnet = converted["mobilenet-mnist"][2], converted["resnet-mnist"][2]
    depthwise = [layer for layer in mobilenet.weight_layers if layer.groups > 1]
    assert len(depthwise) == 5 and all(layer.groups == layer.out_channels for layer in depthwise)
    for layer in depthwise:  # 3x3, multiples of 8 channels: fbgemm's depthwise kernel, AVX2 code on every CPU
        assert import_torch._fbgemm_depthwise(layer.groups, layer.groups, layer.out_channels, layer.weight.shape[2:],
                                          layer.stride, layer.padding, layer.dilation), layer.name
    if not VNNI:
        assert {layer.kernel for program in (mobilenet, resnet) for layer in program.weight_layers} == {"fbgemm_avx2"}
    assert sum(layer.activation == (0.0, 6.0) for layer in mobilenet.weight_layers) == 12  # ReLU6 fused as clamps
    assert sum(isinstance(layer, AddLayer) for layer in mobilenet.layers) == 3
    pools = [layer for layer in mobilenet.layers if isinstance(layer, PoolLayer)]
    assert [(p.op, p.rounding) for p in pools] == [("avgpool2d", "scaled")]  # a conv's channels-last output
    adds = [layer for layer in resnet.layers if isinstance(layer, AddLayer)]
    assert [a.activation for a in adds] == [(0.0, None)] * 3  # add_relu
    assert all(a.rounding == "qadd" for a in adds)
    assert resnet.layer("layer2.0.shortcut.conv").stride == (2, 2)
    # names are the model's own, and a fused clamp's node is recorded for the comparison
    _, nodes, _ = import_torch._import_torch_int8(converted["mobilenet-mnist"][1], (1, 28, 28), None)
    assert nodes["blocks.0.depthwise.conv"] == "blocks.0.depthwise.relu"


def test_eager_and_fx_lenet5_agree(converted, data, engine):
    net, fx_model, fx_program = converted["lenet5"]
    eager = nna.quantise_torch_int8(net, data, calibration_batches=2, engine=engine)
    eager_program = nna.compile_torch_int8(eager)
    _assert_exact(nna.compare_torch_int8(eager_program, eager, data, limit=500), eager_program)
    assert [layer.name for layer in eager_program.weight_layers] == [f"body.{layer.name}"
                                                                     for layer in fx_program.weight_layers]


# ----------------------------------------------------------------------------- beyond range: int16 saturation
@pytest.mark.parametrize("name", NETWORKS)
def test_saturation_beyond_the_calibrated_range_is_reproduced(converted, data, name):
    _, qmodel, program = converted[name]
    scaled = [(2 * x, y) for x, y in first_batches(data, 100)]  # twice the calibrated range
    table = nna.compare_torch_int8(program, qmodel, scaled)
    _assert_exact(table, program)
    if not VNNI:
        assert table.attrs["int16_saturations"] > 1000, table.to_string()
        # without the emulation (exact int32 sums) the first convolution already differs
        exact = nna.Program([dataclasses.replace(layer, kernel="fbgemm") if isinstance(layer, WeightLayer) else layer
                             for layer in program.layers], program.name, program.source)
        assert nna.compare_torch_int8(exact, qmodel, scaled).attrs["total"] > 1000


#: one network per fbgemm convolution path: im2col (3x3; the 3-channel stride-2 variant; dilated), 1x1 (plain GEMM),
#: the depthwise fast path (3x3 strided, 5x5), depthwise through im2col (12 channels), the grouped fast path, and
#: Linear layers (an odd and a long reduction)
LAYERS = {
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1), "conv3x3_rgb_s2": lambda: nn.Conv2d(3, 8, 3, 2, 1),
    "dilated": lambda: nn.Conv2d(5, 8, 3, padding=2, dilation=2), "pointwise": lambda: nn.Conv2d(16, 32, 1),
    "depthwise_s2": lambda: nn.Conv2d(16, 16, 3, 2, 1, groups=16),
    "depthwise5x5": lambda: nn.Conv2d(16, 16, 5, padding=2, groups=16),
    "depthwise12": lambda: nn.Conv2d(12, 12, 3, 1, 1, groups=12),
    "grouped4": lambda: nn.Conv2d(16, 16, 3, padding=1, groups=4),
    "linear7": lambda: nn.Linear(7, 5), "linear600": lambda: nn.Linear(600, 30),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_fbgemm_path_saturates_as_emulated(name, engine):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    shape = (layer.in_features,) if isinstance(layer, nn.Linear) else (layer.in_channels, 10, 10)
    labels = torch.zeros(32, dtype=torch.long)
    calibration = [(torch.rand(32, *shape), labels) for _ in range(2)]  # calibrated on [0, 1)
    qmodel = nna.quantise_torch_int8(nn.Sequential(layer).eval(), calibration, 2, engine=engine, flow="fx")
    program = nna.compile_torch_int8(qmodel, shape)
    beyond = [(4 * torch.rand(32, *shape), labels)]  # up to 4 times the range: raw inputs up to 255
    table = nna.compare_torch_int8(program, qmodel, beyond)
    _assert_exact(table, program)
    if not VNNI:
        assert program.weight_layers[0].kernel == "fbgemm_avx2"
        assert table.attrs["int16_saturations"] > 0
        exact = nna.Program([dataclasses.replace(lay, kernel="fbgemm") if isinstance(lay, WeightLayer) else lay
                             for lay in program.layers], program.name, program.source)
        assert nna.compare_torch_int8(exact, qmodel, beyond).attrs["total"] > 0


def test_pair_saturation_needs_inputs_above_127():
    spec = nnlab.quant.QuantSpec(8, signed=False, symmetric=False)
    grid = nnlab.quant.Grid(spec, 0.1, 0)
    wgrid = nnlab.quant.Grid(nnlab.quant.QuantSpec(8, signed=True, symmetric=True, granularity="per_channel",
                                                   ch_axis=0), np.ones(1, np.float32), np.zeros(1, np.int64))
    layer = WeightLayer("fc", "linear", ("in",), np.array([[-128, -128, 127]], np.int32), wgrid,
                        np.zeros(1, np.int32), grid, None, kernel="fbgemm_avx2")
    correction, count = nna.engine.int16_pair_saturation(np.array([[127], [127], [255]]), layer)
    assert correction is None and count == 0  # 127 * -128 * 2 = -32512 fits in int16
    correction, count = nna.engine.int16_pair_saturation(np.array([[200], [100], [255]]), layer)
    assert count == 1 and correction.tolist() == [[-32768 - (200 + 100) * -128]]  # pair (0, 1) saturates; 255*127 fits


def test_quantized_add_dequantises_with_a_fused_multiply_add():
    """quantized::add dequantises with fma(q, scale, -zero_point * scale): rounding "qadd", not "fake_quant"."""
    rng = np.random.default_rng(0)
    spec = nnlab.quant.QuantSpec(8, signed=False, symmetric=False)
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")  # every pair of codes: 65,536 = 1024 vectors
    a, b = a.reshape(1, 256, 16, 16), b.reshape(1, 256, 16, 16)
    differ = tried = 0
    while differ < 20 and tried < 2000:  # grids on which the two dequantisations round differently somewhere
        tried += 1
        ga, gb, go = (nnlab.quant.Grid(spec, float(rng.uniform(0.005, 0.2)), int(rng.integers(0, 128)))
                      for _ in range(3))
        ours = {r: nna.engine.channel_first(nna.engine.add(a.swapaxes(0, 1), b.swapaxes(0, 1),
                                                           AddLayer("add", ("a", "b"), (ga, gb), go, rounding=r)))
                for r in ("qadd", "fake_quant")}
        if np.array_equal(ours["qadd"], ours["fake_quant"]):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qa, qb = (torch._make_per_tensor_quantized_tensor(torch.tensor(c, dtype=torch.uint8), float(g.scale),
                                                              int(g.zero_point)) for c, g in ((a, ga), (b, gb)))
        ref = torch.ops.quantized.add(qa, qb, float(go.scale), int(go.zero_point)).int_repr().numpy()
        assert np.array_equal(ours["qadd"], ref)
        differ += int(np.count_nonzero(ours["fake_quant"] != ref))
    assert differ >= 20, tried  # the plain dequantisation would not do


# ----------------------------------------------------------------------------- refusals, names, eager adds
def test_onednn_models_are_refused(data, engine):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    qmodel = nna.quantise_torch_int8(net, data, 1, engine="onednn", flow="fx")
    with pytest.raises(ValueError, match="engine='onednn'.*AVX512-VNNI.*engine='x86'"):
        nna.compile_torch_int8(qmodel)
    with pytest.raises(ValueError, match="engine='onednn'"):
        nna.torch_conv_kernel("onednn")
    torch.backends.quantized.engine = engine


class MeanAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class PoolThenRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(F.max_pool2d(self.conv(x), 2)), 1))


class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.a(x) * self.b(x), 1), 1))


@pytest.mark.parametrize("build, match", [
    (MeanAfterConv, r"node 'mean' \(method \.mean\(\)\) averages a channels-last .*AdaptiveAvgPool2d"),
    (PoolThenRelu, r"node 'relu' .* clamps the output of 'max_pool2d'"),
    (Product, r"node 'mul.*' \(.*quantized\.mul\) is not supported; supported: .*quantize_per_tensor"),
])
def test_unsupported_nodes_are_refused_by_name(data, engine, build, match):
    torch.manual_seed(0)
    qmodel = nna.quantise_torch_int8(build().eval(), data, 1, engine=engine, flow="fx")
    with pytest.raises(graph.GraphError, match=match):
        nna.compile_torch_int8(qmodel)


class FunctionalBlock(nn.Module):
    """An eager-mode model that adds and concatenates with FloatFunctional, with a ReLU6 after the add."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv1, self.relu1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.skip, self.cat = torch.ao.nn.quantized.FloatFunctional(), torch.ao.nn.quantized.FloatFunctional()
        self.relu6, self.pool, self.fc = nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.conv1(self.quant(x)))
        y = self.relu6(self.skip.add(x, self.conv2(x)))
        return self.dequant(self.fc(torch.flatten(self.pool(self.cat.cat([y, x], 1)), 1)))


def test_eager_floatfunctional_add_and_cat_are_compiled(data, engine):
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    model = FunctionalBlock().eval()
    torch.ao.quantization.fuse_modules(model, [["conv1", "relu1"]], inplace=True)
    model.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare(model, inplace=True)
        for x, _ in first_batches(data, 128):
            model(x)
        torch.ao.quantization.convert(model, inplace=True)
    program = nna.compile_torch_int8(model)
    assert [layer.op for layer in program.layers] == ["quantise", "conv2d", "conv2d", "add", "concat", "avgpool2d",
                                                      "flatten", "linear"]
    assert program.layer("add").activation == (0.0, 6.0)
    table = nna.compare_torch_int8(program, model, data, limit=200)
    _assert_exact(table, program)
    assert table.set_index("layer").loc["add", "node"] == "relu6"


def test_layer_outputs_records_every_quantized_node(converted, data):
    _, qmodel, _ = converted["mobilenet-mnist"]
    x = next(iter(first_batches(data, 4)))[0]
    outs = nna.layer_outputs(qmodel, x)
    modules = [n.target for n in qmodel.graph.nodes if n.op == "call_module" and n.target != "flatten"]
    assert set(modules) <= set(outs)  # every quantized module (convert_fx flattens in float, between a
    assert "flatten" not in outs      # dequantize and a quantize_per_tensor)
    assert {"quantize_per_tensor", "stem.conv", "stem.relu", "add_3", "add_5", "pool", "fc"} <= set(outs)
    assert all(v.dtype == np.int64 and v.shape[0] == 4 for v in outs.values())


def test_bad_arguments_are_refused_by_name(converted, data):
    net, qmodel, _ = converted["resnet-mnist"]
    with pytest.raises(ValueError, match="flow"):
        nna.quantise_torch_int8(net, data, flow="graph")
    with pytest.raises(TypeError, match="nn.Sequential for flow='eager'.*flow='fx'"):
        nna.quantise_torch_int8(net, data)
    with pytest.raises(ValueError, match="quantizes nothing"):
        nna.compile_torch_int8(net)
    with pytest.raises(ValueError, match=r"node 'stem.conv' \(ConvReLU2d\) fails on inputs of shape \(3, 28, 28\)"):
        nna.compile_torch_int8(qmodel, (3, 28, 28))
    with pytest.raises(ValueError, match="not layers of qmodel"):
        nna.compare_torch_int8(converted["mobilenet-mnist"][2], qmodel, data, limit=10)
