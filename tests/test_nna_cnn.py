"""Any CNN, end to end: residual, own-forward, depthwise-separable, concat and average-pool networks on the NNA.

Each small network is trained briefly on the offline digits (cached), quantised with nnlab.quant, compiled,
and run by the simulator over the 1,000 test images: its top-1 answers must agree with the fake-quantised
PyTorch model's.  The engine's add, concat and average pools are checked against PyTorch's quantized kernels.
"""

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnlab
from nnlab import nna, quant
from nnlab.nna import engine
from nnlab.nna.program import AddLayer, ConcatLayer, PoolLayer
from nnlab.quant import Grid, QuantSpec


# ----------------------------------------------------------------------------- the networks
class Residual(nn.Module):
    """``y = conv(x) + x``."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def residual_net():
    """A residual block inside an nn.Sequential (its child list alone would miss the add)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), Residual(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 10))


class OwnForward(nn.Sequential):
    """An nn.Sequential subclass whose forward is not its child list: a skip, a functional pool, torch.flatten."""

    def __init__(self):
        super().__init__(OrderedDict(conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(16, 16, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(16),
                                     relu2=nn.ReLU(), fc=nn.Linear(16 * 7 * 7, 10)))

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 7), 1))


def depthwise_net():
    """Depthwise-separable blocks (one dilated, one strided) with batch norm, ReLU6 and global average pooling."""
    def block(cin, cout, stride, dilation=1):
        return [nn.Conv2d(cin, cin, 3, stride=stride, padding=dilation, dilation=dilation, groups=cin, bias=False),
                nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                         *block(16, 32, 1), *block(32, 32, 2, dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


class Branches(nn.Module):
    """Two convolutions side by side, concatenated along the channels."""

    def __init__(self, channels):
        super().__init__()
        self.a = nn.Conv2d(channels, 8, 1)
        self.b = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)


def concat_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), Branches(8), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def avgpool_net():
    """LeNet-5 with average pooling: the fake-quantised model must round the mean where the NNA does."""
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


#: name -> (builder, epochs, learning rate, program ops the compiled network must contain)
NETWORKS = {
    "residual": (residual_net, 1, 3e-3, {"add"}),
    "own_forward": (OwnForward, 1, 3e-3, {"add", "avgpool2d"}),
    "depthwise": (depthwise_net, 2, 1e-2, {"avgpool2d"}),
    "concat": (concat_net, 1, 3e-3, {"concat"}),
    "avgpool": (avgpool_net, 1, 3e-3, {"avgpool2d"}),
}


@pytest.fixture(scope="module")
def trained(data):
    """Each network trained briefly, once (nnlab.cache.cached), then loaded."""
    nets = {}
    for name, (build, epochs, lr, _) in NETWORKS.items():
        def fit():
            torch.manual_seed(0)
            net = build()
            nnlab.train.fit(net, data, epochs, optimizer="adam", lr=lr, seed=0, progress=False)
            return {"state_dict": net.state_dict()}

        spec = {"test_network": name, "epochs": epochs, "lr": lr, "data": data.fingerprint, "seed": 0, "version": 1}
        payload = nnlab.cache.cached(f"test-cnn-{name}", spec, fit, validate=lambda p: build().load_state_dict(
            p["state_dict"]), verbose=False)
        net = build()
        net.load_state_dict(payload["state_dict"])
        nets[name] = net.eval()
    return nets


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", list(NETWORKS))
def test_trained_networks_learn(trained, data, name):
    assert nnlab.train.accuracy(trained[name], data) > 70  # far above chance (10%): the agreement below means something


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("weight_bits", [8, 5, 4])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_program_agrees_with_fake_quant_model(trained, data, name, weight_bits, act_bits):
    qmodel = quant.quantise_model(trained[name], data, weight_bits, act_bits)
    program = nna.compile_model(qmodel, data.input_shape)
    ops = {layer.op for layer in program.layers}
    assert NETWORKS[name][3] <= ops, ops  # the add, concat or average pool is really there
    result = nna.agreement(program, qmodel, data)
    assert result["n"] == 1000
    assert result["agreement"] >= 99.5, result
    assert abs(result["accuracy_nna"] - result["accuracy_torch"]) <= 0.3, result


def test_residual_add_reads_the_skip(trained, data):
    qmodel = quant.quantise_model(trained["residual"], data, 8, 8)
    # after conv 0 + ReLU 1 + max pool 2; after the residual's conv; after the add + ReLU 4 + max pool 5
    assert list(quant.act_quantisers(qmodel)) == ["input_quant", "2_quant", "3_conv_quant", "5_quant"]
    program = nna.compile_model(qmodel)
    add = program.layer("add")
    assert add.inputs == ("3.conv", "2")  # the convolution and the skip (the max pool's output before it)
    assert add.activation == (0.0, None)  # the ReLU after the add is a clamp of its output
    assert program.layer("5").inputs == ("add",)
    assert add.in_grids[0].zero_point != 0 and add.in_grids[1].zero_point == 0  # a conv without ReLU is signed


def test_depthwise_and_avgpool_programs(trained, data):
    program = nna.compile_model(quant.quantise_model(trained["depthwise"], data, 4, 8))
    convs = program.weight_layers[:-1]
    assert [c.groups for c in convs] == [1, 16, 1, 32, 1]
    assert convs[3].dilation == (2, 2) and convs[3].stride == (2, 2)
    assert all(c.activation == (0.0, 6.0) for c in convs)  # ReLU6 as a clamp
    gap = program.layer("15")
    assert gap.op == "avgpool2d" and gap.kernel_size == (7, 7) and gap.rounding == "requantise"
    assert gap.in_grid != gap.out_grid  # the mean is rounded onto its own grid, as in the fake-quantised model
    table = nna.report(program)
    macs = nnlab.models.summary(trained["depthwise"], data.input_shape).iloc[-1]["macs"]
    assert table.iloc[-1]["macs_dense"] == macs  # the report counts the MACs the graph has


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiles_where_the_model_is(trained, data, device):
    """A quantised model on a GPU compiles to the same program (the compiler traces and measures it there)."""
    qmodel = quant.quantise_model(trained["own_forward"], data, 5, 8)
    program = nna.compile_model(qmodel)
    moved = copy.deepcopy(qmodel).to(device)
    assert nna.compile_model(moved) == program
    assert nnlab.models.summary(moved, data.input_shape).iloc[-1]["macs"] == nna.report(program).iloc[-1]["macs_dense"]


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_graph_programs_save_and_load(trained, data, name, tmp_path):
    program = nna.compile_model(quant.quantise_model(trained[name], data, 5, 8), name=name)
    info = nna.save(program, tmp_path / "p.nna")
    assert nna.load(tmp_path / "p.nna") == program
    assert info["storage_bytes"] == nna.storage_bytes(program)
    (tmp_path / "old.nna").write_bytes(b"NNA1" + (tmp_path / "p.nna").read_bytes()[4:])
    with pytest.raises(ValueError, match="format 1, which this nnlab does not read"):
        nna.load(tmp_path / "old.nna")


def test_unsupported_nodes_are_named(data):
    class Sigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.sigmoid(self.conv(x)).flatten(1)

    class Double(Sigmoid):
        def forward(self, x):
            return (self.conv(x) * 2).flatten(1)

    for net, pattern in ((Sigmoid(), r"node 'sigmoid' \(torch.sigmoid\) is not supported"),
                         (Double(), r"node 'mul' \(operator.mul\) is not supported"),
                         (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten()),
                          r"node '1' \(Tanh\) is not supported")):
        with pytest.raises(nnlab.graph.GraphError, match=pattern + "; supported: Conv2d"):
            quant.quantise_model(net, data, 8, 8)
        with pytest.raises(nnlab.graph.GraphError, match=pattern):
            nna.compile_model(quant.quantise_model(net, data, 8, None))


# ----------------------------------------------------------------------------- the engine against PyTorch's kernels
def _grid(scale, zero_point):
    return Grid(QuantSpec(8, signed=False, symmetric=False), scale, zero_point)


def _qtensor(codes, grid, channels_last=False):
    """A quint8 PyTorch tensor holding exactly ``codes`` on ``grid``."""
    real = torch.tensor(grid.dequantise(codes), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is announced as deprecated
        q = torch.quantize_per_tensor(real, float(grid.scale), int(grid.zero_point), torch.quint8)
    assert np.array_equal(q.int_repr().numpy(), codes)
    return q.contiguous(memory_format=torch.channels_last) if channels_last else q


def _cnhw(codes):
    return np.ascontiguousarray(codes.swapaxes(0, 1))


def test_add_and_concat_match_pytorch_quantized_kernels():
    rng = np.random.default_rng(0)
    mismatches = values = 0
    for _ in range(30):
        ga, gb, go = (_grid(float(rng.uniform(1e-3, 0.1)), int(rng.integers(0, 256))) for _ in range(3))
        shape = (2, 3, int(rng.integers(1, 12)), int(rng.integers(1, 12)))  # odd sizes: vector tails too
        a, b = rng.integers(0, 256, shape), rng.integers(0, 256, shape)
        for relu in (False, True):
            op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
            ref = op(_qtensor(a, ga), _qtensor(b, gb), float(go.scale), int(go.zero_point)).int_repr().numpy()
            layer = AddLayer("add", ("a", "b"), (ga, gb), go, (0.0, None) if relu else None)
            ours = engine.channel_first(engine.add(_cnhw(a), _cnhw(b), layer, "torch"))
            mismatches += int(np.count_nonzero(ours != ref))
            values += ref.size
        c = rng.integers(0, 256, (2, 5) + shape[2:])
        ref = torch.ops.quantized.cat([_qtensor(a, ga), _qtensor(c, gb)], 1, float(go.scale),
                                      int(go.zero_point)).int_repr().numpy()
        layer = ConcatLayer("cat", ("a", "c"), (ga, gb), go)
        ours = engine.channel_first(engine.concat([_cnhw(a), _cnhw(c)], layer, "torch"))
        mismatches += int(np.count_nonzero(ours != ref))
        values += ref.size
    assert values > 10000 and mismatches == 0


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                     ((3, 10), (3, 10), (0, 0)), ((5, 6), (2, 3), (2, 3))])
def test_average_pools_match_pytorch_quantized_kernels(kernel, stride, padding):
    """Each of PyTorch's quantized average pools, on either memory layout, to the integer."""
    rng = np.random.default_rng(1)
    mismatches, values, outputs = {}, 0, {}
    for _ in range(12):
        grid = _grid(float(rng.uniform(1e-3, 0.1)), int(rng.integers(0, 256)))
        h, w = 2 * kernel[0] + padding[0] + 1, 2 * kernel[1] + padding[1] + 1
        codes = rng.integers(0, 256, (2, 13, h, w))  # 13 channels: vector lanes and a scalar tail
        cases = {"scaled": [(True, lambda x: F.avg_pool2d(x, kernel, stride, padding), kernel, stride, padding),
                            (True, lambda x: F.adaptive_avg_pool2d(x, 1), (h, w), (h, w), (0, 0))],
                 "scaled_zp": [(False, lambda x: F.avg_pool2d(x, kernel, stride, padding), kernel, stride, padding)],
                 "raw_scaled": [(False, lambda x: F.adaptive_avg_pool2d(x, 1), (h, w), (h, w), (0, 0))],
                 "raw": [(False, lambda x: x.mean((2, 3), keepdim=True), (h, w), (h, w), (0, 0))]}
        for rounding, runs in cases.items():
            for channels_last, op, k, s, p in runs:
                ref = op(_qtensor(codes, grid, channels_last)).int_repr().numpy()
                layer = PoolLayer("p", "avgpool2d", ("x",), k, s, p, grid, grid, rounding=rounding)
                for mode in nna.MODES:
                    ours = engine.channel_first(engine.avgpool2d(_cnhw(codes), layer, mode))
                    mismatches[rounding] = mismatches.get(rounding, 0) + int(np.count_nonzero(ours != ref))
                    values += ref.size
                if k == kernel:
                    outputs.setdefault(rounding, []).append(ours)
    assert values > 5000 and not any(mismatches.values()), mismatches
    # the kernels really differ (at ties, which an even window size makes): one formula would not do
    differ = np.count_nonzero(np.concatenate(outputs["scaled"]) != np.concatenate(outputs["scaled_zp"]))
    assert differ > 0 or kernel[0] * kernel[1] % 2 == 1


def test_grouped_dilated_strided_convolution_sums_are_exact():
    rng = np.random.default_rng(2)
    for groups, dilation, stride, padding in ((1, 2, 1, 2), (4, 1, 2, 1), (8, 2, 2, 3)):
        q = rng.integers(0, 256, (2, 8, 11, 9))
        w = rng.integers(-7, 8, (8, 8 // groups, 3, 3))
        layer = nna.WeightLayer(
            "w", "conv2d", ("in",), w.astype(np.int32),
            Grid(QuantSpec.for_weights(4), np.full(8, 0.1), np.zeros(8, int)), np.zeros(8, np.int32), _grid(0.1, 5),
            None, stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation), groups=groups)
        acc = engine.channel_first(engine.conv2d(_cnhw(q), layer))
        ref = F.conv2d(torch.tensor(q - 5, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                       stride=stride, padding=padding, dilation=dilation, groups=groups).numpy()
        np.testing.assert_array_equal(acc, ref)


def test_last_convolution_feeds_the_output_through_a_flatten(data):
    """A fully convolutional classifier: the last layer's int32 sums reach the output through a reshape."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 2, 3), nn.Flatten())
    qmodel = quant.quantise_model(net.eval(), data, 8, 8)
    program = nna.compile_model(qmodel)
    assert [layer.op for layer in program.layers] == ["quantise", "conv2d", "maxpool2d", "conv2d", "flatten"]
    assert program.output.out_grid is None and nna.describe(program)["out_bits"].tolist()[-1] == 32
    x = next(iter(data.test))[0][:64]
    with torch.no_grad():
        expect = qmodel(x).numpy()  # (64, 2 * 5 * 5): channel-major features, each channel on its own scale
    np.testing.assert_allclose(nna.run(program, x).logits, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_channels_cored_to_zero_keep_their_bias(trained, data):
    """Coring can empty whole channels (MobileNetV2's classifier rows at 90% global coring): the bias still fits.

    An empty channel's quantiser gives it the smallest scale allowed; on the accumulator's scale its bias would
    not fit in int32.  The compiler gives it the layer's largest scale instead, and the program still computes
    the fake-quantised network.
    """
    net = copy.deepcopy(trained["residual"])
    with torch.no_grad():
        net[0].weight[:3] = 0.0   # three convolution channels: only their biases remain
        net[0].bias[:3] = torch.tensor([0.5, -0.25, 2.0])
        net[-1].weight[2] = 0.0   # one class row of the classifier
        net[-1].bias[2] = 5.0
    qmodel = quant.quantise_model(net, data, 8, 8)
    program = nna.compile_model(qmodel, data.input_shape)
    conv, fc = (next(layer for layer in program.layers if layer.name == n) for n in ("0", "7"))
    assert not conv.weight[:3].any() and not fc.weight[2].any()
    assert np.all(conv.weight_grid.scale[:3] == conv.weight_grid.scale.max())
    assert fc.weight_grid.scale[2] == fc.weight_grid.scale.max()
    assert np.all(np.abs(fc.bias.astype(np.int64)) < 2 ** 31 - 1)
    result = nna.agreement(program, qmodel, data)
    assert result["agreement"] >= 99.5, result
    x = next(iter(data.test))[0][:64]
    with torch.no_grad():
        expect = qmodel(x).numpy()
    # the emptied class's logit is its bias alone, on the output grid, in both
    np.testing.assert_allclose(nna.run(program, x).logits[:, 2], expect[:, 2], atol=1e-4)
