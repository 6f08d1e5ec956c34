"""The candidate models of the course, and a per-layer summary table.

* :class:`LeNet300100`: the multilayer perceptron of LeCun et al. (1998),
  784-300-100-10 (266,610 parameters).
* :class:`LeNet5`: the classic LeNet-5 convolutional network (61,706
  parameters for 10 classes), with ReLU and max pooling, the form that
  integer accelerators run.
* :class:`VGGSmall`: a small VGG-style CNN (3x3 convolutions, batch norm,
  max pooling) for 32x32 colour images; ``in_channels`` and ``input_size``
  let it run on 28x28 digits too.

All are ordinary ``nn.Sequential`` subclasses, so later chapters can prune,
quantise and compile them layer by layer.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ._args import check_choice, check_positive_int

__all__ = ["LeNet300100", "LeNet5", "VGGSmall", "MODELS", "build_model", "summary"]


class LeNet300100(nn.Sequential):
    """Multilayer perceptron 784-300-100-10 for 28x28 grey images."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        check_positive_int("num_classes", num_classes)
        super().__init__(
            nn.Flatten(),
            nn.Linear(in_features, 300), nn.ReLU(),
            nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class LeNet5(nn.Sequential):
    """LeNet-5 for 28x28 grey images: conv(6, 5x5, pad 2) - pool - conv(16, 5x5) - pool - 120 - 84 - classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )


class VGGSmall(nn.Sequential):
    """A small VGG-style CNN: three stages of two 3x3 conv + BN + ReLU, each followed by 2x2 max pooling.

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
        layers, c_in = [], in_channels
        for c_out in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        side = input_size // 8
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, num_classes)]
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


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return out[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


#: Layer types that change values in place and need no new activation buffer.
IN_PLACE = ("ReLU", "ReLU6", "Identity", "Dropout", "Flatten", "BatchNorm1d", "BatchNorm2d")


def summary(model: nn.Module, input_shape=(1, 28, 28), device=None) -> pd.DataFrame:
    """Per-layer table of output shape, parameters, MACs and activation size.

    One row per leaf module in execution order, plus a ``total`` row.  MACs
    count the multiply-accumulates of one image through Conv2d and Linear
    layers (dense: zeros are counted; the NNA report counts skipped zeros).
    ``activations`` is the number of values the layer outputs for one image;
    the total row sums the layers that write a new tensor (element-wise
    layers such as ReLU, batch norm or Flatten run in place on an
    accelerator and are not counted again), and ``table.attrs["max_activations"]`` the
    largest one, the buffer a layer-by-layer accelerator must hold.

    Args:
        model: any ``nn.Module``.
        input_shape: ``(C, H, W)`` of one input image (no batch dimension).
        device: where to run the probe (default: where the model is).

    Returns:
        A pandas DataFrame with columns ``layer``, ``type``, ``output_shape``,
        ``params``, ``macs``, ``activations``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be positive integers (C, H, W) without the batch, got {input_shape!r}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    rows, hooks = [], []

    def hook(name):
        def fn(module, inputs, out):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append({
                "layer": name, "type": type(module).__name__,
                "output_shape": tuple(out.shape[1:]), "params": params,
                "macs": _layer_macs(module, out), "activations": out[0].numel(),
            })
        return fn

    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    table = pd.DataFrame(rows, columns=["layer", "type", "output_shape", "params", "macs", "activations"])
    total_params = sum(p.numel() for p in model.parameters())
    stored = ~table["type"].isin(IN_PLACE)
    total = {"layer": "total", "type": "", "output_shape": "", "params": total_params,
             "macs": int(table["macs"].sum()), "activations": int(table.loc[stored, "activations"].sum())}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table.attrs["max_activations"] = int(table["activations"].iloc[:-1].max()) if len(rows) else 0
    return table
