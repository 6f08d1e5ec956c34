"""PyTorch's own 8-bit flow (eager mode, x86 backend), the reference the simulator must match exactly.

:func:`quantise_torch_int8` runs the standard recipe on an ``nn.Sequential``
network: wrap it between ``QuantStub`` and ``DeQuantStub``, fuse conv+ReLU and
linear+ReLU (and conv+BN+ReLU), ``prepare`` with
``get_default_qconfig("x86")``, calibrate on a few training batches,
``convert``.  The x86 qconfig observes activations with ``reduce_range``
(7-bit ranges) and quantises weights per channel, symmetric, int8.

:func:`layer_outputs` records the integers (``int_repr()``) every quantized
layer produces, for the per-layer comparison in :mod:`nnlab.nna.verify`.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from .._args import check_choice, check_positive_int
from ..train import _loader

__all__ = ["Int8Model", "quantise_torch_int8", "fusion_groups", "layer_outputs"]


class Int8Model(nn.Module):
    """``QuantStub -> body -> DeQuantStub``: the wrapper PyTorch's eager flow needs."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.body = body
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


def fusion_groups(model: nn.Sequential) -> list:
    """Names of the module groups to fuse: Conv2d[+BatchNorm2d]+ReLU and Linear+ReLU.

    Args:
        model: an ``nn.Sequential``.

    Returns:
        A list of name lists for ``torch.ao.quantization.fuse_modules``.
    """
    names = list(model._modules)
    mods = list(model._modules.values())
    groups, i = [], 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            j = i + 1
            if isinstance(m, nn.Conv2d) and j < len(mods) and isinstance(mods[j], nn.BatchNorm2d):
                j += 1
            if j < len(mods) and isinstance(mods[j], nn.ReLU):
                j += 1
            if j - i > 1:
                groups.append(names[i:j])
            i = j
        else:
            i += 1
    return groups


@torch.no_grad()
def quantise_torch_int8(model: nn.Module, data, calibration_batches: int = 8, *, engine: str = "x86") -> Int8Model:
    """Quantise a float network to int8 with PyTorch's eager-mode flow.

    Args:
        model: a trained float ``nn.Sequential`` (left unchanged).
        data: DataBundle (its train loader calibrates) or a DataLoader.
        calibration_batches: batches for the observers.
        engine: ``"x86"`` (default), ``"fbgemm"`` or ``"onednn"``; it is set as
            ``torch.backends.quantized.engine`` and stays set, because the
            converted model must run under the engine it was converted for.

    Returns:
        The converted :class:`Int8Model` (eval mode, CPU).
    """
    check_choice("engine", engine, ("x86", "fbgemm", "onednn"))
    check_positive_int("calibration_batches", calibration_batches)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential (as nnlab's models are), got {type(model).__name__}")
    torch.backends.quantized.engine = engine
    body = copy.deepcopy(model).cpu().eval()
    groups = fusion_groups(body)
    if groups:
        torch.ao.quantization.fuse_modules(body, groups, inplace=True)
    wrapped = Int8Model(body).eval()
    wrapped.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch announces the eager flow's future deprecation
        torch.ao.quantization.prepare(wrapped, inplace=True)
        for i, (x, _) in enumerate(_loader(data, "train")):
            wrapped(x)
            if i + 1 >= calibration_batches:
                break
        torch.ao.quantization.convert(wrapped, inplace=True)
    return wrapped


@torch.no_grad()
def layer_outputs(qmodel: nn.Module, x: torch.Tensor) -> dict:
    """The integers every quantized layer of ``qmodel`` outputs for ``x``.

    Args:
        qmodel: a converted model (e.g. from :func:`quantise_torch_int8`).
        x: float input batch.

    Returns:
        dict layer name -> int64 NumPy array of ``int_repr()`` (Quantize,
        conv/linear and pooling layers), in execution order.
    """
    import torch.ao.nn.quantized as nnq

    outs, hooks = {}, []
    for name, m in qmodel.named_modules():
        if isinstance(m, (nnq.Quantize, nnq.Conv2d, nnq.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)):
            def hook(module, inputs, out, name=name):
                outs[name] = out.int_repr().numpy().astype(np.int64)
            hooks.append(m.register_forward_hook(hook))
    try:
        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return outs
