"""The compiler: from a trained, pruned and quantised PyTorch model to an integer :class:`Program`.

Two sources:

* :func:`compile_model`: a model quantised by :mod:`nnlab.quant` (read its
  module docstring: weights carry a ``WeightQuantizer`` parametrization,
  ``ActQuantizer`` modules sit at the input and after each ReLU).  The
  compiler walks the ``nn.Sequential`` in order and recognises the pattern
  ``[input quantiser] ... Conv2d/Linear [BatchNorm] [ReLU] [MaxPool2d] ActQuantizer ...``
  (a max pooling before the quantiser is moved after it: rounding onto a
  grid never reorders values, so the maximum is the same).
  Batch norm is folded into the weight scale and the bias (exactly: the
  integer weights do not change; a negative BN factor flips their sign);
  the bias becomes int32 on the accumulator's scale ``in_scale * weight_scale``.
* :func:`compile_torch_int8`: an 8-bit model converted by PyTorch's own
  eager-mode ``torch.ao.quantization`` flow (see :mod:`nnlab.nna.torch_int8`),
  with its own scales and zero points, so that the ``"torch"`` mode
  reproduces PyTorch's integers exactly.

:func:`requantise_weights` re-targets a program's weights to other
bit-depths and sparsities (the what-if explorer uses it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._args import check_float, check_int
from .program import AddLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer

__all__ = ["compile_model", "compile_torch_int8", "requantise_weights", "output_shapes", "torch_conv_kernel",
           "SUPPORTED"]

#: What the compiler accepts, for error messages.
SUPPORTED = ("Conv2d (groups=1, dilation=1, zero padding), Linear, BatchNorm1d/2d after them, ReLU, "
             "MaxPool2d, AvgPool2d (ceil_mode=False), Flatten, Dropout, Identity, and nnlab ActQuantizer")


def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _leaves(model: nn.Module, stop_types=()):
    """The modules that compute, in registration order (nested containers opened)."""
    for name, child in model.named_children():
        if isinstance(child, stop_types) or not any(True for _ in child.children()):
            yield name, child
        else:
            for sub, leaf in _leaves(child, stop_types):
                yield f"{name}.{sub}", leaf


def _check_conv(name, m):
    problems = []
    if m.groups != 1:
        problems.append(f"groups={m.groups}")
    if _pair(m.dilation) != (1, 1):
        problems.append(f"dilation={m.dilation}")
    if isinstance(m.padding, str):
        problems.append(f"padding={m.padding!r}")
    if getattr(m, "padding_mode", "zeros") != "zeros":
        problems.append(f"padding_mode={m.padding_mode!r}")
    if problems:
        raise ValueError(f"layer {name!r} ({type(m).__name__}) has {', '.join(problems)}; the NNA supports "
                         f"convolutions with groups=1, dilation=1 and integer zero padding")


def _pool_layer(name, m, zero_point):
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        raise ValueError(f"layer {name!r} (AvgPool2d) sets divisor_override; not supported")
    if getattr(m, "ceil_mode", False):
        raise ValueError(f"layer {name!r} ({type(m).__name__}) uses ceil_mode=True; the NNA supports ceil_mode=False")
    if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != (1, 1):
        raise ValueError(f"layer {name!r} (MaxPool2d) has dilation={m.dilation}; the NNA supports dilation=1")
    if isinstance(m, nn.AvgPool2d) and not m.count_include_pad and _pair(m.padding) != (0, 0):
        raise ValueError(f"layer {name!r} (AvgPool2d) uses count_include_pad=False with padding; not supported")
    op = "maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d"
    stride = m.stride if m.stride is not None else m.kernel_size
    return PoolLayer(name, op, _pair(m.kernel_size), _pair(stride), _pair(m.padding), int(zero_point))


def _unsupported(name, m):
    return ValueError(f"layer {name!r} is a {type(m).__name__}, which the NNA compiler does not support; "
                      f"supported: {SUPPORTED}")


# ----------------------------------------------------------------------------- shapes
def output_shapes(program: Program) -> dict:
    """The output shape of every layer for one input (no batch dimension), checking that they fit.

    Args:
        program: a compiled program.

    Returns:
        dict layer name -> shape tuple, in order.

    Raises:
        ValueError: a layer receives a shape it cannot take (names the layer).
    """
    shapes, history = {}, []
    shape = None
    for layer in program.layers:
        where = f"layer {layer.name!r} ({layer.op})"
        if isinstance(layer, InputLayer):
            shape = tuple(layer.shape)
        elif isinstance(layer, WeightLayer) and layer.op == "conv2d":
            if len(shape) != 3 or shape[0] != layer.weight.shape[1]:
                raise ValueError(f"{where} expects ({layer.weight.shape[1]}, H, W) inputs but receives {shape}; "
                                 f"check input_shape")
            (kh, kw), (sh, sw), (ph, pw) = layer.weight.shape[2:], layer.stride, layer.padding
            ho, wo = (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1
            if ho < 1 or wo < 1:
                raise ValueError(f"{where}: a {kh}x{kw} kernel does not fit in the {shape} input")
            shape = (layer.out_channels, ho, wo)
        elif isinstance(layer, WeightLayer):
            if len(shape) != 1 or shape[0] != layer.weight.shape[1]:
                raise ValueError(f"{where} expects {layer.weight.shape[1]} input features but receives shape "
                                 f"{shape}; check input_shape (and that a Flatten comes first)")
            shape = (layer.out_channels,)
        elif isinstance(layer, PoolLayer):
            if len(shape) != 3:
                raise ValueError(f"{where} needs (C, H, W) inputs, receives {shape}")
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            ho, wo = (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1
            if ho < 1 or wo < 1:
                raise ValueError(f"{where}: a {kh}x{kw} window does not fit in the {shape} input")
            shape = (shape[0], ho, wo)
        elif isinstance(layer, FlattenLayer):
            shape = (int(np.prod(shape)),)
        elif isinstance(layer, AddLayer):
            if not 0 <= layer.other < len(history) or history[layer.other] != shape:
                other = history[layer.other] if 0 <= layer.other < len(history) else "no such layer"
                raise ValueError(f"{where} adds shapes {shape} and {other} (layer index {layer.other})")
        history.append(shape)
        shapes[layer.name] = shape
    return shapes


# ----------------------------------------------------------------------------- nnlab models
def _int_bias(bias_real, in_scale, weight_scale, name):
    """Bias on the accumulator's scale ``in_scale * weight_scale``, rounded half to even, as int32."""
    b = np.rint(np.asarray(bias_real, np.float64) / (np.float64(in_scale) * weight_scale.astype(np.float64)))
    if np.any(np.abs(b) > 2 ** 31 - 1):
        raise ValueError(f"layer {name!r}: the bias does not fit in int32 on the accumulator's scale")
    return b.astype(np.int32)


def _grid(q) -> dict:
    spec = q.spec
    return {"scale": float(q.scale), "zero_point": int(q.zero_point), "bits": spec.bits,
            "qmin": spec.quant_min, "qmax": spec.quant_max}


def _fold_batchnorm(codes, scale, bias, bn, name):
    """Fold ``bn`` (eval mode) into per-channel scales and the bias; the integer weights keep their magnitude."""
    k = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
    bias = (bias - bn.running_mean.double().numpy()) * k + bn.bias.detach().double().numpy()
    flip = k < 0
    if flip.any():
        codes = codes.copy()
        codes[flip] = -codes[flip]
    return codes, (scale.astype(np.float64) * np.abs(k)).astype(np.float32), bias


def _weight_layer(pending, grid_in, grid_out):
    from ..quant import quantised_weight

    name, m = pending["name"], pending["module"]
    try:
        codes, spec, scale, zero_point = quantised_weight(m)
    except ValueError:
        raise ValueError(f"layer {name!r} ({type(m).__name__}) has float weights; quantise the model first "
                         f"(nnlab.quant.quantise_model)") from None
    if torch.any(zero_point != 0):
        raise ValueError(f"layer {name!r}: weight zero points must be 0 (symmetric weights); got {spec}")
    codes = codes.cpu().numpy().astype(np.int32)
    out_ch = codes.shape[0]
    scale = np.broadcast_to(scale.detach().cpu().float().numpy(), (out_ch,)).astype(np.float32)
    bias = np.zeros(out_ch) if m.bias is None else m.bias.detach().cpu().double().numpy()
    if pending["bn"] is not None:
        codes, scale, bias = _fold_batchnorm(codes, scale, bias, pending["bn"], name)
        if codes.max() > spec.quant_max or codes.min() < spec.quant_min:
            raise ValueError(f"layer {name!r}: folding a negative batch-norm factor pushes a weight outside the "
                             f"{spec.bits}-bit grid; use narrow_range=True weights")
    conv = isinstance(m, nn.Conv2d)
    if conv:
        _check_conv(name, m)
    out = grid_out or {"scale": None, "zero_point": 0, "bits": 32, "qmin": -(2 ** 31), "qmax": 2 ** 31 - 1}
    return WeightLayer(
        name=name, op="conv2d" if conv else "linear", weight=codes, weight_bits=spec.bits, weight_scale=scale,
        bias=_int_bias(bias, grid_in["scale"], scale, name), in_scale=grid_in["scale"],
        in_zero_point=grid_in["zero_point"], in_bits=grid_in["bits"], out_scale=out["scale"],
        out_zero_point=out["zero_point"], out_bits=out["bits"], out_min=out["qmin"], out_max=out["qmax"],
        relu=pending["relu"], stride=_pair(m.stride) if conv else (1, 1),
        padding=_pair(m.padding) if conv else (0, 0))


def _check_input_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be positive integers, (C, H, W) or (features,), without the batch; "
                         f"got {input_shape!r}")
    return shape


def compile_model(model: nn.Module, input_shape=(1, 28, 28), *, name: str | None = None) -> Program:
    """Compile a model quantised with :mod:`nnlab.quant` into an integer :class:`Program`.

    Args:
        model: an ``nn.Sequential`` from :func:`nnlab.quant.quantise_model`
            (or :func:`~nnlab.quant.pretrained_quantised`), weights and
            activations quantised, pruned or not.
        input_shape: shape of one input image, ``(C, H, W)``.
        name: a label for reports (default: the model's class name).

    Returns:
        The :class:`Program`.

    Raises:
        ValueError: a layer the NNA cannot run, a weight or activation left in
            float, an activation quantiser still calibrating, or shapes that
            do not fit; the message names the layer and what is supported.
    """
    from ..quant import ActQuantizer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    layers, grid, pending = [], None, None
    for lname, m in _leaves(model, stop_types=(nn.Conv2d, nn.Linear)):
        if isinstance(m, ActQuantizer):
            if m.calibrating:
                raise ValueError(f"activation quantiser {lname!r} is still calibrating; run nnlab.quant.calibrate")
            if m.spec.per_channel:
                raise ValueError(f"activation quantiser {lname!r} is per channel; the NNA needs per-tensor grids")
            if not layers:
                g = _grid(m)
                layers.append(InputLayer(lname, g["scale"], g["zero_point"], g["bits"], g["qmin"], g["qmax"], shape))
                grid = g
            elif pending is not None:
                layers.append(_weight_layer(pending, grid, _grid(m)))
                grid = _grid(m)
                layers += [_pool_layer(n, p, grid["zero_point"]) for n, p in pending["pools"]]
                pending = None
            else:
                raise ValueError(f"activation quantiser {lname!r} follows no Conv2d/Linear layer; the NNA expects "
                                 f"quantisers at the input and after each Conv2d/Linear (and its ReLU)")
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if pending is not None:
                raise ValueError(f"the output of layer {pending['name']!r} is not quantised before layer {lname!r}; "
                                 f"quantise activations (nnlab.quant.quantise_model with act_bits)")
            if grid is None:
                raise ValueError(f"the input of layer {lname!r} is not quantised; quantise the model with "
                                 f"act_bits so that it starts with an input quantiser")
            pending = {"name": lname, "module": m, "bn": None, "relu": False, "pools": []}
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if pending is None or pending["relu"] or pending["bn"] is not None:
                raise ValueError(f"batch norm {lname!r} must follow a Conv2d/Linear directly to be folded")
            if not m.track_running_stats or m.running_var is None:
                raise ValueError(f"batch norm {lname!r} has no running statistics to fold")
            pending["bn"] = m
        elif isinstance(m, nn.MaxPool2d) and pending is not None:
            # Max pooling commutes with quantisation (a non-decreasing map), so the NNA
            # requantises first and pools the integers: the same values, fewer to requantise.
            pending["pools"].append((lname, m))
        elif isinstance(m, nn.ReLU):
            if pending is None or pending["relu"] or pending["pools"]:
                raise ValueError(f"ReLU {lname!r} must follow a Conv2d/Linear (and its batch norm) to be fused")
            pending["relu"] = True
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)):
            if pending is not None:
                raise ValueError(f"layer {lname!r} comes between layer {pending['name']!r} and its activation "
                                 f"quantiser; the NNA needs the output quantised first")
            if grid is None:
                raise ValueError(f"the input of layer {lname!r} is not quantised")
            if isinstance(m, nn.Flatten):
                if (m.start_dim, m.end_dim) != (1, -1):
                    raise ValueError(f"layer {lname!r} (Flatten) must flatten dims 1..-1, "
                                     f"got {m.start_dim}..{m.end_dim}")
                layers.append(FlattenLayer(lname))
            else:
                layers.append(_pool_layer(lname, m, grid["zero_point"]))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        else:
            raise _unsupported(lname, m)
    if not layers:
        raise ValueError("model has no input quantiser; quantise it with nnlab.quant.quantise_model(act_bits=...)")
    if pending is not None:
        layers.append(_weight_layer(pending, grid, None))
        layers += [_pool_layer(n, p, 0) for n, p in pending["pools"]]
    if not any(isinstance(layer, WeightLayer) for layer in layers):
        raise ValueError("model has no Conv2d or Linear layer to compile")
    program = Program(layers, name or type(model).__name__, "nnlab")
    output_shapes(program)
    return program


# ----------------------------------------------------------------------------- PyTorch's int8 models
def _cpu_has_avx512_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def torch_conv_kernel(engine: str | None = None) -> str:
    """Which rounding PyTorch's quantized convolutions use on this machine: ``"fbgemm"`` or ``"onednn"``.

    With the ``"x86"`` engine PyTorch runs symmetric-weight convolutions
    through oneDNN when the CPU has AVX512-VNNI (and through fbgemm
    otherwise); ``"onednn"`` always uses oneDNN, ``"fbgemm"`` never.

    Args:
        engine: ``torch.backends.quantized.engine`` at conversion time (default: the current one).

    Returns:
        ``"fbgemm"`` or ``"onednn"``.
    """
    engine = engine or torch.backends.quantized.engine
    if engine == "x86":
        return "onednn" if _cpu_has_avx512_vnni() else "fbgemm"
    if engine in ("onednn", "fbgemm"):
        return engine
    raise ValueError(f"quantized engine {engine!r} is not supported; use 'x86', 'fbgemm' or 'onednn'")


def _torch_grid(scale, zero_point, dtype):
    if dtype != torch.quint8:
        raise ValueError(f"activations must be quint8 (PyTorch's default), got {dtype}")
    return {"scale": float(scale), "zero_point": int(zero_point), "bits": 8, "qmin": 0, "qmax": 255}


def _torch_weight_layer(name, m, grid_in, kernel):
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    w = m.weight()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zp = w.q_per_channel_scales(), w.q_per_channel_zero_points()
    else:
        scale, zp = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
    if torch.any(zp != 0):
        raise ValueError(f"layer {name!r}: weight zero points must be 0 (symmetric qint8 weights), got {w.qscheme()}")
    codes = w.int_repr().numpy().astype(np.int32)
    out_ch = codes.shape[0]
    scale = np.broadcast_to(scale.numpy().astype(np.float32), (out_ch,)).copy()  # PyTorch keeps them as float
    bias = m.bias()
    bias_float = np.zeros(out_ch, np.float32) if bias is None else bias.detach().numpy().astype(np.float32)
    conv = isinstance(m, nnq.Conv2d)
    if conv:
        _check_conv(name, m)
    out = _torch_grid(m.scale, m.zero_point, torch.quint8)
    atw = np.float32(grid_in["scale"]) * scale  # float32, as PyTorch computes it
    return WeightLayer(
        name=name, op="conv2d" if conv else "linear", weight=codes, weight_bits=8, weight_scale=scale,
        bias=_int_bias(bias_float, 1.0, atw, name), in_scale=grid_in["scale"], in_zero_point=grid_in["zero_point"],
        in_bits=8, out_scale=out["scale"], out_zero_point=out["zero_point"], out_bits=8, out_min=0, out_max=255,
        relu=isinstance(m, (nniq.ConvReLU2d, nniq.LinearReLU)), stride=_pair(m.stride) if conv else (1, 1),
        padding=_pair(m.padding) if conv else (0, 0), bias_float=bias_float,
        kernel=kernel if conv else "fbgemm")


def compile_torch_int8(qmodel: nn.Module, input_shape=(1, 28, 28), *, name: str | None = None,
                       engine: str | None = None) -> Program:
    """Compile a model converted by PyTorch's eager-mode int8 flow, keeping its scales and zero points.

    The model must run, in registration order: a ``Quantize`` (converted
    QuantStub), quantized ``Conv2d``/``ConvReLU2d``/``Linear``/``LinearReLU``
    modules, ``MaxPool2d``/``AvgPool2d``/``Flatten``/``Identity``/``Dropout``,
    and a ``DeQuantize`` at the end (see :func:`nnlab.nna.torch_int8.quantise_torch_int8`).

    Args:
        qmodel: the converted model.
        input_shape: one input's shape ``(C, H, W)``.
        name: a label for reports.
        engine: the quantized engine it was converted under (default: the current one);
            decides the convolution rounding (:func:`torch_conv_kernel`).

    Returns:
        The :class:`Program` (``source="torch.ao"``).

    Raises:
        ValueError: unsupported modules (e.g. an unfused ReLU), asymmetric weights, bad shapes.
    """
    import torch.ao.nn.quantized as nnq

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    shape = _check_input_shape(input_shape)
    kernel = torch_conv_kernel(engine)
    stop = (nnq.Conv2d, nnq.Linear, nnq.Quantize, nnq.DeQuantize)
    layers, grid, ended = [], None, False
    for lname, m in _leaves(qmodel, stop_types=stop):
        if ended and not isinstance(m, (nn.Identity, nn.Dropout)):
            raise ValueError(f"layer {lname!r} comes after the DeQuantize; the NNA program must end there")
        if isinstance(m, nnq.Quantize):
            if layers:
                raise ValueError(f"a second Quantize {lname!r}; only one at the input is supported")
            grid = _torch_grid(m.scale, m.zero_point, m.dtype)
            layers.append(InputLayer(lname, grid["scale"], grid["zero_point"], 8, 0, 255, shape))
        elif isinstance(m, nnq.DeQuantize):
            ended = True
        elif grid is None:
            raise ValueError(f"layer {lname!r} comes before the Quantize stub; the model must start with it")
        elif isinstance(m, (nnq.Conv2d, nnq.Linear)):
            layers.append(_torch_weight_layer(lname, m, grid, kernel))
            grid = _torch_grid(m.scale, m.zero_point, torch.quint8)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            layers.append(_pool_layer(lname, m, grid["zero_point"]))
        elif isinstance(m, nn.Flatten):
            layers.append(FlattenLayer(lname))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        elif isinstance(m, nn.ReLU):
            raise ValueError(f"ReLU {lname!r} is not fused; fuse conv+relu and linear+relu with "
                             f"torch.ao.quantization.fuse_modules before prepare/convert")
        else:
            raise ValueError(f"layer {lname!r} is a {type(m).__name__}, which the NNA compiler does not support; "
                             f"supported: Quantize, quantized Conv2d/ConvReLU2d/Linear/LinearReLU, MaxPool2d, "
                             f"AvgPool2d, Flatten, Identity, Dropout, DeQuantize")
    if not layers:
        raise ValueError("qmodel has no Quantize stub; convert it with torch.ao.quantization first")
    program = Program(layers, name or type(qmodel).__name__, "torch.ao")
    output_shapes(program)
    return program


# ----------------------------------------------------------------------------- what-if
def _per_layer(arg, value, names, check):
    if value is None:
        return {}
    if isinstance(value, dict):
        for k in value:
            if k not in names:
                raise ValueError(f"{arg} names layer {k!r}; weight layers: {', '.join(map(repr, names))}")
        return {k: check(f"{arg}[{k!r}]", v) for k, v in value.items()}
    return {k: check(arg, value) for k in names}


def requantise_weights(program: Program, weight_bits=None, sparsity=None) -> Program:
    """A copy of ``program`` with weights pruned further and re-quantised to other bit-depths.

    For each weight layer named in the arguments: the real weights
    (``weight * weight_scale``) lose their smallest-magnitude entries until a
    share ``sparsity`` of the layer is zero (a layer already sparser stays as
    it is), then are rounded onto a symmetric, narrow-range, per-channel grid
    of ``weight_bits`` bits (scale: the channel's largest magnitude); the
    bias is re-expressed on the new accumulator scale.  Activations keep
    their grids.  Start from a program compiled at high precision (e.g. 16-bit
    weights) so rounding is not applied twice.

    Args:
        program: a compiled program.
        weight_bits: one bit-depth (2..16) for every layer, or a dict layer name -> bits.
        sparsity: one share of zeros in [0, 1) for every layer, or a dict layer name -> share.

    Returns:
        A new :class:`Program`.
    """
    names = [layer.name for layer in program.weight_layers]
    bits = _per_layer("weight_bits", weight_bits, names, lambda a, v: check_int(a, v, minimum=2, maximum=16))
    share = _per_layer("sparsity", sparsity, names, lambda a, v: check_float(a, v, 0.0, 1.0, high_open=True))
    layers = []
    for layer in program.layers:
        if not isinstance(layer, WeightLayer) or (layer.name not in bits and layer.name not in share):
            layers.append(layer)
            continue
        b = bits.get(layer.name, layer.weight_bits)
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        w = layer.weight.astype(np.float64) * layer.weight_scale.astype(np.float64).reshape(shape)
        if layer.name in share:
            k = int(round(share[layer.name] * w.size))
            if k > np.count_nonzero(w == 0):
                order = np.argsort(np.abs(w), axis=None, kind="stable")
                w.reshape(-1)[order[:k]] = 0.0
        top = 2 ** (b - 1) - 1
        peak = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        scale = np.where(peak > 0, peak / top, np.finfo(np.float32).eps).astype(np.float32)
        codes = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -top, top).astype(np.int32)
        bias_real = (layer.bias.astype(np.float64) * layer.in_scale * layer.weight_scale.astype(np.float64)
                     if layer.bias_float is None else layer.bias_float.astype(np.float64))
        layers.append(dataclasses.replace(layer, weight=codes, weight_bits=b, weight_scale=scale,
                                          bias=_int_bias(bias_real, layer.in_scale, scale, layer.name)))
    return Program(layers, program.name, program.source)
