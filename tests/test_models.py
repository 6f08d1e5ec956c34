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
