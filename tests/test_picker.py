"""The budget picker: it fits the budget, its predicted storage is the saved file's, its knapsack is optimal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nnlab import nna, quant
from nnlab.models import build_model

BITS = (4, 8, 16)
SPARSITIES = (0.0, 0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("lenet5").eval()  # untrained: costs and the knapsack do not need accuracy


@pytest.fixture(scope="module")
def table(model, data):
    return quant.measure_sensitivity(model, data, bits=BITS, sparsities=SPARSITIES, images=32)


def _pick(model, data, table, **budget):
    return quant.pick_per_layer(model, data, sensitivity=table, max_test=64, **budget)


def test_sensitivity_table_has_every_option(table):
    assert len(table.options) == len(table.layers) * len(BITS) * len(SPARSITIES)
    reference = table.options[(table.options.bits == 16) & (table.options.sparsity == 0)]
    assert (reference.damage.abs() < 1e-12).all(), "the reference option itself must do no damage"
    assert (table.options.damage >= 0).all()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.8])
def test_storage_budget_is_respected_and_predicted_storage_is_the_saved_payload(model, data, table, fraction):
    lo, hi = table.cost_range("storage_B")
    budget = lo + fraction * (hi - lo)
    choice = _pick(model, data, table, budget_bytes=budget)
    assert choice.measured["storage_bytes"] <= budget
    assert choice.predicted["storage_bytes"] == choice.measured["storage_bytes"]
    assert choice.predicted["storage_bytes"] == choice.measured["file_storage_bytes"]
    assert nna.storage_bytes(choice.program, table.hardware) == choice.measured["file_storage_bytes"]
    assert set(choice.bits.values()) <= set(BITS) and set(choice.sparsity.values()) <= set(SPARSITIES)


@pytest.mark.parametrize("name,column,factor", [("budget_energy_uj", "energy_uj", 1e-3),
                                                ("budget_latency_us", "latency_us", 1.0)])
def test_energy_and_latency_budgets_are_respected(model, data, table, name, column, factor):
    key = {"budget_energy_uj": "energy_nJ", "budget_latency_us": "latency_us"}[name]
    lo, hi = table.cost_range(key)
    budget = (lo + 0.4 * (hi - lo)) * factor
    choice = _pick(model, data, table, **{name: budget})
    assert choice.measured[column] <= budget * (1 + 1e-12)
    assert math.isclose(choice.predicted[column], choice.measured[column], rel_tol=1e-9)


def test_the_knapsack_finds_the_least_damage_that_fits(table):
    """Brute force over every combination: the solver fits, and is at least as good as any combination that
    fits with one rounding step per layer to spare."""
    lo, hi = table.cost_range("storage_B")
    budget = lo + 0.35 * (hi - lo)
    resolution = 500
    chosen = quant.solve_budget(table, "storage_B", budget, resolution=resolution)
    assert chosen["storage_B"].sum() + table.fixed["storage_B"] <= budget
    per_layer = [table.options[table.options.layer == n][["storage_B", "damage"]].to_numpy() for n in table.layers]
    floor = table.options.groupby("layer")["storage_B"].min().sum()
    spare = len(table.layers) * (budget - table.fixed["storage_B"] - floor) / resolution
    best = min(sum(r[1] for r in combo) for combo in itertools.product(*per_layer)
               if sum(r[0] for r in combo) + table.fixed["storage_B"] <= budget - spare)
    assert chosen["damage"].sum() <= best + 1e-12


def test_never_worse_than_the_best_uniform_setting_on_its_own_images(model, data, table):
    lo, hi = table.cost_range("storage_B")
    for fraction in (0.2, 0.6):
        choice = _pick(model, data, table, budget_bytes=lo + fraction * (hi - lo))
        assert choice.best_uniform is not None
        assert choice.predicted["damage"] <= choice.best_uniform["damage"] + 1e-12


def test_a_larger_budget_never_does_more_damage(model, data, table):
    lo, hi = table.cost_range("storage_B")
    damages = [_pick(model, data, table, budget_bytes=lo + f * (hi - lo)).predicted["damage"] for f in (0.2, 0.5, 1.0)]
    assert damages[0] >= damages[1] - 1e-12 >= damages[2] - 2e-12
    assert damages[2] < 1e-12, "an unlimited budget keeps every layer at the reference"


@pytest.mark.parametrize("budget,error,match", [
    ({}, ValueError, "exactly one budget"),
    ({"budget_bytes": 1e5, "budget_latency_us": 3.0}, ValueError, "exactly one budget"),
    ({"budget_bytes": 0}, ValueError, "budget_bytes must be a positive"),
    ({"budget_bytes": -5}, ValueError, "budget_bytes must be a positive"),
    ({"budget_energy_uj": float("nan")}, ValueError, "budget_energy_uj must be a positive"),
    ({"budget_latency_us": float("inf")}, ValueError, "budget_latency_us must be a positive"),
    ({"budget_bytes": "10kB"}, TypeError, "budget_bytes must be a positive number"),
    ({"budget_bytes": True}, TypeError, "budget_bytes must be a positive number"),
    ({"budget_bytes": 10}, ValueError, r"budget_bytes=10 bytes is below the cheapest network"),
])
def test_bad_budgets_are_clear_errors(model, data, table, budget, error, match):
    with pytest.raises(error, match=match):
        _pick(model, data, table, **budget)


def test_bits_the_accelerator_cannot_run_are_refused(model, data):
    with pytest.raises(ValueError, match="bits contains 2, but .* supports 4 to 16"):
        quant.measure_sensitivity(model, data, bits=(2, 8))
    with pytest.raises(ValueError, match="sparsities entry must be"):
        quant.measure_sensitivity(model, data, sparsities=(0.0, 1.0))


def test_budget_explorer_moves_the_choice_with_the_slider(model, data, table):
    from nnlab.widgets import BudgetExplorer, budget_explorer

    explorer = budget_explorer(model, data, sensitivity=table, max_test=64)
    assert explorer.image.value[:4] == b"\x89PNG" and "accuracy" in explorer.label.value
    assert len(explorer.uniform) == len(BITS) * len(SPARSITIES) and explorer.uniform["accuracy"].between(0, 100).all()
    image, label = explorer.image.value, explorer.label.value
    explorer.slider.value = explorer.slider.min  # a slider move triggers an update
    tight = dict(explorer.result)
    assert tight["budget"] == pytest.approx(explorer.slider.min)
    assert tight["storage_bytes"] <= explorer.slider.min
    assert explorer.image.value != image and explorer.label.value != label
    explorer.slider.value = explorer.slider.max
    loose = dict(explorer.result)
    assert loose["bits"] != tight["bits"]
    assert set(loose["bits"].values()) == {16}, "the whole range affords the reference everywhere"
    with pytest.raises(ValueError, match="budget must be one of"):
        BudgetExplorer(model, data, budget="budget_watts", sensitivity=table)
    with pytest.raises(ValueError, match="value must be a budget_bytes between"):
        BudgetExplorer(model, data, sensitivity=table, value=1.0)


def test_a_network_pruned_with_torch_prune_keeps_its_zeros(data):
    from nnlab import prune

    torch.manual_seed(1)
    net = build_model("lenet5").eval()
    prune.core_by_fraction(net, 0.5, scope="layer")
    table = quant.measure_sensitivity(net, data, bits=(8,), sparsities=(0.0,), images=16)
    choice = quant.pick_per_layer(net, data, sensitivity=table, max_test=32, budget_bytes=10**9)
    dense = quant.measure_sensitivity(build_model("lenet5").eval(), data, bits=(8,), sparsities=(0.0,), images=16)
    # The zeros the pruning made are not stored: the pruned network costs fewer bytes than a dense one.
    assert choice.measured["storage_bytes"] < quant.pick_per_layer(
        build_model("lenet5").eval(), data, sensitivity=dense, max_test=32, budget_bytes=10**9).measured["storage_bytes"]
