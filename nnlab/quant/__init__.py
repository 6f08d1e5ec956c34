"""Reduction: quantise weights and activations to a chosen bit-depth (METHOD.md step 2).

Modules, one subject each:

* :mod:`nnlab.quant.spec`: :class:`QuantSpec`, the value object describing a grid;
* :mod:`nnlab.quant.tensor`: scale choice and (fake) quantisation of tensors;
* :mod:`nnlab.quant.modules`: :class:`WeightQuantizer`, :class:`ActQuantizer`, :class:`FixedMask`;
* :mod:`nnlab.quant.model`: post-training quantisation of a network (:func:`quantise_model`);
* :mod:`nnlab.quant.retraining`: retraining for low bits (:func:`retrain`: straight-through
  or random-subset) and :func:`pretrained_quantised`, a cached retrained model;
* :mod:`nnlab.quant.sensitivity`: which layers need more bits (:func:`bit_sensitivity`) and
  which images quantisation hurts first (:func:`quantisation_by_difficulty`).

How a quantised model is represented
------------------------------------
:func:`quantise_model` (or :func:`attach_quantisers` + :func:`calibrate`)
returns an ordinary ``nn.Module`` built from the float model:

* **Weights.** Each ``nn.Conv2d`` / ``nn.Linear`` keeps its class and name.
  Its ``weight`` is parametrized (``torch.nn.utils.parametrize``); the
  chain ``layer.parametrizations.weight`` is ``[FixedMask, WeightQuantizer]``
  for a pruned layer (the torch prune mask, converted) and
  ``[WeightQuantizer]`` otherwise, so ``layer.weight == quant(mask * w)``
  with ``w = layer.parametrizations.weight.original``.  Get the quantiser
  with ``weight_quantizer(layer)``; it holds ``spec`` (a :class:`QuantSpec`),
  ``scale`` (float32) and ``zero_point`` (int32) buffers, both 0-dim
  (per tensor) or of shape ``(out_channels,)`` (per channel, axis 0).
  Weight specs are signed and symmetric, so ``zero_point`` is 0 and pruned
  zeros are exact zeros.  ``quantised_weight(layer)`` returns
  ``(codes, spec, scale, zero_point)`` with the int32 codes.  Biases stay float.
* **Activations.** :class:`ActQuantizer` modules are inserted into the
  ``nn.Sequential``: ``"input_quant"`` first (asymmetric unsigned spec with a
  zero point: the normalised image is signed) and one quantiser per ReLU
  (unsigned, zero point 0), named ``"<n>_quant"`` after the module ``<n>`` it
  follows: the ReLU itself, or the MaxPool2d that directly follows the ReLU
  (max pooling commutes with rounding, so the values are identical and a
  quarter as many are quantised).  Each holds ``spec``, ``scale`` and
  ``zero_point`` (0-dim); ``act_quantizer_names(model)`` lists the names.
  The network's output (logits) is not quantised.  Walking
  ``model.named_modules()`` yields, in data-flow order, the input quantiser,
  then for each weight layer: the layer, [BatchNorm], ReLU, [MaxPool2d], its
  ActQuantizer.
* **Grid semantics** (PyTorch's): ``q = clamp(round(x * (1/scale)) +
  zero_point, spec.quant_min, spec.quant_max)``, rounding half to even, and
  ``x_hat = (q - zero_point) * scale``.
* **Names** of the original layers are unchanged (``"conv1"``, ``"conv2"``, ``"fc1"``
  ... in LeNet-5); positional indexing shifts by the inserted quantisers, so
  use ``model.get_submodule(name)``.  ``describe(model)`` lists every
  quantiser in order as a table.
* After retraining, :func:`freeze` has written the quantised values into
  the weights, so ``original`` already lies on the grid.
"""

from .model import (INPUT_QUANTIZER, WEIGHT_LAYERS, act_quantizer_names, act_quantizers, attach_quantisers, calibrate, describe,
                    distinct_values, freeze, quantise_model, quantised_weight, weight_layers, weight_quantizer)
from .modules import ACT_METHODS, ActQuantizer, FixedMask, WeightQuantizer
from .retraining import METHODS, SCHEDULES, RandomSubset, pretrained_quantised, retrain
from .sensitivity import bit_sensitivity, logits_and_labels, quantisation_by_difficulty
from .spec import GRANULARITIES, MAX_BITS, MIN_BITS, QuantSpec
from .tensor import (MIN_SCALE, SCALE_METHODS, compute_qparams, dequantise, fake_quantise, grid_levels,
                     qparams_from_range, quantise, value_range)

__all__ = [
    "QuantSpec", "GRANULARITIES", "MIN_BITS", "MAX_BITS",
    "compute_qparams", "qparams_from_range", "value_range", "fake_quantise", "quantise", "dequantise",
    "grid_levels", "SCALE_METHODS", "MIN_SCALE",
    "WeightQuantizer", "ActQuantizer", "FixedMask", "ACT_METHODS",
    "attach_quantisers", "calibrate", "quantise_model", "freeze", "describe", "distinct_values",
    "quantised_weight", "weight_layers", "weight_quantizer", "act_quantizers", "act_quantizer_names", "INPUT_QUANTIZER", "WEIGHT_LAYERS",
    "retrain", "RandomSubset", "pretrained_quantised", "METHODS", "SCHEDULES",
    "bit_sensitivity", "quantisation_by_difficulty", "logits_and_labels",
]
