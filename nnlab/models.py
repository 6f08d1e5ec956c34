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
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pandas as pd
import torch
from torch import nn

from ._args import check_choice, check_positive_int

__all__ = ["NamedSequential", "LeNet300100", "LeNet5", "VGGSmall", "MODELS", "build_model", "summary",
           "upgrade_state_dict"]

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


#: Model names accepted by :func:`build_model` (and the model cache).
MODELS = {
    "lenet300": (LeNet300100, {}),
    "lenet5": (LeNet5, {}),
    "vgg-mnist": (VGGSmall, {"in_channels": 1, "input_size": 28, "width": 8}),
    "vgg-cifar": (VGGSmall, {"in_channels": 3, "input_size": 32, "width": 32}),
}


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a named model with fresh weights (seed torch first for repeatability).

    Args:
        name: one of :data:`MODELS`: ``"lenet300"``, ``"lenet5"``,
            ``"vgg-mnist"`` (VGGSmall for 28x28 digits, width 8) and
            ``"vgg-cifar"`` (VGGSmall for 32x32 colour, width 32).
        num_classes: output classes.
        **kwargs: override the model's constructor arguments.
    """
    check_choice("name", name, MODELS)
    cls, defaults = MODELS[name]
    return cls(num_classes=num_classes, **{**defaults, **kwargs})


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
            "ActQuantizer", "relu", "relu6", "hardtanh", "dropout", "flatten", "view", "reshape", "contiguous")


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
    from . import graph

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
