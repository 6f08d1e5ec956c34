import pytest
import torch

from nnlab.models import LeNet5, LeNet300100, VGGSmall, build_model, summary, upgrade_state_dict


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    assert n_params(LeNet5()) == 61_706
    assert n_params(LeNet300100()) == 266_610
    # 3x3 convs without bias + BN (2 per channel) + classifier.
    v = VGGSmall()
    convs = 3 * 9 * 32 + 32 * 9 * 32 + 32 * 9 * 64 + 64 * 9 * 64 + 64 * 9 * 128 + 128 * 9 * 128
    bns = 2 * (32 + 32 + 64 + 64 + 128 + 128)
    assert n_params(v) == convs + bns + 128 * 4 * 4 * 10 + 10


@pytest.mark.parametrize("name,shape", [("lenet300", (1, 28, 28)), ("lenet5", (1, 28, 28)),
                                        ("vgg-mnist", (1, 28, 28)), ("vgg-cifar", (3, 32, 32))])
def test_forward_shapes(name, shape):
    m = build_model(name, num_classes=7)
    assert m(torch.zeros(2, *shape)).shape == (2, 7)


def test_summary_lenet5_macs_and_totals():
    t = summary(LeNet5(), (1, 28, 28))
    total = t.iloc[-1]
    assert total["layer"] == "total" and total["params"] == 61_706
    conv1 = t[t.layer == "conv1"].iloc[0]
    assert conv1["output_shape"] == (6, 28, 28)
    assert conv1["macs"] == 6 * 28 * 28 * 25 and conv1["params"] == 156
    fc1 = t[t.layer == "fc1"].iloc[0]
    assert fc1["macs"] == 400 * 120
    expected_macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert total["macs"] == expected_macs
    assert t.attrs["max_activations"] == 6 * 28 * 28


def test_summary_and_models_reject_bad_input():
    with pytest.raises(ValueError, match="input_shape must be positive integers"):
        summary(LeNet5(), (1, 0, 28))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        summary("lenet5")
    with pytest.raises(ValueError, match="name must be one of 'lenet300', 'lenet5'"):
        build_model("resnet1000")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        LeNet5(num_classes=0)


def test_summary_total_activations_skip_in_place_layers():
    t = summary(LeNet5(), (1, 28, 28))
    # conv1, pool1, conv2, pool2, fc1, fc2, fc3 write new tensors; ReLU and Flatten do not.
    assert t.iloc[-1]["activations"] == 4704 + 1176 + 1600 + 400 + 120 + 84 + 10


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg-mnist"])
def test_layers_have_names_and_numbered_weights_still_load(name):
    torch.manual_seed(0)
    net = build_model(name)
    names = [n for n, _ in net.named_children()]
    assert not any(n.isdigit() for n in names) and any(n.startswith("conv") or n.startswith("fc") for n in names)
    # Weights saved when the layers were numbered ("0.weight", "3.weight_mask" ...) load by position.
    numbered = {f"{names.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in net.state_dict().items()}
    assert all(k[0].isdigit() for k in numbered)
    other = build_model(name)
    other.load_state_dict(numbered)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert upgrade_state_dict(other, numbered).keys() == net.state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# The networks embedded inference ships: MobileNetV2-style, small ResNet, torchvision's resnet18 and mobilenet_v2.

import operator  # noqa: E402

import torch.fx  # noqa: E402
from torch import nn  # noqa: E402

from nnlab import cache  # noqa: E402
from nnlab.train import evaluate  # noqa: E402
from nnlab.models import (MODELS, BasicBlock, InvertedResidual, MobileNetV2Small, ResNetSmall,  # noqa: E402
                          data_kwargs, torchvision_model)

OWN = ["mobilenet-mnist", "mobilenet-cifar", "resnet-mnist", "resnet-cifar"]
TORCHVISION = ["torchvision:resnet18", "torchvision:mobilenet_v2"]
SHAPES = [(1, 28, 28), (3, 32, 32)]
ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
QUICK_TOP1_FLOOR = 80.0  # quick-mode mobilenet-mnist on the offline test split (95.6% when measured)


def nnlab_data(**kwargs):
    import nnlab.data
    return nnlab.data.load_data(verbose=False, **kwargs)


def _build(name, shape, seed=0, num_classes=10):
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes, **data_kwargs(name, shape))


def test_new_models_are_registered_with_data_kwargs():
    for name in OWN + TORCHVISION:
        assert name in MODELS
    assert data_kwargs("mobilenet-mnist", (1, 28, 28)) == {"in_channels": 1, "input_size": 28}
    assert data_kwargs("resnet-cifar", (3, 32, 32)) == {"in_channels": 3, "input_size": 32}
    assert data_kwargs("torchvision:resnet18", (1, 28, 28)) == {"in_channels": 1}
    # The older models keep the arguments their cached weights were trained with (the cache key includes them).
    assert data_kwargs("lenet300", (1, 28, 28)) == {}
    assert data_kwargs("lenet5", (1, 28, 28)) == {"in_channels": 1}
    assert data_kwargs("vgg-cifar", (3, 32, 32)) == {"in_channels": 3, "input_size": 32}


@pytest.mark.parametrize("name", OWN + TORCHVISION)
@pytest.mark.parametrize("shape", SHAPES)
def test_new_models_output_shapes(name, shape):
    net = _build(name, shape, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, *shape)).shape == (2, 7)
    if name in OWN:
        assert net.input_shape == shape


@pytest.mark.parametrize("name", OWN)
def test_own_models_trace_with_fx_to_the_same_outputs_and_only_supported_operations(name):
    shape = (1, 28, 28) if name.endswith("mnist") else (3, 32, 32)
    net = _build(name, shape).eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(traced(x), net(x))
    modules = dict(net.named_modules())
    adds = 0
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], ALLOWED), (node.target, type(modules[node.target]))
        elif node.op == "call_function":
            assert node.target is operator.add, node.target
            adds += 1
        else:
            assert node.op in ("placeholder", "output"), node.op
    residual = sum(1 for m in net.modules()
                   if isinstance(m, InvertedResidual) and m.use_residual or isinstance(m, BasicBlock))
    assert adds == residual > 0  # every residual add is in the graph
    assert {n.op for n in traced.graph.nodes} >= {"call_module", "call_function"}


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_trace_with_fx(name):
    net = _build(name, (1, 28, 28)).eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(traced(x), net(x))
    assert any(n.target is operator.add for n in traced.graph.nodes)


@pytest.mark.parametrize("name", ["mobilenet-mnist", "resnet-mnist", "torchvision:mobilenet_v2"])
def test_initialisation_is_deterministic_with_a_seed(name):
    a, b, c = _build(name, (1, 28, 28), seed=0), _build(name, (1, 28, 28), seed=0), _build(name, (1, 28, 28), seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_layer_names_a_student_recognises():
    mb = dict(build_model("mobilenet-mnist").named_modules())
    for name in ("stem.conv", "stem.bn", "stem.relu", "blocks.0.expand.conv", "blocks.0.depthwise.conv",
                 "blocks.0.project.conv", "blocks.0.project.bn", "head.conv", "pool", "flatten", "fc"):
        assert name in mb, name
    assert isinstance(mb["blocks.0.depthwise.relu"], nn.ReLU6) and "blocks.0.project.relu" not in mb
    assert mb["blocks.0.depthwise.conv"].groups == mb["blocks.0.depthwise.conv"].in_channels == 64
    rn = dict(build_model("resnet-mnist").named_modules())
    for name in ("stem.conv", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.relu2", "layer2.0.shortcut.conv",
                 "layer2.0.shortcut.bn", "layer3.0.conv2", "pool", "fc"):
        assert name in rn, name
    assert "layer1.0.shortcut.conv" not in rn  # same shape: the input itself is added
    assert len([m for m in rn.values() if isinstance(m, BasicBlock)]) == 3  # ResNet-8: one block per stage
    assert len([m for m in build_model("resnet-cifar").modules() if isinstance(m, BasicBlock)]) == 9  # ResNet-20


def test_inverted_residual_adds_only_when_the_shape_is_kept():
    torch.manual_seed(0)
    same, down, wider = InvertedResidual(8, 8, 1, 4).eval(), InvertedResidual(8, 8, 2, 4), InvertedResidual(8, 16, 1)
    assert same.use_residual and not down.use_residual and not wider.use_residual
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        branch = same.project(same.depthwise(same.expand(x)))
        assert torch.allclose(same(x), branch + x)
    flat = InvertedResidual(8, 8, 1, expand_ratio=1)
    assert flat.expand is None and flat.depthwise.conv.in_channels == 8


def test_summary_of_one_inverted_residual_block_counted_by_hand():
    t = summary(build_model("mobilenet-mnist"), (1, 28, 28)).set_index("layer")
    # blocks.0: 16 -> 64 -> 16 channels at 14x14 (the stem halved 28x28), stride 1.
    hw = 14 * 14
    expected = {  # layer: (params, MACs, output shape)
        "blocks.0.expand.conv": (16 * 64, hw * 64 * 16, (64, 14, 14)),
        "blocks.0.expand.bn": (2 * 64, 0, (64, 14, 14)),
        "blocks.0.depthwise.conv": (64 * 3 * 3, hw * 64 * 9, (64, 14, 14)),  # one 3x3 filter per channel
        "blocks.0.depthwise.bn": (2 * 64, 0, (64, 14, 14)),
        "blocks.0.project.conv": (64 * 16, hw * 16 * 64, (16, 14, 14)),
        "blocks.0.project.bn": (2 * 16, 0, (16, 14, 14)),
    }
    for layer, (params, macs, shape) in expected.items():
        assert (t.loc[layer, "params"], t.loc[layer, "macs"], t.loc[layer, "output_shape"]) == (params, macs, shape)
    assert t.loc["stem.conv", "output_shape"] == (16, 14, 14) and t.loc["head.conv", "output_shape"] == (128, 4, 4)
    assert t.loc["total", "params"] == n_params(build_model("mobilenet-mnist"))


def test_summary_of_resnet8_counted_by_hand():
    t = summary(build_model("resnet-mnist"), (1, 28, 28)).set_index("layer")
    # layer2.0: 16 -> 32 channels, stride 2: 28x28 -> 14x14, with a 1x1 conv + BN shortcut.
    assert t.loc["layer2.0.conv1", "params"] == 32 * 16 * 9
    assert t.loc["layer2.0.conv1", "macs"] == 14 * 14 * 32 * 16 * 9
    assert t.loc["layer2.0.conv2", "macs"] == 14 * 14 * 32 * 32 * 9
    assert t.loc["layer2.0.shortcut.conv", "macs"] == 14 * 14 * 32 * 16
    assert t.loc["layer2.0.shortcut.bn", "output_shape"] == (32, 14, 14)
    stem = 28 * 28 * 16 * 9
    layer1 = 2 * 28 * 28 * 16 * 16 * 9
    layer2 = 14 * 14 * 32 * (16 * 9 + 32 * 9 + 16)
    layer3 = 7 * 7 * 64 * (32 * 9 + 64 * 9 + 32)
    assert t.loc["total", "macs"] == stem + layer1 + layer2 + layer3 + 64 * 10
    convs = 16 * 9 + 2 * 16 * 16 * 9 + 32 * 16 * 9 + 32 * 32 * 9 + 16 * 32 + 64 * 32 * 9 + 64 * 64 * 9 + 32 * 64
    bns = 2 * (16 + 16 + 16 + 32 + 32 + 32 + 64 + 64 + 64)
    assert t.loc["total", "params"] == convs + bns + 64 * 10 + 10


def test_torchvision_models_are_adapted_as_users_do_it(no_network):
    torch.manual_seed(0)
    r = torchvision_model("resnet18", num_classes=10, in_channels=1)
    assert (r.conv1.in_channels, r.conv1.kernel_size, r.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(r.maxpool, nn.MaxPool2d) and r.fc.out_features == 10
    small = torchvision_model("resnet18", num_classes=10, in_channels=1, small_input=True)
    assert (small.conv1.kernel_size, small.conv1.stride) == ((3, 3), (1, 1)) and isinstance(small.maxpool, nn.Identity)
    m = torchvision_model("mobilenet_v2", num_classes=5, in_channels=1)
    assert (m.features[0][0].in_channels, m.features[0][0].stride) == (1, (2, 2)) and m.classifier[1].out_features == 5
    assert torchvision_model("mobilenet_v2", in_channels=1, small_input=True).features[0][0].stride == (1, 1)
    # The registered names: resnet18 keeps torchvision's stem, mobilenet_v2 gets the stride-1 stem.
    assert build_model("torchvision:resnet18", in_channels=1).conv1.stride == (2, 2)
    assert build_model("torchvision:mobilenet_v2", in_channels=1).features[0][0].stride == (1, 1)
    # With 3 channels and the standard stem, it is torchvision's model untouched.
    import torchvision
    torch.manual_seed(3)
    ours = torchvision_model("resnet18", num_classes=10).state_dict()
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_new_models_reject_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="width_mult must be in \\(0, inf\\], got 0.0"):
        MobileNetV2Small(width_mult=0)
    with pytest.raises(ValueError, match="width_mult must be a finite positive number, got inf"):
        MobileNetV2Small(width_mult=float("inf"))
    with pytest.raises(ValueError, match="stem_stride must be one of 1, 2; got 3"):
        MobileNetV2Small(stem_stride=3)
    with pytest.raises(ValueError, match="input_size must be >= 8 .* got 7"):
        MobileNetV2Small(input_size=7)
    with pytest.raises(TypeError, match="in_channels must be a positive integer"):
        MobileNetV2Small(in_channels=1.5)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2 .* got 9"):
        ResNetSmall(depth=9)
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        ResNetSmall(width=0)
    with pytest.raises(ValueError, match="input_size must be >= 4 .* got 3"):
        ResNetSmall(input_size=3)
    with pytest.raises(ValueError, match="stride must be one of 1, 2; got 3"):
        BasicBlock(4, 4, stride=3)
    with pytest.raises(ValueError, match="expand_ratio must be a positive integer, got 0"):
        InvertedResidual(4, 4, expand_ratio=0)
    with pytest.raises(ValueError, match="arch must be one of 'resnet18', 'mobilenet_v2'; got 'vgg16'"):
        torchvision_model("vgg16")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        torchvision_model("resnet18", num_classes=0)
    with pytest.raises(TypeError, match="small_input must be True or False, got 'yes'"):
        torchvision_model("resnet18", small_input="yes")
    with pytest.raises(ValueError, match="input_shape must be three positive integers"):
        data_kwargs("resnet-mnist", (28, 28))
    with pytest.raises(ValueError, match="input_shape must be square for 'resnet-mnist'"):
        data_kwargs("resnet-mnist", (1, 28, 32))
    with pytest.raises(ValueError, match="name must be one of"):
        data_kwargs("resnet1000", (1, 28, 28))


def test_pretrained_new_model_round_trips_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    a = cache.pretrained("mobilenet-mnist", quick=True, verbose=False)
    files = list((tmp_path / "models").glob("mobilenet-mnist-mnist-offline-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = cache.pretrained("mobilenet-mnist", quick=True, verbose=False)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(b, MobileNetV2Small) and not b.training
    assert a.nnlab_metrics == b.nnlab_metrics and b.nnlab_metrics["top1"] > QUICK_TOP1_FLOOR
    data = nnlab_data()
    assert abs(evaluate(b, data)["top1"] - b.nnlab_metrics["top1"]) < 1e-9  # the cached figure is this model's


def test_torchvision_names_make_portable_cache_files(tmp_path, monkeypatch):
    # A ':' is not allowed in Windows file names: the cache file uses '-'.
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    data = nnlab_data(train_limit=64, test_limit=64)
    net = cache.pretrained("torchvision:mobilenet_v2", data=data, quick=True, verbose=False)
    (path,) = (tmp_path / "models").glob("*.pt")
    assert path.name.startswith("torchvision-mobilenet_v2-mnist-offline-") and ":" not in path.name
    assert net.features[0][0].in_channels == 1


def test_cache_key_covers_the_registered_architecture(tmp_path, monkeypatch):
    # A stem's stride changes no weight shape: only the key can tell the two networks apart.
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    data = nnlab_data(train_limit=64, test_limit=64)
    a = cache.pretrained("mobilenet-mnist", data=data, quick=True, verbose=False)
    cls, defaults = MODELS["mobilenet-mnist"]
    monkeypatch.setitem(MODELS, "mobilenet-mnist", (cls, {**defaults, "stem_stride": 1}))
    b = cache.pretrained("mobilenet-mnist", data=data, quick=True, verbose=False)
    assert len(list((tmp_path / "models").glob("mobilenet-mnist-*.pt"))) == 2
    assert a.stem.conv.stride == (2, 2) and b.stem.conv.stride == (1, 1)
