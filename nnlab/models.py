"""The candidate models of the course, and a per-layer summary table.

* :class:`LeNet300100`: the multilayer perceptron of LeCun et al. (1998),
  784-300-100-10 (266,610 parameters).
* :class:`LeNet5`: the classic LeNet-5 convolutional network (61,706
  parameters for 10 classes), with ReLU and max pooling, the form that
  integer accelerators run.
* :class:`VGGSmall`: a small VGG-style CNN (3x3 convolutions, batch norm,
  max pooling) for 32x32 colour images; ``in_channels`` and ``input_size``
  let it run on 28x28 digits too.

All are ordinary ``nn.Sequential`` subclasses whose layers have the names a
student would give them: ``conv1``, ``relu1``, ``pool1`` ... ``fc1`` ...
``fc3`` (``model.conv1``, ``model.get_submodule("fc3")``; ``model[0]`` still
works).  Every table, plot and report shows these names.  Weights saved
before the layers had names (keys ``"0.weight"``, ``"3.bias"`` ...) still load:
:class:`NamedSequential` renames the keys by position.

The networks embedded inference ships, small enough to train on a laptop CPU:

* :class:`MobileNetV2Small`: a MobileNetV2-style network (Sandler et al.,
  2018): a stem convolution, inverted residual blocks (1x1 expansion,
  3x3 depthwise convolution, 1x1 linear projection, a residual add when the
  shape allows it), ReLU6, a final 1x1 convolution, global average pooling
  and a linear classifier.
* :class:`ResNetSmall`: a ResNet-8/14/20 in the style of He et al. (2016)
  for small images: a stem convolution, three stages of basic residual
  blocks, global average pooling and a linear classifier.
* :func:`torchvision_model`: torchvision's ``resnet18`` and ``mobilenet_v2``
  (no pretrained weights, nothing downloaded), adapted to a data set's
  input channels and classes as torchvision users do it.

Their layer names read like the papers' figures: ``stem.conv``,
``blocks.0.expand.conv``, ``blocks.0.depthwise.conv``,
``blocks.0.project.conv``, ``layer1.0.conv1``, ``layer2.0.shortcut.conv``,
``fc``.  They are built only from ``Conv2d``, ``BatchNorm2d``, ``ReLU``,
``ReLU6``, ``AdaptiveAvgPool2d``, ``Flatten``, ``Linear`` and ``+``, and their
``forward`` has no data-dependent Python branches, so
``torch.fx.symbolic_trace`` captures their whole data flow, residual adds
included.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections import OrderedDict

import pandas as pd
import torch
from torch import nn

from . import graph
from ._args import check_choice, check_float, check_positive_int
from ._catalogue import FACTORY_FORM, parse_model_argument

__all__ = ["NamedSequential", "LeNet300100", "LeNet5", "VGGSmall", "ConvBN", "InvertedResidual",
           "MobileNetV2Small", "BasicBlock", "ResNetSmall", "TORCHVISION_MODELS", "torchvision_model", "MODELS",
           "build_model", "data_kwargs", "from_factory", "summary", "upgrade_state_dict"]

_POSITIONAL_KEY = re.compile(r"^(\d+)(_quant)?(\..*)$")


def upgrade_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """Rename positional keys (``"0.weight"``, ``"3.weight_mask"``) to ``model``'s layer names.

    Weights saved when the zoo models' layers were numbered load into the
    named layers: child ``i`` of the ``nn.Sequential`` gets key prefix
    ``"<name of child i>."``.  Keys that already use names pass unchanged.

    Args:
        model: a :class:`NamedSequential` (any other model: returned as is).
        state_dict: the saved weights.

    Returns:
        A state dict with the model's names.
    """
    if not isinstance(model, NamedSequential):
        return state_dict
    names = list(model._modules)
    if any(not n.isdigit() for n in names) and all(not k[:1].isdigit() for k in state_dict):
        return state_dict
    out = OrderedDict()
    for key, value in state_dict.items():
        m = _POSITIONAL_KEY.match(key)
        if m and int(m.group(1)) < len(names) and m.group(1) not in model._modules:
            key = names[int(m.group(1))] + (m.group(2) or "") + m.group(3)
        out[key] = value
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata
    return out


class NamedSequential(nn.Sequential):
    """An ``nn.Sequential`` built from ``(name, layer)`` pairs that also loads weights saved with numbered keys."""

    def __init__(self, *layers):
        super().__init__(OrderedDict(layers))
        self._register_load_state_dict_pre_hook(self._upgrade_keys, with_module=True)

    @staticmethod
    def _upgrade_keys(module, state_dict, prefix, *args):
        if prefix:  # nested inside another model: its own keys carry the prefix
            return
        upgraded = upgrade_state_dict(module, dict(state_dict))
        if list(upgraded) != list(state_dict):
            state_dict.clear()
            state_dict.update(upgraded)


class LeNet300100(NamedSequential):
    """Multilayer perceptron 784-300-100-10 for 28x28 grey images: ``flatten, fc1, relu1, fc2, relu2, fc3``."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        check_positive_int("num_classes", num_classes)
        super().__init__(
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, 300)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(100, num_classes)),
        )


class LeNet5(NamedSequential):
    """LeNet-5 for 28x28 grey images: conv(6, 5x5, pad 2) - pool - conv(16, 5x5) - pool - 120 - 84 - classes.

    Layers: ``conv1, relu1, pool1, conv2, relu2, pool2, flatten, fc1, relu3, fc2, relu4, fc3``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        super().__init__(
            ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(84, num_classes)),
        )


class VGGSmall(NamedSequential):
    """A small VGG-style CNN: three stages of two 3x3 conv + BN + ReLU, each followed by 2x2 max pooling.

    Layers: ``conv1, bn1, relu1, conv2, bn2, relu2, pool1, conv3 ... pool3, flatten, fc``.

    Args:
        num_classes: output classes.
        in_channels: 3 for colour images, 1 for digits.
        width: channels of the first stage; the next stages use 2x and 4x.
        input_size: image height/width (32 for CIFAR-10, 28 for MNIST).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, input_size: int = 32):
        for name, val in (("num_classes", num_classes), ("in_channels", in_channels),
                          ("width", width), ("input_size", input_size)):
            check_positive_int(name, val)
        if input_size < 8:
            raise ValueError(f"input_size must be >= 8 (three 2x2 poolings), got {input_size}")
        layers, c_in, k = [], in_channels, 0
        for stage, c_out in enumerate((width, 2 * width, 4 * width), start=1):
            for _ in range(2):
                k += 1
                layers += [(f"conv{k}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
                           (f"bn{k}", nn.BatchNorm2d(c_out)), (f"relu{k}", nn.ReLU())]
                c_in = c_out
            layers.append((f"pool{stage}", nn.MaxPool2d(2)))
        side = input_size // 8
        layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(c_in * side * side, num_classes))]
        super().__init__(*layers)


def _init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convolutions (fan-out), BN scale 1 and shift 0, small classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``, never 10% below ``value``).

    The rule of MobileNetV2 and torchvision: accelerators work on channels in
    groups of 8.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _check_input_size(input_size, halvings: int) -> int:
    input_size = check_positive_int("input_size", input_size)
    if input_size < 2 ** halvings:
        raise ValueError(f"input_size must be >= {2 ** halvings} (the network halves the image {halvings} times), "
                         f"got {input_size}")
    return input_size


class ConvBN(nn.Sequential):
    """Convolution without bias, batch norm and, optionally, an activation: children ``conv``, ``bn`` (``relu``).

    The padding keeps the image size (``kernel_size // 2``), so a stride of 2
    halves it (rounding up).

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: 1 or 3 (any odd size).
        stride: 1 or 2.
        groups: ``in_channels`` for a depthwise convolution (one filter per channel).
        activation: ``nn.ReLU``, ``nn.ReLU6`` or None (a linear layer, as the
            projection of an inverted residual block).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU):
        layers = [("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                                     groups=groups, bias=False)),
                  ("bn", nn.BatchNorm2d(out_channels))]
        if activation is not None:
            layers.append(("relu", activation()))
        super().__init__(OrderedDict(layers))


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block: expand, filter each channel, project, add the input back.

    Children: ``expand`` (1x1 conv + BN + ReLU6, widening the channels
    ``expand_ratio`` times; absent when ``expand_ratio`` is 1), ``depthwise``
    (3x3 depthwise conv + BN + ReLU6, carrying the stride) and ``project``
    (1x1 conv + BN, no activation: the "linear bottleneck").  The block adds
    its input to its output when ``stride == 1`` and the channels match
    (``use_residual``); that choice is fixed when the block is built, so the
    forward pass has no data-dependent branch.

    Args:
        in_channels, out_channels: channels in and out.
        stride: 1 or 2 (the depthwise convolution's).
        expand_ratio: width of the hidden layers relative to ``in_channels``.

    Raises:
        TypeError, ValueError: a bad argument; the message names it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: int = 4):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_choice("stride", stride, (1, 2))
        check_positive_int("expand_ratio", expand_ratio)
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        if expand_ratio != 1:
            self.expand = ConvBN(in_channels, hidden, 1, activation=nn.ReLU6)
        else:
            self.expand = None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6)
        self.project = ConvBN(hidden, out_channels, 1, activation=None)

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style network for 28x28 digits or 32x32 colour images.

    ``stem`` (3x3 conv + BN + ReLU6) -> ``blocks`` (inverted residuals) ->
    ``head`` (1x1 conv + BN + ReLU6) -> ``pool`` (global average) ->
    ``flatten`` -> ``fc``.  The blocks follow :attr:`SETTINGS`, MobileNetV2's
    table of ``(expansion t, channels c, repeats n, stride s)`` cut down to
    three stages: with ``width_mult=1``, 16 channels at the stem's
    resolution, then 24 and 32 channels at a half and a quarter of it.

    Args:
        num_classes: output classes.
        in_channels: 1 for digits, 3 for colour images.
        input_size: image height/width (28 for MNIST, 32 for CIFAR-10).  The
            global average pooling makes the classifier independent of it; it
            is checked (the image must survive every halving) and kept in
            ``model.input_shape``.
        width_mult: multiplies every layer's channels (rounded to multiples of 8).
        stem_stride: 2 halves the image in the stem (cheap: fine for digits),
            1 keeps the full resolution (better for natural images, about four
            times the MACs).

    Raises:
        TypeError, ValueError: an argument is not a positive number of the
            right kind, or ``input_size`` is too small; the message names it.
    """

    #: ``(expansion, channels, repeats, stride)`` of each stage, before ``width_mult``.
    SETTINGS = ((4, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))
    STEM_CHANNELS = 16
    HEAD_CHANNELS = 128

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width_mult: float = 1.0,
                 stem_stride: int = 2):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        width_mult = check_float("width_mult", width_mult, low=0, low_open=True)
        if not math.isfinite(width_mult):
            raise ValueError(f"width_mult must be a finite positive number, got {width_mult}")
        check_choice("stem_stride", stem_stride, (1, 2))
        halvings = (stem_stride == 2) + sum(s == 2 for _, _, _, s in self.SETTINGS)
        input_size = _check_input_size(input_size, halvings)
        self.input_shape = (in_channels, input_size, input_size)

        channels = _make_divisible(self.STEM_CHANNELS * width_mult)
        self.stem = ConvBN(in_channels, channels, 3, stem_stride, activation=nn.ReLU6)
        blocks = []
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        head = _make_divisible(self.HEAD_CHANNELS * width_mult)
        self.head = ConvBN(channels, head, 1, activation=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(head, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BN, the input added back, then ReLU.

    Children: ``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``, ``shortcut``
    and ``relu2``.  ``shortcut`` is a 1x1 conv + BN (:class:`ConvBN`, no
    activation) when the block changes the shape (stride 2 or new channel
    count) and None otherwise, when the input itself is added.

    Args:
        in_channels, out_channels: channels in and out.
        stride: 1 or 2 (the first convolution's and the shortcut's).

    Raises:
        TypeError, ValueError: a bad argument; the message names it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_choice("stride", stride, (1, 2))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBN(in_channels, out_channels, 1, stride, activation=None)
        else:
            self.shortcut = None
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + skip)


class ResNetSmall(nn.Module):
    """A small ResNet (ResNet-8, -14, -20 ...) for 28x28 digits or 32x32 colour images.

    ``stem`` (3x3 conv + BN + ReLU) -> ``layer1``, ``layer2``, ``layer3``
    (each ``(depth - 2) / 6`` :class:`BasicBlock`\\ s, with ``width``, 2x and 4x
    channels; ``layer2`` and ``layer3`` halve the image) -> ``pool`` (global
    average) -> ``flatten`` -> ``fc``, as in He et al.'s networks for
    CIFAR-10, with 1x1 conv + BN shortcuts where the shape changes.

    Args:
        num_classes: output classes.
        in_channels: 1 for digits, 3 for colour images.
        input_size: image height/width (28 for MNIST, 32 for CIFAR-10); checked
            (the image must survive two halvings) and kept in ``model.input_shape``.
        width: channels of ``layer1``.
        depth: weight layers on the longest path: 8, 14, 20 ... (6n + 2 for n
            blocks per stage).

    Raises:
        TypeError, ValueError: a bad argument; the message names it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: int = 16,
                 depth: int = 8):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        input_size = _check_input_size(input_size, 2)
        self.input_shape = (in_channels, input_size, input_size)
        n = (depth - 2) // 6
        self.stem = ConvBN(in_channels, width, 3, 1, activation=nn.ReLU)
        channels = width
        for stage, (out, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(channels, out, stride if i == 0 else 1))
                channels = out
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


#: torchvision architectures that :func:`torchvision_model` adapts.
TORCHVISION_MODELS = ("resnet18", "mobilenet_v2")


def torchvision_model(arch: str, num_classes: int = 10, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """torchvision's ``resnet18`` or ``mobilenet_v2`` with fresh weights, adapted to a data set.

    The model is torchvision's own (``weights=None``: nothing is downloaded),
    built with ``num_classes`` outputs; when ``in_channels`` is not 3, its
    first convolution is replaced by one with the same shape that takes
    ``in_channels`` channels (initialised as torchvision initialises it).
    That is what torchvision users do to train these networks on MNIST.

    ``small_input=True`` also gives the stem the form users choose for
    CIFAR-sized images: for ``resnet18`` a 3x3 stride-1 first convolution and
    no max pooling (``maxpool`` becomes ``nn.Identity``), for ``mobilenet_v2``
    a stride-1 first convolution.  Which stem suits 28x28 digits on a CPU
    differs between the two (measured on the offline MNIST subset, one core):

    * ``resnet18`` keeps torchvision's stem (7x7 stride-2 convolution and max
      pooling): 33 million MACs per image, 97.8% after 3 epochs.  The
      small-input stem costs 456 million MACs (14 times as many) and about
      five times the training time, minutes per epoch on one core.
    * ``mobilenet_v2`` is registered with the stride-1 stem
      (``"torchvision:mobilenet_v2"`` in :data:`MODELS`): 22 million MACs
      instead of 5.6 million and about 1.7 times the time per training
      step, but with the standard stem its last eleven blocks see 2x2 and
      1x1 images and training from scratch on 4,000 digits was unstable
      (53% after 5 epochs, against 96.7% after 3 with the stride-1 stem).

    Args:
        arch: ``"resnet18"`` or ``"mobilenet_v2"``.
        num_classes: output classes.
        in_channels: channels of the input images (1 for digits).
        small_input: the stride-1 stem for small images (see above).

    Returns:
        The torchvision model (its layer names are torchvision's: ``conv1``,
        ``layer1.0.conv1`` ... ``fc``; ``features.0.0`` ... ``classifier.1``).

    Raises:
        ValueError, TypeError: an argument is out of range; the message names it.
    """
    check_choice("arch", arch, TORCHVISION_MODELS)
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    if not isinstance(small_input, bool):
        raise TypeError(f"small_input must be True or False, got {small_input!r}")
    # lazy: torchvision takes ~1 s to import; only its models need it
    import torchvision

    if arch == "resnet18":
        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            return net
        first = net.conv1
    else:
        net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
        if not small_input and in_channels == 3:
            return net
        first = nn.Conv2d(in_channels, net.features[0][0].out_channels, kernel_size=3,
                          stride=1 if small_input else 2, padding=1, bias=False)
        net.features[0][0] = first
    nn.init.kaiming_normal_(first.weight, mode="fan_out", nonlinearity="relu")
    return net


#: Model names accepted by :func:`build_model` (and the model cache): name -> (constructor, its default arguments).
MODELS = {
    "lenet300": (LeNet300100, {}),
    "lenet5": (LeNet5, {}),
    "vgg-mnist": (VGGSmall, {"in_channels": 1, "input_size": 28, "width": 8}),
    "vgg-cifar": (VGGSmall, {"in_channels": 3, "input_size": 32, "width": 32}),
    "mobilenet-mnist": (MobileNetV2Small, {"in_channels": 1, "input_size": 28, "width_mult": 1.0, "stem_stride": 2}),
    "mobilenet-cifar": (MobileNetV2Small, {"in_channels": 3, "input_size": 32, "width_mult": 2.0, "stem_stride": 1}),
    "resnet-mnist": (ResNetSmall, {"in_channels": 1, "input_size": 28, "width": 16, "depth": 8}),
    "resnet-cifar": (ResNetSmall, {"in_channels": 3, "input_size": 32, "width": 16, "depth": 20}),
    "torchvision:resnet18": (functools.partial(torchvision_model, "resnet18"), {"in_channels": 3}),
    "torchvision:mobilenet_v2": (functools.partial(torchvision_model, "mobilenet_v2"),
                                 {"in_channels": 3, "small_input": True}),
}

# The constructor arguments that depend on the images (see data_kwargs).
_DATA_ARGS = {
    "lenet300": (), "lenet5": ("in_channels",),
    "vgg-mnist": ("in_channels", "input_size"), "vgg-cifar": ("in_channels", "input_size"),
    "mobilenet-mnist": ("in_channels", "input_size"), "mobilenet-cifar": ("in_channels", "input_size"),
    "resnet-mnist": ("in_channels", "input_size"), "resnet-cifar": ("in_channels", "input_size"),
    "torchvision:resnet18": ("in_channels",), "torchvision:mobilenet_v2": ("in_channels",),
}


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a named model with fresh weights (seed torch first for repeatability).

    Args:
        name: one of :data:`MODELS`:

            * ``"lenet300"``, ``"lenet5"``: the LeNets, for 28x28 digits;
            * ``"vgg-mnist"`` (VGGSmall, width 8, 28x28 digits) and
              ``"vgg-cifar"`` (width 32, 32x32 colour);
            * ``"mobilenet-mnist"`` (:class:`MobileNetV2Small`, width 1, a
              stride-2 stem, 28x28 digits) and ``"mobilenet-cifar"`` (width
              2, a stride-1 stem, 32x32 colour);
            * ``"resnet-mnist"`` (:class:`ResNetSmall`: ResNet-8, width 16,
              28x28 digits) and ``"resnet-cifar"`` (ResNet-20, width 16,
              32x32 colour);
            * ``"torchvision:resnet18"``, ``"torchvision:mobilenet_v2"``:
              torchvision's networks through :func:`torchvision_model`
              (pass ``in_channels=1`` for digits).
        num_classes: output classes.
        **kwargs: override the model's constructor arguments.

    Raises:
        ValueError: ``name`` is not a known model.
    """
    check_choice("name", name, MODELS)
    cls, defaults = MODELS[name]
    return cls(num_classes=num_classes, **{**defaults, **kwargs})


def from_factory(spec: str, *, seed: int = 0) -> nn.Module:
    """Build a model with a function of your own, defined in a Python file: ``"path/to/file.py:make_net"``.

    The file is imported as a module of its own (each call imports it
    afresh) and the function is called with no arguments, with PyTorch's
    random generator seeded with ``seed`` (and restored afterwards), so
    that the same file gives the same initial weights every time.  The
    function may build an untrained network or load trained weights.

    Example: a file ``nets.py`` holding
    ``def make_net(): return torchvision.models.resnet18(num_classes=10)``
    is used as ``from_factory("nets.py:make_net")``, or
    ``nnlab compress --model nets.py:make_net`` on the command line.

    Args:
        spec: ``"path/to/file.py:function"``.
        seed: seed of PyTorch's generator while the function runs.

    Returns:
        The ``nn.Module`` the function returned.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``spec`` does not have the form ``file.py:function``,
            the file has no function of that name (the message lists the
            functions it has), or the function raised an exception (named,
            with its message).
        ImportError: importing the file failed (the message has the error).
        TypeError: the name is not a function, the function needs
            arguments, or it returned something other than an ``nn.Module``.
    """
    kind, *where = parse_model_argument(spec)
    if kind != "factory":
        raise ValueError(f"model={spec!r} is a registered model name, not {FACTORY_FORM}; use build_model")
    path, function = where
    # The same name in every process: the module's classes enter the cache key of what is trained from them.
    module_name = f"nnlab_factory_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"model={spec!r}: cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # classes defined in the file can then be found (copy, pickle)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ImportError(f"model={spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, function):
        defined = sorted(n for n, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module_name and not n.startswith("_"))
        raise ValueError(f"model={spec!r}: {str(path)!r} has no function {function!r}; the functions it defines: "
                         f"{', '.join(map(repr, defined)) or 'none'}")
    factory = getattr(module, function)
    if not callable(factory):
        raise TypeError(f"model={spec!r}: {function!r} in {str(path)!r} is {factory!r} "
                        f"({type(factory).__name__}), not a function")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise TypeError(f"model={spec!r}: {function}{inspect.signature(factory)} needs arguments, but it is "
                        f"called with none; give every parameter a default value") from None
    except ValueError:  # no signature to inspect (a builtin): just call it
        pass
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = factory()
        except Exception as exc:
            raise ValueError(f"model={spec!r}: {function}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise TypeError(f"model={spec!r}: {function}() returned {type(net).__name__}, not a torch.nn.Module")
    return net


def data_kwargs(name: str, input_shape) -> dict:
    """The constructor arguments that fit model ``name`` to images of shape ``(C, H, W)``.

    For example ``data_kwargs("resnet-mnist", (1, 28, 28))`` is
    ``{"in_channels": 1, "input_size": 28}``; pass them to :func:`build_model`.
    ``"lenet300"`` takes none (it is made for 28x28 digits).

    Args:
        name: one of :data:`MODELS`.
        input_shape: ``(C, H, W)`` of one image, e.g. ``data.input_shape``.

    Raises:
        ValueError: unknown ``name``, or ``input_shape`` is not three positive
            integers (square, for the models that take ``input_size``).
    """
    check_choice("name", name, MODELS)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                                  for v in shape):
        raise ValueError(f"input_shape must be three positive integers (C, H, W), got {input_shape!r}")
    wanted = _DATA_ARGS[name]
    out = {}
    if "in_channels" in wanted:
        out["in_channels"] = int(shape[0])
    if "input_size" in wanted:
        if shape[1] != shape[2]:
            raise ValueError(f"input_shape must be square for {name!r} (input_size is one number), got {shape}")
        out["input_size"] = int(shape[1])
    return out


def _layer_macs(module, shape) -> int:
    """Multiply-accumulates of a Conv2d or Linear module for one image, given its output shape (batch first)."""
    per_image = int(torch.Size(shape[1:]).numel())
    if isinstance(module, nn.Conv2d):
        return per_image * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


#: Operations that change values in place and need no new activation buffer.
IN_PLACE = ("ReLU", "ReLU6", "Hardtanh", "Identity", "Dropout", "Flatten", "BatchNorm1d", "BatchNorm2d",
            "ActQuantiser", "relu", "relu6", "hardtanh", "dropout", "flatten", "view", "reshape", "contiguous")


def summary(model: nn.Module, input_shape=(1, 28, 28), device=None) -> pd.DataFrame:
    """Per-layer table of output shape, parameters, MACs and activation size, read from the model's graph.

    The model is traced (:func:`nnlab.graph.trace`) and run once on zeros:
    one row per operation in execution order (each module call, and each
    function such as a residual ``+``, ``torch.cat`` or ``torch.flatten``),
    plus a ``total`` row.  MACs count the multiply-accumulates of one image
    through Conv2d and Linear layers (dense: zeros are counted; the NNA
    report counts skipped zeros).  ``activations`` is the number of values
    the operation outputs for one image; the total row sums the operations
    that write a new tensor (element-wise ones such as ReLU, batch norm or a
    flatten run in place on an accelerator and are not counted again), and
    ``table.attrs["max_activations"]`` the largest one, the buffer a
    layer-by-layer accelerator must hold.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        input_shape: ``(C, H, W)`` of one input image (no batch dimension).
        device: where to run the probe (default: where the model is).

    Returns:
        A pandas DataFrame with columns ``layer`` (module name, or the node's
        name for a function), ``type`` (module class or function name),
        ``output_shape``, ``params``, ``macs``, ``activations``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad ``input_shape``.
        nnlab.graph.GraphError: the model cannot be traced, or fails on this input shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be positive integers (C, H, W) without the batch, got {input_shape!r}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    gm = graph.trace(model)
    shapes = graph.node_shapes(gm, shape, device=device, batch=1)
    rows, counted = [], set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node not in shapes:
            continue  # the input, the output, and shape queries (not tensors)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None:
            kind = type(module).__name__
            params = 0 if node.target in counted else sum(p.numel() for p in module.parameters(recurse=True))
            counted.add(node.target)
        else:
            kind, params = str(getattr(node.target, "__name__", node.target)), 0
        out = shapes[node]
        rows.append({"layer": graph.node_label(node), "type": kind, "output_shape": tuple(out[1:]), "params": params,
                     "macs": _layer_macs(module, out), "activations": int(torch.Size(out[1:]).numel())})
    table = pd.DataFrame(rows, columns=["layer", "type", "output_shape", "params", "macs", "activations"])
    total_params = sum(p.numel() for p in model.parameters())
    stored = ~table["type"].isin(IN_PLACE)
    total = {"layer": "total", "type": "", "output_shape": "", "params": total_params,
             "macs": int(table["macs"].sum()), "activations": int(table.loc[stored, "activations"].sum())}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table.attrs["max_activations"] = int(table["activations"].iloc[:-1].max()) if len(rows) else 0
    return table
