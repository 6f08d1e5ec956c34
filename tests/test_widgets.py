"""The course's interactive explorers (ipywidgets), driven from code (headless): their results agree with the
library, their controls follow ``update`` and a user's moves, and bad settings are refused."""

import copy
import json
import re

import pytest

from nnlab import prune as P
from nnlab.models import LeNet5
from nnlab.train import accuracy, fit
from nnlab.widgets.nna import NNAExplorer, nna_explorer


def _displayed(widget):
    """What a control displays, as the browser shows it."""
    if hasattr(widget, "readout_format"):
        return format(widget.value, widget.readout_format)
    return str(widget.label)


def _controls_match(explorer, controls):
    shown = json.loads(re.search(r'data-shown="([^"]*)"', explorer.label.value).group(1).replace("&quot;", '"'))
    displayed = {c.description: _displayed(c) for c in controls}
    assert shown == displayed, (shown, displayed)


# -- coring explorer ---------------------------------------------------------------------------------

def test_coring_explorer_agrees_with_core_by_fraction(small_data):
    from nnlab.widgets import coring_explorer

    net = LeNet5()
    fit(net, small_data, 1, progress=False)
    explorer = coring_explorer(net, small_data)
    result = explorer.update(mode="fraction", value=0.7, scope="global", layer="all layers")
    reference = P.core_by_fraction(copy.deepcopy(net), 0.7)
    assert result["sparsity"] == pytest.approx(P.sparsity(reference))
    assert result["accuracy"] == pytest.approx(accuracy(reference, small_data))
    assert not P.is_pruned(net[0])  # the explorer works on a copy
    result = explorer.update(mode="threshold", value=0.05, scope="global", layer="fc1")
    assert result["layer_sparsity"] == pytest.approx(float((net[7].weight.abs() < 0.05).float().mean()))
    result = explorer.update(mode="threshold", value=0.8, scope="layer", layer="all layers")
    reference = P.core_by_threshold(copy.deepcopy(net), 0.8, scope="layer")
    assert result["sparsity"] == pytest.approx(P.sparsity(reference))
    assert result["accuracy"] == pytest.approx(accuracy(reference, small_data))
    # moving the controls updates through the widget callbacks (update moved them: start from fraction, global)
    explorer.update(mode="fraction", value=0.5, scope="global", layer="all layers")
    explorer.value.value = 0.3
    assert explorer.result["layer_sparsity"] > 0 and len(explorer.image.value) > 0
    explorer.mode.value = "threshold"
    global_result = dict(explorer.result)
    explorer.scope.value = "layer"  # the threshold becomes relative to each layer's std
    assert explorer.value.description == "t / std" and explorer.value.value == 1.0
    assert explorer.result["sparsity"] != global_result["sparsity"]
    with pytest.raises(ValueError, match="fraction"):
        explorer.update(mode="fraction", value=1.2)


def test_coring_explorer_controls_follow_update(lenet, data):
    from nnlab.widgets import coring_explorer

    explorer = coring_explorer(lenet, data)
    controls = [explorer.mode, explorer.scope, explorer.layer, explorer.value]
    _controls_match(explorer, controls)
    result = explorer.update(mode="fraction", value=0.9, scope="global", layer="fc1")
    assert (explorer.value.value, explorer.layer.value, explorer.scope.value) == (0.9, "fc1", "global")
    _controls_match(explorer, controls)
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-4)
    explorer.update(mode="threshold", value=0.1, scope="layer", layer="conv1")
    assert (explorer.mode.value, explorer.value.description, explorer.value.value) == ("threshold", "t / std", 0.1)
    _controls_match(explorer, controls)
    # A bad setting moves nothing.
    with pytest.raises(ValueError, match="layer must be one of"):
        explorer.update(layer="7")
    assert explorer.layer.value == "conv1"
    # A user's move starts from what is shown.
    explorer.value.value = 0.5
    assert explorer.result["layer_sparsity"] > 0 and explorer.mode.value == "threshold"
    _controls_match(explorer, controls)


# -- bit explorer ------------------------------------------------------------------------------------

def test_bit_explorer_controls_follow_update_and_activation_bits_change_the_result(lenet, data):
    from nnlab.widgets import bit_explorer

    explorer = bit_explorer(lenet, data, max_test=300)
    controls = [explorer.weight_bits, explorer.act_bits, explorer.granularity, explorer.layer, explorer.layer_bits]
    explorer.update(weight_bits=4, act_bits=8, layer="fc1", overrides={"fc1": 6})
    assert (explorer.weight_bits.value, explorer.act_bits.value, explorer.layer.value) == (4, 8, "fc1")
    assert explorer.layer_bits.value == 6
    _controls_match(explorer, controls)
    before = dict(explorer.result), explorer.image.value
    explorer.act_bits.value = 3  # what a user does
    after = explorer.result
    assert after["act_bits"] == 3 and after["act_distinct"] <= 8 < before[0]["act_distinct"]
    assert explorer.image.value != before[1]  # the activation panel shows the new grid
    _controls_match(explorer, controls)
    explorer.layer.value = "conv1"  # its own bits: none
    assert explorer.layer_bits.value == "same as all"
    _controls_match(explorer, controls)


# -- NNA explorer ------------------------------------------------------------------------------------

def test_nna_explorer_sliders_follow_update(program, data):
    from nnlab.widgets import nna_explorer

    explorer = nna_explorer(program, data, max_test=200)
    controls = [*explorer.bits.values(), *explorer.sparsity.values()]
    _controls_match(explorer, controls)
    explorer.update(bits={"fc1": 16})
    at4 = explorer.update(bits={"fc1": 4})
    assert explorer.bits["fc1"].value == 4
    _controls_match(explorer, controls)
    # The next move (one bit less for conv2) keeps fc1 at 4 bits: storage goes down, not back up.
    explorer.bits["conv2"].value = explorer.bits["conv2"].value - 1
    assert explorer.result["storage_bytes"] < at4["storage_bytes"]
    _controls_match(explorer, controls)
    with pytest.raises(ValueError, match=r"bits\['fc1'\] must be in 4..16"):
        explorer.update(bits={"fc1": 2})
    assert explorer.bits["fc1"].value == 4


def test_explorer_updates_and_costs_follow_the_sliders(data, pretrained_program):
    prog = pretrained_program
    explorer = nna_explorer(prog, data, max_test=300)
    assert explorer.image.value[:4] == b"\x89PNG" and "accuracy" in explorer.label.value
    dense8 = explorer.update(bits={n: 8 for n in explorer.names}, sparsity={n: 0.0 for n in explorer.names})
    sparse4 = explorer.update(bits={n: 4 for n in explorer.names}, sparsity={n: 0.9 for n in explorer.names})
    assert sparse4["storage_bytes"] < dense8["storage_bytes"] / 4
    assert sparse4["energy_uj"] < dense8["energy_uj"]
    assert 0 <= sparse4["accuracy"] <= 100 and dense8["accuracy"] > 50
    before = explorer.result
    explorer.bits["fc1"].value = 5  # a slider move triggers an update
    assert explorer.result is not before and explorer.result["storage_bytes"] != before["storage_bytes"]
    assert set(explorer.bits) == {"conv1", "conv2", "fc1", "fc2", "fc3"}


def test_explorer_validates(data, pretrained_program):
    prog = pretrained_program
    with pytest.raises(TypeError, match="Program"):
        NNAExplorer("lenet5", data)
    explorer = NNAExplorer(prog, data, max_test=50)
    with pytest.raises(ValueError, match="weight_bits"):
        explorer.update(bits={"fc1": 1})
    with pytest.raises(ValueError, match="names layer"):
        explorer.update(sparsity={"8": 0.5})


# -- budget explorer ---------------------------------------------------------------------------------

def test_budget_explorer_moves_the_choice_with_the_slider(picker_net, data, picker_table, picker_grid):
    from nnlab.widgets import BudgetExplorer, budget_explorer

    explorer = budget_explorer(picker_net, data, sensitivity=picker_table, max_test=64)
    assert explorer.image.value[:4] == b"\x89PNG" and "accuracy" in explorer.label.value
    assert len(explorer.uniform) == len(picker_grid["bits"]) * len(picker_grid["sparsities"])
    assert explorer.uniform["accuracy"].between(0, 100).all()
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
        BudgetExplorer(picker_net, data, budget="budget_watts", sensitivity=picker_table)
    with pytest.raises(ValueError, match="value must be a budget_bytes between"):
        BudgetExplorer(picker_net, data, sensitivity=picker_table, value=1.0)
