"""Reduction: quantise weights and activations to a chosen bit-depth.

Modules, one subject each:

* :mod:`nnlab.quant.spec`: :class:`QuantSpec`, the value object describing which integers a tensor holds;
* :mod:`nnlab.quant.grid`: :class:`Grid`, a spec with its scale and zero point: one frozen value
  that quantisers return and the NNA simulator reads;
* :mod:`nnlab.quant.tensor`: scale choice and (fake) quantisation of tensors;
* :mod:`nnlab.quant.modules`: :class:`WeightQuantiser`, :class:`ActQuantiser`, :class:`FixedMask`;
* :mod:`nnlab.quant.model`: post-training quantisation of a network (:func:`quantise_model`);
* :mod:`nnlab.quant.retraining`: retraining for low bits (:func:`retrain`: straight-through
  or random-subset, with scales that follow the weights or are learned) and
  :func:`pretrained_quantised`, a cached retrained model;
* :mod:`nnlab.quant.lsq`: learned quantisation steps (LSQ): the scale as a
  parameter with its own gradient;
* :mod:`nnlab.quant.sensitivity`: which layers need more bits (:func:`bit_sensitivity`) and
  which images quantisation hurts first (:func:`quantisation_by_difficulty`);
* :mod:`nnlab.picker`: a bit-depth and a sparsity per layer chosen for a
  budget of storage, energy or latency on the simulated NNA (:func:`pick_per_layer`).

How a quantised model is represented
------------------------------------
:func:`quantise_model` (or :func:`attach_quantisers` + :func:`calibrate`)
returns a rewritten copy of the float model:

* **Structure.** With activation quantisation, the model is traced with
  ``torch.fx`` (:mod:`nnlab.graph`) and the copy is a ``torch.fx.GraphModule``
  whose class name is the model's (``"LeNet5"``): its ``forward`` is the
  model's real data flow (residual adds, concatenations, a ``Sequential``
  subclass's own ``forward``) with the activation quantisers inserted.
  Layers keep their names and nesting: ``model.get_submodule("conv2")``,
  ``model.get_submodule("layer1.0.conv1")``; positional indexing
  (``model[0]``) is gone.  Weights alone (``act_bits=None``) need no graph:
  the copy keeps the model's own class.  A DistributedDataParallel wrapper is
  unwrapped first (:func:`nnlab.distributed.unwrap`).
* **Weights.** Each ``nn.Conv2d`` / ``nn.Linear`` keeps its class and name.
  Its ``weight`` is parametrized (``torch.nn.utils.parametrize``); the
  chain ``layer.parametrizations.weight`` is ``[FixedMask, WeightQuantiser]``
  for a pruned layer (the torch prune mask, converted) and
  ``[WeightQuantiser]`` otherwise, so ``layer.weight == quant(mask * w)``
  with ``w = layer.parametrizations.weight.original``.  Get the quantiser
  with ``weight_quantiser(layer)``; it holds ``spec`` (a :class:`QuantSpec`),
  ``scale`` (float32) and ``zero_point`` (int32) buffers, both 0-dim
  (per tensor) or of shape ``(out_channels,)`` (per channel, axis 0), and
  ``grid()`` returns them as one frozen :class:`Grid`.
  Weight specs are signed and symmetric, so ``zero_point`` is 0 and pruned
  zeros are exact zeros.  ``quantised_weight(layer)`` returns
  ``(codes, spec, scale, zero_point)`` with the int32 codes.  Biases stay float.
* **Activations.** :class:`ActQuantiser` modules sit on the graph's edges
  where the NNA stores a tensor, so that the fake-quantised model rounds
  exactly where the simulator does: ``"input_quant"`` on the input
  (asymmetric unsigned spec with a zero point: the normalised image is
  signed), and ``"<node>_quant"`` after each Conv2d/Linear with what fuses
  into it (batch norm, ReLU/ReLU6/Hardtanh, a max pool), after each add, each
  concat and each average pool, named after the graph node it follows (a
  module's node is named after the module, dots as underscores:
  ``"layer1_0_relu_quant"``).  A quantiser after a ReLU-like clamp (or after
  values that stay >= 0) is unsigned with zero point 0; one after a layer
  without activation has a zero point.  A max pool right after a ReLU takes
  the quantiser after it (max pooling commutes with rounding, so the values
  are identical and a quarter as many are quantised): LeNet-5's quantisers
  are ``input_quant``, ``pool1_quant``, ``pool2_quant``, ``relu3_quant``,
  ``relu4_quant``.  The network's output (logits) is not quantised.  Each
  quantiser holds ``spec``, ``scale`` and ``zero_point`` (0-dim) and
  ``grid()``; ``act_quantiser_names(model)`` lists the names and
  ``act_quantisers(model)`` the modules, in data-flow order.
* **Grid semantics** (PyTorch's): ``q = clamp(round(x * (1/scale)) +
  zero_point, spec.quant_min, spec.quant_max)``, rounding half to even, and
  ``x_hat = (q - zero_point) * scale``.
* ``describe_quantisers(model)`` lists every quantiser in data-flow order as a table.
* **Non-finite values** are refused, never rounded: a NaN or an infinity in
  a weight, a bias, a calibration batch or the activations a quantiser
  rounds raises a ValueError naming the layer or quantiser
  (``"the activations at 'input_quant': 3 NaN and 0 infinite value(s) ..."``);
  see :func:`check_finite`.
* After retraining, :func:`freeze` has written the quantised values into
  the weights, so ``original`` already lies on the grid.
"""

from .model import (INPUT_QUANTISER, WEIGHT_LAYERS, act_quantiser_names, act_quantisers, attach_quantisers, calibrate, describe_quantisers,
                    distinct_values, freeze, quantise_model, quantised_weight, quantiser_input, weight_layers,
                    weight_quantiser)
from .lsq import fake_quantise_learned, lsq_grad_factor, lsq_init
from .modules import ACT_METHODS, SCALE_INITS, ActQuantiser, FixedMask, WeightQuantiser
from .retraining import METHODS, SCALE_MODES, SUBSET_SCHEDULES, RandomSubset, pretrained_quantised, retrain
from .sensitivity import bit_sensitivity, logits_and_labels, quantisation_by_difficulty
from .grid import Grid
from .spec import GRANULARITIES, MAX_BITS, MIN_BITS, QuantSpec
from .tensor import (MIN_SCALE, SCALE_METHODS, check_finite, check_finite_parameters, compute_qparams, dequantise,
                     fake_quantise, grid_levels, qparams_from_range, quantise, value_range)

__all__ = [
    "QuantSpec", "Grid", "GRANULARITIES", "MIN_BITS", "MAX_BITS",
    "compute_qparams", "qparams_from_range", "value_range", "fake_quantise", "quantise", "dequantise",
    "grid_levels", "SCALE_METHODS", "MIN_SCALE", "check_finite", "check_finite_parameters",
    "WeightQuantiser", "ActQuantiser", "FixedMask", "ACT_METHODS", "SCALE_INITS",
    "fake_quantise_learned", "lsq_init", "lsq_grad_factor", "quantiser_input",
    "attach_quantisers", "calibrate", "quantise_model", "freeze", "describe_quantisers", "distinct_values",
    "quantised_weight", "weight_layers", "weight_quantiser", "act_quantisers", "act_quantiser_names", "INPUT_QUANTISER", "WEIGHT_LAYERS",
    "retrain", "RandomSubset", "pretrained_quantised", "METHODS", "SUBSET_SCHEDULES", "SCALE_MODES",
    "bit_sensitivity", "quantisation_by_difficulty", "logits_and_labels",
]

from .._deprecated import warn_renamed  # noqa: E402
from ..base import warn_moved  # noqa: E402
from .model import RENAMED as _MODEL_RENAMED  # noqa: E402
from .modules import RENAMED as _MODULES_RENAMED  # noqa: E402
from .retraining import RENAMED as _RETRAINING_RENAMED  # noqa: E402

#: Deprecated names (old -> new): American spellings, ``describe`` and ``SCHEDULES``; each still works
#: until the next release and warns with the new name.
RENAMED = {**_MODULES_RENAMED, **_MODEL_RENAMED, **_RETRAINING_RENAMED}
#: Names that moved to :mod:`nnlab.picker` (the budget picker costs networks on the simulated NNA, so it sits
#: above :mod:`nnlab.nna`); each still works from here until the next release, with a warning.
MOVED_TO_PICKER = ("pick_per_layer", "measure_sensitivity", "solve_budget", "uniform_settings", "PerLayerChoice",
                   "SensitivityTable", "BUDGETS")


def __getattr__(name: str):
    if name in MOVED_TO_PICKER:
        warn_moved(f"nnlab.quant.{name}", f"nnlab.picker.{name}")
        from .. import picker  # lazy: a deprecated alias, the only import of a module above nnlab.quant

        return getattr(picker, name)
    if name in RENAMED:
        warn_renamed(__name__, name, RENAMED[name])
        return globals()[RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
