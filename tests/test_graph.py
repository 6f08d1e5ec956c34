"""The graph view of a model (nnlab.graph), the quantisers it places, and the Grid value."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import nnlab
from nnlab import graph, quant
from nnlab.models import LeNet5, summary
from nnlab.quant import Grid, QuantSpec


class Everything(nn.Module):
    """Every supported operation, in module and functional form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.max_pool2d(F.relu6(self.bn(self.conv(x))), 2)
        z = F.hardtanh(self.dw(y), 0.0, 4.0) + y
        w = F.avg_pool2d(torch.cat([z, y], 1), 2)
        w = F.adaptive_avg_pool2d(w, (1, 1)).mean((2, 3))
        w = torch.flatten(w.view(w.size(0), -1), 1)
        return self.fc(F.dropout(w, 0.1, training=False))


def test_every_node_is_classified_and_in_exactly_one_step():
    gm = graph.trace(Everything().eval())
    ops = graph.classify(gm)
    assert set(ops) == set(gm.graph.nodes)
    kinds = [op.kind for op in ops.values()]
    assert kinds == ["input", "conv2d", "batchnorm", "activation", "maxpool2d", "conv2d", "activation", "add", "cat",
                     "avgpool2d", "avgpool2d", "avgpool2d", "shape", "flatten", "flatten", "identity", "linear",
                     "output"]
    assert ops[next(n for n in gm.graph.nodes if n.name == "dw")].attrs == {
        "stride": (1, 1), "padding": (2, 2), "dilation": (2, 2), "groups": 4}
    steps = graph.fuse(ops)
    seen = [op.node for step in steps for op in step.ops]
    assert sorted(n.name for n in seen) == sorted(n.name for n in gm.graph.nodes) and len(seen) == len(set(seen))
    first = steps[1]  # conv + batch norm + ReLU6 + max pool: one layer of the NNA
    assert [op.name for op in first.ops] == ["conv", "bn", "relu6", "max_pool2d"]
    assert first.batchnorm.name == "bn" and first.activation == (0.0, 6.0) and first.maxpool.name == "max_pool2d"
    assert steps[2].activation == (0.0, 4.0)
    shapes = graph.node_shapes(gm, (1, 8, 8))
    assert shapes[next(n for n in gm.graph.nodes if n.name == "cat")] == (2, 8, 4, 4)


def test_trace_failure_names_the_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(Branchy()))
    with pytest.raises(graph.GraphError, match=r"cannot trace Sequential with torch.fx: in module '1.0' \(Branchy\)"):
        graph.trace(model)
    with pytest.raises(graph.GraphError, match="in module '1.0'"):
        quant.quantise_model(model, nnlab.data.load_data(train_limit=64, test_limit=64, verbose=False), 8, 8)
    with pytest.raises(TypeError, match="nn.Module"):
        graph.trace("lenet5")


@pytest.mark.parametrize("forward, pattern", [
    (lambda self, x: torch.sigmoid(self.conv(x)), r"node 'sigmoid' \(torch.sigmoid\) is not supported"),
    (lambda self, x: self.conv(x) * 2, r"node 'mul' \(operator.mul\) is not supported"),
    (lambda self, x: self.conv(x) + 1, r"node 'add' \(operator.add\) adds a constant"),
    (lambda self, x: torch.cat([self.conv(x), self.conv(x)], 0), r"concatenates along the batch \(dim=0\)"),
    (lambda self, x: self.conv(x).mean(1), r"node 'mean' \(method .mean\(\)\) averages over dims \(1,\)"),
    (lambda self, x: F.relu(x) + self.conv(x), r"node 'relu' \(torch.nn.functional.relu\) must directly follow"),
    (lambda self, x: F.conv2d(x, self.conv.weight), r"node 'conv_weight' \(attribute conv.weight\) uses a parameter"),
    (lambda self, x: F.max_pool2d(self.conv(x), 2, ceil_mode=True), r"uses ceil_mode=True"),
])
def test_unsupported_nodes_are_refused_with_their_name(forward, pattern):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

    Net.forward = forward
    with pytest.raises(graph.GraphError, match=pattern):
        gm = graph.trace(Net())
        ops = graph.classify(gm)
        graph.fuse(ops)
        nnlab.nna.compiler._Compiler(gm, ops, graph.node_shapes(gm, (1, 6, 6)), (1, 6, 6)).run(graph.fuse(ops))


def test_quantisers_sit_where_the_nna_stores_tensors():
    model = Everything().eval()
    data = nnlab.data.load_data(train_limit=64, test_limit=64, verbose=False)
    names = quant.act_quantiser_names(model)
    assert names == ["input_quant", "max_pool2d_quant", "hardtanh_quant", "add_quant", "cat_quant",
                     "avg_pool2d_quant", "adaptive_avg_pool2d_quant", "mean_quant"]
    q = quant.quantise_model(model, data, 8, 8, act_overrides={"cat_quant": 6})
    assert isinstance(q, torch.fx.GraphModule) and type(q).__name__ == "Everything"
    assert list(quant.act_quantisers(q)) == names
    specs = {n: a.spec for n, a in quant.act_quantisers(q).items()}
    assert specs["input_quant"] == QuantSpec.for_inputs(8)  # signed input: a zero point
    assert specs["max_pool2d_quant"] == QuantSpec.for_activations(8)  # after ReLU6: unsigned, zero point 0
    assert specs["hardtanh_quant"] == QuantSpec.for_activations(8)  # the depthwise conv's output, clamped to [0, 4]
    assert specs["add_quant"] == QuantSpec.for_activations(8)  # the sum of two non-negative tensors
    assert specs["cat_quant"] == QuantSpec.for_activations(6)
    # weights stay parametrizations on the model's own layers, under their names
    assert parametrize.is_parametrized(q.get_submodule("dw"), "weight") and q.get_submodule("dw").groups == 4
    assert not any(isinstance(m, quant.ActQuantiser) for m in model.modules())  # the float model is untouched
    # quantisers are where the graph says: the add's output is rounded before the concat reads it
    users = {n.target: [u.name for u in n.users] for n in q.graph.nodes if n.op == "call_module"}
    assert users["add_quant"] == ["cat"] and users["cat_quant"] == ["avg_pool2d"]
    # the compiled program runs the same operations, functional forms included
    program = nnlab.nna.compile_model(q)
    assert [layer.op for layer in program.layers] == [
        "quantise", "conv2d", "maxpool2d", "conv2d", "add", "concat", "avgpool2d", "avgpool2d", "avgpool2d",
        "flatten", "flatten", "flatten", "linear"]
    assert program.layer("dw").activation == (0.0, 4.0) and program.layer("conv").activation == (0.0, 6.0)
    assert nnlab.nna.agreement(program, q, data)["agreement"] >= 98
    # None leaves a place without quantiser
    fewer = quant.attach_quantisers(model, 8, 8, act_overrides={"mean_quant": None})
    assert "mean_quant" not in quant.act_quantisers(fewer)
    with pytest.raises(ValueError, match="act_overrides names layer 'relu_quant'.*'add_quant'"):
        quant.attach_quantisers(model, 8, 8, act_overrides={"relu_quant": 8})


def test_nested_names_state_dict_round_trip_and_wrappers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv1(x) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(Block(), Block()), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
    data = nnlab.data.load_data(train_limit=64, test_limit=64, verbose=False)
    q = quant.quantise_model(nn.DataParallel(model), data, 4, 8)  # a wrapper is unwrapped first
    assert isinstance(q.get_submodule("2.1.conv1"), nn.Conv2d)
    assert list(quant.act_quantisers(q)) == ["input_quant", "1_quant", "2_0_conv1_quant", "2_0_relu_quant",
                                             "2_1_conv1_quant", "2_1_relu_quant"]
    again = quant.attach_quantisers(model, 4, 8)
    again.load_state_dict(q.state_dict())  # same keys: the cached form of a quantised model loads back
    for a in quant.act_quantisers(again).values():
        a.calibrating = False
    x = next(iter(data.test))[0]
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    assert list(quant.act_quantisers(nn.DataParallel(q))) == list(quant.act_quantisers(q))
    assert quant.describe_quantisers(q)["name"].tolist()[:3] == ["input_quant", "0", "1_quant"]  # data-flow order


def test_summary_counts_from_the_graph():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.conv(x) + x, x], 1)

    table = summary(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Skip(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)),
                    (1, 8, 8))
    rows = table.set_index("layer")
    assert rows.loc["add", "type"] == "add" and rows.loc["add", "activations"] == 2 * 8 * 8
    assert rows.loc["cat", "output_shape"] == (4, 8, 8)
    assert rows.loc["1.conv", "macs"] == 2 * 8 * 8 * 2 * 9
    total = table.iloc[-1]
    assert total["macs"] == 2 * 64 * 9 + 2 * 64 * 18 + 256 * 3
    assert total["activations"] == 128 + 128 + 128 + 256 + 3  # convs, add, cat, linear; the flatten is free
    lenet = summary(LeNet5())
    assert lenet.iloc[-1]["macs"] == 416520 and list(lenet["layer"])[:3] == ["conv1", "relu1", "pool1"]


# ----------------------------------------------------------------------------- Grid
def test_grid_quantises_as_pytorch_does():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000).astype(np.float32) * 3
    grid = Grid(QuantSpec.for_inputs(8), 0.0173, 37)
    x[:1000] = (np.arange(1000) - 500.5).astype(np.float32) * np.float32(0.0173)  # ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_tensor(torch.tensor(x), 0.0173, 37, torch.quint8).int_repr().numpy()
    np.testing.assert_array_equal(grid.quantise(x), ref)
    wgrid = Grid(QuantSpec.for_weights(4), [0.1, 0.2, 0.05], [0, 0, 0])
    w = rng.standard_normal((3, 7)).astype(np.float32)
    codes = wgrid.quantise(w)
    assert codes.min() >= -7 and codes.max() <= 7
    np.testing.assert_allclose(wgrid.dequantise(codes), codes * np.array([[0.1], [0.2], [0.05]], np.float32))
    relu6 = Grid(QuantSpec.for_activations(8), 6.0 / 255, 0)
    assert relu6.clamp_range((0.0, None)) == (0, 255) and relu6.clamp_range((0.0, 3.0)) == (0, 128)
    assert grid.clamp_range((0.0, None)) == (37, 255) and grid.clamp_range(None) == (0, 255)


def test_grid_is_a_validated_frozen_value():
    spec = QuantSpec.for_inputs(6)
    g = Grid(spec, 0.5, 3)
    assert g == Grid(spec, np.float32(0.5), np.int64(3)) and hash(g) == hash(Grid(spec, 0.5, 3))
    assert g != g.replace(zero_point=4) and g != Grid(QuantSpec.for_inputs(8), 0.5, 3)
    assert Grid.from_dict(g.to_dict()) == g
    w = Grid(QuantSpec.for_weights(5), [0.1, 0.3], 0)
    assert Grid.from_dict(w.to_dict()) == w and w.channels == 2 and w.bits == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.scale = 1.0
    with pytest.raises(ValueError, match="read-only"):
        g.scale[...] = 1.0
    with pytest.raises(ValueError, match="positive and finite"):
        Grid(spec, 0.0, 0)
    with pytest.raises(ValueError, match=r"range 0\.\.63"):
        Grid(spec, 0.5, 64)
    with pytest.raises(ValueError, match="symmetric spec fixes the zero point at 0"):
        Grid(QuantSpec.for_activations(8), 0.5, 3)
    with pytest.raises(ValueError, match="per_channel grid needs one per channel"):
        Grid(QuantSpec.for_weights(4), 0.5, 0)
    with pytest.raises(ValueError, match="per_tensor grid needs one number"):
        Grid(spec, [0.5, 0.6], [0, 0])
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        Grid(8, 0.5, 0)
    with pytest.raises(TypeError, match="zero_point must hold integers"):
        Grid(spec, 0.5, 2.5)


def test_quantisers_return_their_grid():
    data = nnlab.data.load_data(train_limit=64, test_limit=64, verbose=False)
    torch.manual_seed(0)
    q = quant.attach_quantisers(LeNet5(), 5, 8)
    a = quant.act_quantisers(q)["pool1_quant"]
    with pytest.raises(ValueError, match="still calibrating"):
        a.grid()
    quant.calibrate(q, data, 1)
    g = a.grid()
    assert g.spec == a.spec and float(g.scale) == a.scale.item() and int(g.zero_point) == a.zero_point.item()
    wq = quant.weight_quantiser(q.get_submodule("conv2"))
    wg = wq.grid()
    assert wg.channels == 16 and np.array_equal(wg.scale, wq.scale.numpy())
    codes, _, _, _ = quant.quantised_weight(q.get_submodule("conv2"))
    np.testing.assert_array_equal(wg.quantise(q.get_submodule("conv2").weight.detach().numpy()), codes.numpy())
