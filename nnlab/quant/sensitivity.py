"""Where quantisation hurts: which layers need more bits, and which images suffer first.

* :func:`bit_sensitivity`: quantise one layer at a time (the others stay
  float) and measure the accuracy: the layers whose accuracy falls most are
  *sensitive* and deserve more bits (``overrides`` of
  :func:`nnlab.quant.quantise_model`).
* :func:`quantisation_by_difficulty`: split the test images by how sure the
  float network is (the margin between its two largest logits) and count
  how many predictions quantisation changes in each group.  Images close to
  a decision boundary flip first, which is why quantisation bites harder on
  a harder task (CIFAR-10 has many more of them than MNIST).

Both leave the model unchanged, take a ``device`` and work on the network
inside a DistributedDataParallel wrapper.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from .._args import check_float, check_int, check_positive_int
from ..base import loader_of, resolve_device, unwrap
from ..train import accuracy
from .model import quantise_model, weight_layers
from .spec import MAX_BITS, MIN_BITS

__all__ = ["bit_sensitivity", "quantisation_by_difficulty", "logits_and_labels"]


def _bits_list(bits) -> list:
    values = [bits] if isinstance(bits, int) and not isinstance(bits, bool) else list(bits)
    if not values:
        raise ValueError("bits is empty; give at least one bit-depth")
    return [check_int("bits", b, minimum=MIN_BITS, maximum=MAX_BITS) for b in values]


def _device_of(model, device):
    return resolve_device(device, model)


@torch.no_grad()
def logits_and_labels(model: nn.Module, data, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the labels of every test image, in the loader's order, on the CPU.

    Args:
        model: the network (put in eval mode).
        data: DataBundle (its test loader) or a loader.
        device: where to run; default where the model is.

    Returns:
        ``(logits (N, classes), labels (N,))``.
    """
    net = unwrap(model)
    dev = _device_of(net, device)
    net.eval()
    logits, labels = [], []
    for x, y in loader_of(data, "test"):
        logits.append(net(x.to(dev)).float().cpu())
        labels.append(y)
    if not logits:
        raise ValueError("data has no test batches")
    return torch.cat(logits), torch.cat(labels)


def bit_sensitivity(model: nn.Module, data, bits: int | Sequence[int] = 4, *, others: int | None = None,
                    act_bits: int | None = None, layers: Iterable[str] | None = None, calibration_batches: int = 4,
                    device=None, **options) -> pd.DataFrame:
    """Accuracy when one layer's weights get ``bits`` and the others stay as they are, for each layer in turn.

    Post-training quantisation, no retraining.  With ``others=None`` only
    that one layer is quantised; with ``others=8`` (say) the question is
    "which layer can I lower from 8 to ``bits`` bits", asked in the context
    of the whole quantised network, which predicts better what happens when
    several layers are lowered together.

    Args:
        model: the trained float network (not changed).
        data: DataBundle: calibration on its training images, accuracy on its test images.
        bits: weight bit-depth, or several (a row per layer and bit-depth).
        others: weight bit-depth of every other layer (None: float weights).
        act_bits: also quantise every activation to this many bits (None: float activations,
            so only the one layer's weights are rounded).
        layers: names of the Conv2d/Linear layers to probe (default all).
        calibration_batches: batches that calibrate activation ranges.
        device: where to evaluate; default where the model is.
        **options: ``granularity``, ``narrow_range``, ``weight_method`` ... as for
            :func:`nnlab.quant.attach_quantisers`.

    Returns:
        DataFrame with columns ``layer``, ``type``, ``weights`` (count), ``bits``,
        ``accuracy`` and ``drop`` (percentage points below the same network
        without that layer's change: every layer at ``others`` bits, or float).
    """
    net = unwrap(model)
    values = _bits_list(bits)
    check_positive_int("calibration_batches", calibration_batches)
    all_layers = weight_layers(net)
    chosen = list(all_layers) if layers is None else [str(n) for n in layers]
    for name in chosen:
        if name not in all_layers:
            raise ValueError(f"layers contains {name!r}, which is not a Conv2d/Linear layer; "
                             f"choose among {list(all_layers)}")
    if not chosen:
        raise ValueError(f"layers is empty; choose among {list(all_layers)}")
    if others is not None:
        check_int("others", others, minimum=MIN_BITS, maximum=MAX_BITS)
    dev = _device_of(net, device)
    if act_bits is None and others is None:
        reference = accuracy(net, data, device=dev)
    else:
        reference = accuracy(quantise_model(net, data, others, act_bits, calibration_batches=calibration_batches,
                                            device=dev, **options), data, device=dev)
    rows = []
    for name in chosen:
        layer = all_layers[name]
        for b in values:
            q = quantise_model(net, data, others, act_bits, overrides={name: b},
                               calibration_batches=calibration_batches, device=dev, **options)
            acc = accuracy(q, data, device=dev)
            rows.append({"layer": name, "type": type(layer).__name__,
                         "weights": sum(p.numel() for p in layer.parameters(recurse=False) if p.dim() > 1),
                         "bits": b, "accuracy": acc, "drop": reference - acc})
    return pd.DataFrame(rows, columns=["layer", "type", "weights", "bits", "accuracy", "drop"])


def quantisation_by_difficulty(model: nn.Module, data, bits: int | Sequence[int] = (8, 6, 5, 4, 3), *,
                               act_bits: int | None = 8, hard_fraction: float = 0.2,
                               calibration_batches: int = 4, device=None, **options) -> pd.DataFrame:
    """How many predictions post-training quantisation changes on easy and on hard test images.

    The float network's *margin* on an image is the gap between its two
    largest logits; the ``hard_fraction`` of images with the smallest
    margins are "hard" (near a decision boundary), the others "easy".

    Args:
        model: the trained float network (not changed).
        data: DataBundle (calibration on training images, groups on test images).
        bits: weight bit-depths to try.
        act_bits: activation bit-depth (None: float activations).
        hard_fraction: share of the test images called hard, in (0, 1).
        calibration_batches: batches that calibrate activation ranges.
        device: where to evaluate; default where the model is.
        **options: as for :func:`nnlab.quant.attach_quantisers` (``granularity`` ...).

    Returns:
        Long DataFrame, one row per bit-depth and group (``"easy"``,
        ``"hard"``, ``"all"``): ``bits``, ``group``, ``images``,
        ``fp32_accuracy``, ``accuracy`` and ``flipped`` (percent of the
        group's images whose predicted class changed).
    """
    net = unwrap(model)
    values = _bits_list(bits)
    hard_fraction = check_float("hard_fraction", hard_fraction, 0, 1, low_open=True, high_open=True)
    dev = _device_of(net, device)
    logits, labels = logits_and_labels(net, data, device=dev)
    top2 = logits.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    pred = top2.indices[:, 0]
    n_hard = max(1, round(hard_fraction * len(labels)))
    hard = torch.zeros(len(labels), dtype=torch.bool)
    hard[margin.argsort()[:n_hard]] = True
    groups = {"easy": ~hard, "hard": hard, "all": torch.ones_like(hard)}
    rows = []
    for b in values:
        q = quantise_model(net, data, b, act_bits, calibration_batches=calibration_batches, device=dev, **options)
        q_pred = logits_and_labels(q, data, device=dev)[0].argmax(1)
        for group, sel in groups.items():
            count = int(sel.sum())
            rows.append({"bits": b, "group": group, "images": count,
                         "fp32_accuracy": 100.0 * (pred[sel] == labels[sel]).float().mean().item(),
                         "accuracy": 100.0 * (q_pred[sel] == labels[sel]).float().mean().item(),
                         "flipped": 100.0 * (q_pred[sel] != pred[sel]).float().mean().item()})
    return pd.DataFrame(rows, columns=["bits", "group", "images", "fp32_accuracy", "accuracy", "flipped"])
