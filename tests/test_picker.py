"""The budget picker: it fits the budget, its predicted storage is the saved file's, its knapsack is optimal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nnlab import nna, picker, quant
from nnlab.models import build_model



def _pick(picker_net, data, picker_table, **budget):
    return picker.pick_per_layer(picker_net, data, sensitivity=picker_table, max_test=64, **budget)


def test_sensitivity_table_has_every_option(picker_table, picker_grid):
    bits, sparsities = picker_grid["bits"], picker_grid["sparsities"]
    assert len(picker_table.options) == len(picker_table.layers) * len(bits) * len(sparsities)
    reference = picker_table.options[(picker_table.options.bits == 16) & (picker_table.options.sparsity == 0)]
    assert (reference.damage.abs() < 1e-12).all(), "the reference option itself must do no damage"
    assert (picker_table.options.damage >= 0).all()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.8])
def test_storage_budget_is_respected_and_predicted_storage_is_the_saved_payload(picker_net, data, picker_table,
                                                                                picker_grid, fraction):
    lo, hi = picker_table.cost_range("storage_B")
    budget = lo + fraction * (hi - lo)
    choice = _pick(picker_net, data, picker_table, budget_bytes=budget)
    assert choice.measured["storage_bytes"] <= budget
    assert choice.predicted["storage_bytes"] == choice.measured["storage_bytes"]
    assert choice.predicted["storage_bytes"] == choice.measured["file_storage_bytes"]
    assert nna.storage_bytes(choice.program, picker_table.hardware) == choice.measured["file_storage_bytes"]
    assert set(choice.bits.values()) <= set(picker_grid["bits"])
    assert set(choice.sparsity.values()) <= set(picker_grid["sparsities"])


@pytest.mark.parametrize("name,column,factor", [("budget_energy_uj", "energy_uj", 1e-3),
                                                ("budget_latency_us", "latency_us", 1.0)])
def test_energy_and_latency_budgets_are_respected(picker_net, data, picker_table, name, column, factor):
    key = {"budget_energy_uj": "energy_nJ", "budget_latency_us": "latency_us"}[name]
    lo, hi = picker_table.cost_range(key)
    budget = (lo + 0.4 * (hi - lo)) * factor
    choice = _pick(picker_net, data, picker_table, **{name: budget})
    assert choice.measured[column] <= budget * (1 + 1e-12)
    assert math.isclose(choice.predicted[column], choice.measured[column], rel_tol=1e-9)


def test_the_knapsack_finds_the_least_damage_that_fits(picker_table):
    """Brute force over every combination: the solver fits, and is at least as good as any combination that
    fits with one rounding step per layer to spare."""
    lo, hi = picker_table.cost_range("storage_B")
    budget = lo + 0.35 * (hi - lo)
    resolution = 500
    chosen = picker.solve_budget(picker_table, "storage_B", budget, resolution=resolution)
    assert chosen["storage_B"].sum() + picker_table.fixed["storage_B"] <= budget
    options = picker_table.options
    per_layer = [options[options.layer == n][["storage_B", "damage"]].to_numpy() for n in picker_table.layers]
    floor = picker_table.options.groupby("layer")["storage_B"].min().sum()
    spare = len(picker_table.layers) * (budget - picker_table.fixed["storage_B"] - floor) / resolution
    best = min(sum(r[1] for r in combo) for combo in itertools.product(*per_layer)
               if sum(r[0] for r in combo) + picker_table.fixed["storage_B"] <= budget - spare)
    assert chosen["damage"].sum() <= best + 1e-12


def test_never_worse_than_the_best_uniform_setting_on_its_own_images(picker_net, data, picker_table):
    lo, hi = picker_table.cost_range("storage_B")
    for fraction in (0.2, 0.6):
        choice = _pick(picker_net, data, picker_table, budget_bytes=lo + fraction * (hi - lo))
        assert choice.best_uniform is not None
        assert choice.predicted["damage"] <= choice.best_uniform["damage"] + 1e-12


def test_a_larger_budget_never_does_more_damage(picker_net, data, picker_table):
    lo, hi = picker_table.cost_range("storage_B")
    damages = [_pick(picker_net, data, picker_table, budget_bytes=lo + f * (hi - lo)).predicted["damage"]
               for f in (0.2, 0.5, 1.0)]
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
def test_bad_budgets_are_clear_errors(picker_net, data, picker_table, budget, error, match):
    with pytest.raises(error, match=match):
        _pick(picker_net, data, picker_table, **budget)


def test_bits_the_accelerator_cannot_run_are_refused(picker_net, data):
    with pytest.raises(ValueError, match="bits contains 2, but .* supports 4 to 16"):
        picker.measure_sensitivity(picker_net, data, bits=(2, 8))
    with pytest.raises(ValueError, match="sparsities entry must be"):
        picker.measure_sensitivity(picker_net, data, sparsities=(0.0, 1.0))


def test_a_network_pruned_with_torch_prune_keeps_its_zeros(data):
    from nnlab import prune

    torch.manual_seed(1)
    net = build_model("lenet5").eval()
    prune.core_by_fraction(net, 0.5, scope="layer")
    table = picker.measure_sensitivity(net, data, bits=(8,), sparsities=(0.0,), images=16)
    choice = picker.pick_per_layer(net, data, sensitivity=table, max_test=32, budget_bytes=10**9)
    dense = picker.measure_sensitivity(build_model("lenet5").eval(), data, bits=(8,), sparsities=(0.0,), images=16)
    # The zeros the pruning made are not stored: the pruned network costs fewer bytes than a dense one.
    assert choice.measured["storage_bytes"] < picker.pick_per_layer(
        build_model("lenet5").eval(), data, sensitivity=dense, max_test=32, budget_bytes=10**9).measured["storage_bytes"]
