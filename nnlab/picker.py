"""Per-layer bit-depths and sparsities chosen for a budget on the simulated NNA.

:func:`pick_per_layer` answers "which weight bit-depth and which share of
zeros should each layer get, so that the network fits a budget of storage
bytes, energy or latency per inference, and loses as little as possible?"
It works in four steps, each visible in what it returns:

1. **Reference.** The trained network is quantised with 16-bit weights and
   ``act_bits`` activations and compiled (:func:`nnlab.nna.compile_model`).
   Every candidate is this program with some layers' weights pruned and
   rounded again (:func:`nnlab.nna.requantise_weights`), so each candidate
   is a network the simulator really runs.
2. **Sensitivity.** For each layer and each option (bit-depth, sparsity),
   only that layer is changed and the integer engine runs a fixed set of
   training images; the *damage* is the mean KL divergence between the
   reference's and the changed network's class probabilities (no labels
   needed, and smoother than counting flipped predictions).  The option's
   cost is that layer's row of the cost report (:func:`nnlab.nna.layer_costs`):
   with the activation grids fixed, a layer's storage, energy and latency
   depend only on its own weights, so the network's cost is exactly the sum
   of its layers' costs.
3. **Choice.** Assuming damages add up, the cheapest-damage combination that
   fits the budget is a multiple-choice knapsack, solved exactly by dynamic
   programming over the budget cut into ``resolution`` steps (each cost
   rounded *up*, so the choice always fits).  The uniform settings (every
   layer at the same bit-depth and sparsity) that fit are checked too, on the
   same images, and the one with the least measured damage wins: the picker
   never returns something worse, on its own images, than the best uniform
   setting it knows.
4. **Measure.** The chosen program is costed by :func:`nnlab.nna.report`,
   saved (:func:`nnlab.nna.save`) to read its stored bytes from the file, and
   run on the test images; with ``retrain_epochs > 0`` the float network is
   also cored and quantised per layer as chosen, retrained
   (:func:`nnlab.quant.retrain`), compiled and measured again.

Only the weights change; every activation keeps ``act_bits`` bits.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import prune
from .data import first_images
from .nna import compile_model, headline, layer_costs, report, run, save
from .nna.config import SERIES2NX, NNAConfig
from .nna.engine import _check_input, _step, accumulator_width, output_logits
from .nna.program import Program
from .nna.whatif import requantise_weights
from ._args import check_float, check_int, check_positive_int
from .quant.model import _deepcopy
from .quant.model import quantise_model
from .quant.retraining import retrain
from .quant.spec import MAX_BITS, MIN_BITS

__all__ = ["BUDGETS", "PerLayerChoice", "SensitivityTable", "measure_sensitivity", "solve_budget", "pick_per_layer",
           "uniform_settings"]

#: Budget keyword -> (column of the cost table, unit of the budget, factor from the column to that unit).
BUDGETS = {"budget_bytes": ("storage_B", "bytes", 1.0),
           "budget_energy_uj": ("energy_nJ", "µJ", 1e-3),
           "budget_latency_us": ("latency_us", "µs", 1.0)}
#: Default sparsities tried for every layer.
DEFAULT_SPARSITIES = (0.0, 0.5, 0.75, 0.9)
#: Default bit-depths tried (those the accelerator supports are kept).
DEFAULT_BITS = (2, 3, 4, 5, 6, 8, 12, 16)
_COST_COLUMNS = ("storage_B", "energy_nJ", "latency_us")


# ----------------------------------------------------------------------------- running a program from a layer on
def _reference_values(program, x, hardware):
    """Every layer's integer output (the engine's own representation) for images ``x`` on ``hardware``."""
    x = _check_input(program, x)
    width = accumulator_width(hardware)
    values = {}
    for layer in program.layers:
        values[layer.name] = _step(layer, [values[n] for n in layer.inputs], x, "torch", width, {}, {}, {})
    return x, values


def _logits_from(program, changed: dict, x, values, width) -> np.ndarray:
    """Logits of ``program`` with the layers in ``changed`` replaced, re-running only from the first changed one."""
    first = min(i for i, layer in enumerate(program.layers) if layer.name in changed)
    values = dict(values)
    for layer in program.layers[first:]:
        layer = changed.get(layer.name, layer)
        values[layer.name] = _step(layer, [values[n] for n in layer.inputs], x, "torch", width, {}, {}, {})
    if program.output.name in changed or any(l.name in changed for l in program.layers[-3:]):
        program = Program([changed.get(l.name, l) for l in program.layers], program.name, program.source)
    return output_logits(values[program.output.name], program)


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || other) of the softmax distributions, in nats."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p_log, q_log = log_softmax(ref_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))


# ----------------------------------------------------------------------------- arguments
def _budget(budgets: dict) -> tuple[str, float]:
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        names = ", ".join(BUDGETS)
        raise ValueError(f"give exactly one budget among {names}; got {len(given)}"
                         + (f" ({', '.join(given)})" if given else ""))
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of {BUDGETS[name][1]}, got {value!r}")
    return name, value


def _bits_options(bits, hardware) -> list:
    values = list(DEFAULT_BITS) if bits is None else (
        [bits] if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) else list(bits))
    values = [check_int("bits", b, minimum=MIN_BITS, maximum=MAX_BITS) for b in values]
    if bits is None:
        values = [b for b in values if hardware.min_bits <= b <= hardware.max_bits]
    for b in values:
        if not hardware.min_bits <= b <= hardware.max_bits:
            raise ValueError(f"bits contains {b}, but {hardware.name} supports {hardware.min_bits} to "
                             f"{hardware.max_bits} bits per layer")
    if not values:
        raise ValueError(f"bits is empty; give bit-depths in {hardware.min_bits}..{hardware.max_bits}")
    return sorted(set(values))


def _sparsity_options(sparsities) -> list:
    values = list(DEFAULT_SPARSITIES if sparsities is None else sparsities)
    if not values:
        raise ValueError("sparsities is empty; give shares of zeros in [0, 1), e.g. (0, 0.5, 0.9)")
    return sorted({check_float("sparsities entry", s, 0.0, 1.0, high_open=True) for s in values})


def _hardware(hardware):
    hardware = SERIES2NX if hardware is None else hardware
    if not isinstance(hardware, NNAConfig):
        raise TypeError(f"hardware must be an nnlab.nna.NNAConfig, got {type(hardware).__name__}")
    if hardware.arithmetic != "int":
        raise ValueError(f"hardware must be an integer accelerator; {hardware.name!r} computes in "
                         f"{hardware.arithmetic}")
    return hardware


def _images(data, n: int, split: str, seed: int = 0):
    with torch.random.fork_rng(devices=[]):  # a shuffled (or augmented) loader draws from torch's RNG
        torch.manual_seed(seed)
        x, y = first_images(data, n, split=split)
    return x.numpy(), y.numpy()


# ----------------------------------------------------------------------------- sensitivity
@dataclass
class SensitivityTable:
    """What :func:`measure_sensitivity` measured: every layer's options, their damage and their cost.

    Attributes:
        program: the reference program (16-bit weights, ``act_bits`` activations).
        hardware: the accelerator the costs are for.
        options: one row per layer and option: ``layer``, ``bits``,
            ``sparsity``, ``damage`` (mean KL divergence from the reference,
            nats, on ``images`` training images), ``storage_B``, ``energy_nJ``
            and ``latency_us`` (that layer's row of the cost report).
        fixed: the costs of the layers without weights (input, pools, adds
            ...), which no option changes: ``storage_B``, ``energy_nJ``, ``latency_us``.
        images: the images the damages were measured on (training images).
        reference_logits: the reference program's logits on them.
    """

    program: object = field(repr=False)
    hardware: object
    options: pd.DataFrame = field(repr=False)
    fixed: dict = field(default_factory=dict)
    images: np.ndarray = field(default=None, repr=False)
    reference_logits: np.ndarray = field(default=None, repr=False)
    _values: dict = field(default=None, repr=False)
    _x: np.ndarray = field(default=None, repr=False)

    @property
    def layers(self) -> list:
        """Weight layer names, in program order."""
        return [layer.name for layer in self.program.weight_layers]

    def cost_range(self, column: str) -> tuple[float, float]:
        """(cheapest, dearest) total of a cost column over every combination of options."""
        g = self.options.groupby("layer", sort=False)[column]
        return float(g.min().sum() + self.fixed[column]), float(g.max().sum() + self.fixed[column])

    def program_for(self, bits: dict, sparsity: dict):
        """The reference program with each layer's weights pruned to ``sparsity`` and rounded to ``bits``."""
        return requantise_weights(self.program, weight_bits=bits, sparsity=sparsity)

    def damage_of(self, program) -> float:
        """Measured damage (mean KL divergence from the reference) of a whole program on the sensitivity images."""
        changed = {layer.name: layer for layer in program.weight_layers}
        logits = _logits_from(self.program, changed, self._x, self._values, accumulator_width(self.hardware))
        return _kl(self.reference_logits, logits)


def measure_sensitivity(model: nn.Module, data, *, bits=None, sparsities=None, act_bits: int = 8, hardware=None,
                        images: int = 256, calibration_batches: int = 4, seed: int = 0,
                        progress: bool = False) -> SensitivityTable:
    """Damage and cost of every (bit-depth, sparsity) option of every weight layer, one layer at a time.

    Args:
        model: the trained float network (not changed); a network already
            pruned with ``torch.nn.utils.prune`` keeps its zeros.
        data: DataBundle: calibration and sensitivity on its training images.
        bits: weight bit-depths to try (default those of 2, 3, 4, 5, 6, 8, 12, 16
            that ``hardware`` supports); each must be one the accelerator supports.
        sparsities: shares of zero weights to try, each in [0, 1) (default 0, 0.5, 0.75, 0.9).
        act_bits: activation bit-depth of every layer (2..16, one the accelerator supports).
        hardware: :class:`nnlab.nna.NNAConfig` (default the Series2NX-like preset).
        images: how many training images measure the damage.
        calibration_batches: batches that calibrate the activation ranges.
        seed: picks the images (the training loader may shuffle or augment).
        progress: show a progress bar.

    Returns:
        A :class:`SensitivityTable`.
    """
    hardware = _hardware(hardware)
    bit_options = _bits_options(bits, hardware)
    sparsity_options = _sparsity_options(sparsities)
    act_bits = check_int("act_bits", act_bits, minimum=MIN_BITS, maximum=MAX_BITS)
    hardware.check_bits(act_bits, "act_bits")
    hardware.check_bits(16, "the reference (16-bit weights)")
    check_positive_int("images", images)
    check_positive_int("calibration_batches", calibration_batches)
    check_int("seed", seed, minimum=0)

    net = _deepcopy(model).cpu().eval()  # pruned layers keep their zeros
    qmodel = quantise_model(net, data, 16, act_bits, calibration_batches=calibration_batches, device="cpu")
    program = compile_model(qmodel, data.input_shape)
    x, _ = _images(data, images, "train", seed)
    x, values = _reference_values(program, x, hardware)
    width = accumulator_width(hardware)
    ref_logits = output_logits(values[program.output.name], program)
    base = layer_costs(program, hardware)
    names = [layer.name for layer in program.weight_layers]
    fixed = {c: float(base.loc[~base["layer"].isin(names), c].sum()) for c in _COST_COLUMNS}

    rows = []
    jobs = [(n, b, s) for n in names for b in bit_options for s in sparsity_options]
    for name, b, s in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False):
        changed = requantise_weights(program, weight_bits={name: b}, sparsity={name: s})
        layer = next(l for l in changed.weight_layers if l.name == name)
        costs = layer_costs(changed, hardware)
        row = costs.loc[costs["layer"] == name].iloc[0]
        damage = _kl(ref_logits, _logits_from(program, {name: layer}, x, values, width))
        rows.append({"layer": name, "bits": b, "sparsity": s, "damage": damage,
                     **{c: float(row[c]) for c in _COST_COLUMNS}})
    options = pd.DataFrame(rows, columns=["layer", "bits", "sparsity", "damage", *_COST_COLUMNS])
    return SensitivityTable(program=program, hardware=hardware, options=options, fixed=fixed, images=x,
                            reference_logits=ref_logits, _values=values, _x=x)


# ----------------------------------------------------------------------------- the choice
def solve_budget(table: SensitivityTable, column: str, budget: float, *, resolution: int = 4000) -> pd.DataFrame:
    """The options (one per layer) of least total damage whose total ``column`` fits ``budget``.

    A multiple-choice knapsack solved by dynamic programming: what the
    budget leaves once every layer's cheapest option is paid is cut into
    ``resolution`` equal steps, and what each option costs above its layer's
    cheapest is rounded *up* to whole steps, so the choice always fits (it
    may miss a slightly better one that fits only by less than a step per
    layer).

    Args:
        table: from :func:`measure_sensitivity`.
        column: ``"storage_B"``, ``"energy_nJ"`` or ``"latency_us"``.
        budget: the network's total allowed, in the column's unit.
        resolution: steps the budget is cut into.

    Returns:
        The chosen rows of ``table.options``, one per layer, in program order.

    Raises:
        ValueError: nothing fits (the message gives the cheapest possible total).
    """
    if column not in _COST_COLUMNS:
        raise ValueError(f"column must be one of {_COST_COLUMNS}, got {column!r}")
    check_positive_int("resolution", resolution)
    cheapest, _ = table.cost_range(column)
    room = budget - table.fixed[column]
    if cheapest > budget:
        raise ValueError(f"the budget ({budget:,.6g}) is below the cheapest network these options make "
                         f"({cheapest:,.6g}, every layer at its cheapest option); raise the budget or allow "
                         f"fewer bits or more zeros")
    # Each layer's cheapest option is paid first; only what the others cost above it is cut into steps, so the
    # cheapest combination always fits, however the rounding falls.
    floor = table.options.groupby("layer", sort=False)[column].min()
    room -= float(floor.sum())
    step = max(room, 0.0) / resolution
    options = table.options
    inf = np.inf
    best = np.zeros(resolution + 1)  # best[u]: least damage of the layers so far within u steps
    picks = []
    for name in table.layers:
        rows = options[options["layer"] == name]
        extra = rows[column].to_numpy() - floor[name]
        if step > 0:
            units = np.ceil(extra / step - 1e-9).astype(np.int64)
        else:  # no room above the cheapest options: only they fit
            units = np.where(extra <= 0, 0, resolution + 1).astype(np.int64)
        damage = rows["damage"].to_numpy()
        new = np.full(resolution + 1, inf)
        arg = np.full(resolution + 1, -1, np.int64)
        for k, (u, d) in enumerate(zip(units, damage)):
            if u > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[u:] = best[: resolution + 1 - u] + d
            better = cand < new
            new[better], arg[better] = cand[better], k
        best = new
        picks.append((rows, units, arg))
    u = int(np.argmin(best))
    if not np.isfinite(best[u]):  # only possible when rounding up ate the margin
        raise ValueError(f"the budget ({budget:,.6g}) leaves no room once costs are rounded to "
                         f"{resolution} steps; raise the budget slightly or the resolution")
    chosen = []
    for rows, units, arg in reversed(picks):
        k = int(arg[u])
        chosen.append(rows.iloc[k])
        u -= int(units[k])
    return pd.DataFrame(list(reversed(chosen))).reset_index(drop=True)


def uniform_settings(table: SensitivityTable, data=None, *, max_test: int | None = None) -> pd.DataFrame:
    """Every uniform setting (all layers at one bit-depth and one sparsity): its costs, and its accuracy.

    Args:
        table: from :func:`measure_sensitivity` (its bit-depths and sparsities).
        data: DataBundle (or test loader): when given, each setting runs on the
            test images (``accuracy``, percent); otherwise only the costs.
        max_test: at most this many test images.

    Returns:
        DataFrame: ``bits``, ``sparsity``, ``storage_B``, ``energy_nJ``,
        ``latency_us`` (exact totals: sums of the layers' rows and the fixed part)
        and ``accuracy`` when ``data`` is given.
    """
    g = table.options.groupby(["bits", "sparsity"], sort=True)
    costs = g[list(_COST_COLUMNS)].sum().reset_index()
    for c in _COST_COLUMNS:
        costs[c] += table.fixed[c]
    if data is not None:
        x, y = _images(data, max_test, "test") if max_test else _images(data, None, "test")
        acc = []
        for b, s in zip(costs["bits"], costs["sparsity"]):
            program = table.program_for({n: int(b) for n in table.layers}, {n: float(s) for n in table.layers})
            acc.append(100.0 * float(np.mean(run(program, x, config=table.hardware).predictions == y)))
        costs["accuracy"] = acc
    return costs


@dataclass
class PerLayerChoice:
    """What :func:`pick_per_layer` returns.

    Attributes:
        budget: ``{"name": "budget_bytes", "value": ..., "unit": "bytes", "column": "storage_B"}``.
        layers: one row per weight layer: ``layer``, ``bits``, ``sparsity``,
            ``damage`` (measured alone), ``storage_B``, ``energy_nJ``, ``latency_us``.
        how: ``"per-layer"`` (the knapsack's choice) or ``"uniform"`` (a
            uniform setting measured less damage on the sensitivity images).
        predicted: costs from the sensitivity table (``storage_bytes``,
            ``energy_uj``, ``latency_us``, exact sums of the layers' rows),
            ``damage`` (measured on the sensitivity images) and ``accuracy``
            (percent, on the sensitivity images: training images).
        measured: the chosen program's report (``storage_bytes``,
            ``energy_uj``, ``latency_us``), ``file_storage_bytes`` (the
            saved file's size less its header) and ``accuracy`` (percent,
            test images, integer engine).
        program: the chosen, compiled program.
        report: its cost report (:func:`nnlab.nna.report`).
        best_uniform: the uniform setting of least damage that fits
            (``bits``, ``sparsity``, ``damage``, costs), or None.
        retrained: with ``retrain_epochs > 0``: ``accuracy``, ``storage_bytes``,
            ``energy_uj``, ``latency_us``, ``fits``, and ``program`` and
            ``model`` (the retrained network); else None.
        sensitivity: the :class:`SensitivityTable` (reuse it for another budget).
    """

    budget: dict
    layers: pd.DataFrame
    how: str
    predicted: dict
    measured: dict
    program: object = field(repr=False)
    report: pd.DataFrame = field(repr=False)
    best_uniform: dict | None = None
    retrained: dict | None = None
    sensitivity: SensitivityTable | None = field(default=None, repr=False)

    @property
    def bits(self) -> dict:
        """Layer name -> chosen weight bit-depth."""
        return dict(zip(self.layers["layer"], self.layers["bits"].astype(int)))

    @property
    def sparsity(self) -> dict:
        """Layer name -> chosen share of zero weights."""
        return dict(zip(self.layers["layer"], self.layers["sparsity"].astype(float)))

    def summary(self) -> pd.DataFrame:
        """Predicted against measured, one row per figure."""
        keys = ["storage_bytes", "energy_uj", "latency_us", "accuracy"]
        return pd.DataFrame({"figure": keys, "predicted": [self.predicted.get(k) for k in keys],
                             "measured": [self.measured.get(k) for k in keys]})


def _file_storage_bytes(program, hardware) -> int:
    """Bytes the saved file spends on the program itself (its size less the header)."""
    fd, path = tempfile.mkstemp(suffix=".nna")
    os.close(fd)
    try:
        info = save(program, path, hardware)
        return int(info["file_bytes"] - info["header_bytes"])
    finally:
        os.unlink(path)


def _totals(rows: pd.DataFrame, table: SensitivityTable) -> dict:
    t = {c: float(rows[c].sum()) + table.fixed[c] for c in _COST_COLUMNS}
    return {"storage_bytes": int(round(t["storage_B"])), "energy_uj": t["energy_nJ"] / 1000,
            "latency_us": t["latency_us"]}


def _choose(table: SensitivityTable, name: str, budget: float, resolution: int):
    """(rows, how, best uniform dict or None) for one budget."""
    column, _, factor = BUDGETS[name]
    limit = budget / factor
    rows = solve_budget(table, column, limit, resolution=resolution)
    bits = dict(zip(rows["layer"], rows["bits"].astype(int)))
    share = dict(zip(rows["layer"], rows["sparsity"].astype(float)))
    damage = table.damage_of(table.program_for(bits, share))
    how, best_uniform = "per-layer", None
    uniform = uniform_settings(table)
    fitting = uniform[uniform[column] <= limit]
    # Within one sparsity more bits cost more: only the most bits that fit can be the best uniform setting.
    for _, u in fitting.sort_values("bits").groupby("sparsity").tail(1).iterrows():
        program = table.program_for({n: int(u["bits"]) for n in table.layers},
                                    {n: float(u["sparsity"]) for n in table.layers})
        d = table.damage_of(program)
        if best_uniform is None or d < best_uniform["damage"]:
            best_uniform = {"bits": int(u["bits"]), "sparsity": float(u["sparsity"]), "damage": d,
                            **{c: float(u[c]) for c in _COST_COLUMNS}}
    if best_uniform is not None and best_uniform["damage"] < damage:
        opts = table.options
        rows = pd.concat([opts[(opts["layer"] == n) & (opts["bits"] == best_uniform["bits"])
                               & (opts["sparsity"] == best_uniform["sparsity"])] for n in table.layers])
        rows = rows.reset_index(drop=True)
        how, damage = "uniform", best_uniform["damage"]
    return rows, how, damage, best_uniform


def pick_per_layer(model: nn.Module, data, *, budget_bytes: float | None = None,
                   budget_energy_uj: float | None = None, budget_latency_us: float | None = None,
                   bits=None, sparsities=None, act_bits: int = 8, hardware=None, images: int = 256,
                   max_test: int | None = None, retrain_epochs: int = 0, method: str = "random_subset",
                   resolution: int = 4000, sensitivity: SensitivityTable | None = None, seed: int = 0,
                   device="cpu", progress: bool = False) -> PerLayerChoice:
    """Choose each layer's weight bit-depth and sparsity so the simulated NNA fits one budget.

    Give exactly one budget: storage (bytes of weights and parameters the
    accelerator holds, as :func:`nnlab.nna.report` counts them and
    :func:`nnlab.nna.save` writes them), energy per inference (µJ) or
    latency per inference (µs).  See the module docstring for the method.

    Args:
        model: the trained float network (not changed).
        data: DataBundle: training images for calibration and sensitivity,
            test images for the measured accuracy.
        budget_bytes: storage budget, bytes.
        budget_energy_uj: energy budget per inference, µJ.
        budget_latency_us: latency budget per inference, µs.
        bits: weight bit-depths to choose from (default those of 2, 3, 4, 5, 6,
            8, 12, 16 the accelerator supports: 4..16 on the Series2NX-like preset).
        sparsities: shares of zero weights to choose from (default 0, 0.5, 0.75, 0.9).
        act_bits: activation bit-depth of every layer.
        hardware: :class:`nnlab.nna.NNAConfig` (default the Series2NX-like preset).
        images: training images the damages are measured on.
        max_test: at most this many test images for the measured accuracy (default all).
        retrain_epochs: when > 0, also core and quantise the float network as
            chosen, retrain it that many epochs (:func:`nnlab.quant.retrain`)
            and measure the result (``PerLayerChoice.retrained``).
        method: retraining method (``"random_subset"`` or ``"ste"``).
        resolution: steps the budget is cut into by the knapsack.
        sensitivity: a :class:`SensitivityTable` measured before (for the
            same model, data and hardware): skips step 2, so trying several
            budgets is quick.
        seed: picks the sensitivity images; seeds the retraining.
        device: where to retrain.
        progress: show progress bars.

    Returns:
        A :class:`PerLayerChoice`.

    Raises:
        ValueError: no budget or several, a budget that is not a positive
            finite number, a budget below the cheapest network the options
            make, bit-depths the accelerator does not support.
        TypeError: a budget that is not a number, a hardware that is not an NNAConfig.
    """
    name, value = _budget({"budget_bytes": budget_bytes, "budget_energy_uj": budget_energy_uj,
                           "budget_latency_us": budget_latency_us})
    check_int("retrain_epochs", retrain_epochs, minimum=0)
    check_positive_int("resolution", resolution)
    if max_test is not None:
        check_positive_int("max_test", max_test)
    if sensitivity is None:
        sensitivity = measure_sensitivity(model, data, bits=bits, sparsities=sparsities, act_bits=act_bits,
                                          hardware=hardware, images=images, seed=seed, progress=progress)
    elif not isinstance(sensitivity, SensitivityTable):
        raise TypeError(f"sensitivity must be a SensitivityTable from measure_sensitivity, got "
                        f"{type(sensitivity).__name__}")
    table = sensitivity
    hw = table.hardware
    column, unit, factor = BUDGETS[name]
    cheapest = table.cost_range(column)[0] * factor
    if value < cheapest:
        raise ValueError(f"{name}={value:,.6g} {unit} is below the cheapest network these options make on "
                         f"{hw.name} ({cheapest:,.6g} {unit}: every layer at its cheapest bit-depth and sparsity); "
                         f"raise the budget, or allow fewer bits or more zeros")
    rows, how, damage, best_uniform = _choose(table, name, value, resolution)
    bits_chosen = dict(zip(rows["layer"], rows["bits"].astype(int)))
    share_chosen = dict(zip(rows["layer"], rows["sparsity"].astype(float)))
    program = table.program_for(bits_chosen, share_chosen)

    # Predicted: from the sensitivity table alone; accuracy on the sensitivity images (training images).
    predicted = _totals(rows, table)
    _, y_sens = _images(data, len(table.images), "train", seed)
    sens_pred = run(program, table.images, config=hw).predictions
    predicted.update(damage=damage, accuracy=100.0 * float(np.mean(sens_pred == y_sens)))

    # Measured: the program's own report, its saved file, the test images.
    rep = report(program, hw)
    s = headline(rep)
    x_test, y_test = _images(data, max_test, "test") if max_test else _images(data, None, "test")
    measured = {"storage_bytes": s["storage_bytes"], "energy_uj": s["energy_uj"], "latency_us": s["latency_us"],
                "file_storage_bytes": _file_storage_bytes(program, hw),
                "accuracy": 100.0 * float(np.mean(run(program, x_test, config=hw).predictions == y_test))}
    measured_value = {"storage_B": s["storage_bytes"], "energy_nJ": s["energy_uj"] * 1000,
                      "latency_us": s["latency_us"]}[column] * factor
    if measured_value > value * (1 + 1e-9):
        raise RuntimeError(f"the chosen network costs {measured_value:,.6g} {unit} on the report but was predicted "
                           f"to fit {name}={value:,.6g}: the cost model and the picker disagree")

    retrained = None
    if retrain_epochs:
        retrained = _retrain(model, data, bits_chosen, share_chosen, act_bits=_act_bits(table), hardware=hw,
                             epochs=retrain_epochs, method=method, seed=seed, device=device, x_test=x_test,
                             y_test=y_test, column=column, factor=factor, limit=value, name=name, unit=unit,
                             progress=progress)
    return PerLayerChoice(budget={"name": name, "value": value, "unit": unit, "column": column},
                          layers=rows[["layer", "bits", "sparsity", "damage", *_COST_COLUMNS]].astype(
                              {"bits": int}), how=how, predicted=predicted, measured=measured, program=program,
                          report=rep, best_uniform=best_uniform, retrained=retrained, sensitivity=table)


def _act_bits(table: SensitivityTable) -> int:
    return table.program.weight_layers[0].in_grid.bits


def _retrain(model, data, bits, share, *, act_bits, hardware, epochs, method, seed, device, x_test, y_test, column,
             factor, limit, name, unit, progress):
    """Core and quantise the float network per layer as chosen, retrain, compile and measure."""
    net = _deepcopy(model).cpu().train()
    for layer, s in share.items():
        if s > 0:
            prune.core_by_fraction(net, s, scope="layer", layers=[layer])
    qmodel = quantise_model(net, data, 16, act_bits, overrides=dict(bits), device="cpu")
    retrain(qmodel, data, epochs, method=method, seed=seed, device=device, progress=progress)
    qmodel = qmodel.cpu().eval()
    program = compile_model(qmodel, data.input_shape)
    s = headline(report(program, hardware))
    value = {"storage_B": s["storage_bytes"], "energy_nJ": s["energy_uj"] * 1000, "latency_us": s["latency_us"]}
    fits = value[column] * factor <= limit * (1 + 1e-9)
    if not fits:
        warnings.warn(f"after retraining, the network costs {value[column] * factor:,.6g} {unit}, over "
                      f"{name}={limit:,.6g} (the zeros retraining kept differ from those the picker costed)",
                      stacklevel=3)
    return {"accuracy": 100.0 * float(np.mean(run(program, x_test, config=hardware).predictions == y_test)),
            "storage_bytes": s["storage_bytes"], "energy_uj": s["energy_uj"], "latency_us": s["latency_us"],
            "fits": bool(fits), "program": program, "model": qmodel}
