"""The NNA explorer widget and the deployment plots, driven programmatically (headless)."""

import pytest

import nnlab
from nnlab import nna
from nnlab.plots.nna import plot_nna_costs, plot_stages, plot_weight_codes
from nnlab.widgets.nna import NNAExplorer, nna_explorer


@pytest.fixture(scope="module")
def program():
    data = nnlab.data.load_data(verbose=False)
    net = nnlab.cache.pretrained("lenet5", data=data, quick=True, verbose=False)
    return data, nna.compile_model(nnlab.quant.quantise_model(net, data, 16, 8))


def test_explorer_updates_and_costs_follow_the_sliders(program):
    data, prog = program
    explorer = nna_explorer(prog, data, max_test=300)
    assert explorer.image.value[:4] == b"\x89PNG" and "accuracy" in explorer.label.value
    dense8 = explorer.update(bits={n: 8 for n in explorer.names}, sparsity={n: 0.0 for n in explorer.names})
    sparse4 = explorer.update(bits={n: 4 for n in explorer.names}, sparsity={n: 0.9 for n in explorer.names})
    assert sparse4["storage_bytes"] < dense8["storage_bytes"] / 4
    assert sparse4["energy_uj"] < dense8["energy_uj"]
    assert 0 <= sparse4["accuracy"] <= 100 and dense8["accuracy"] > 50
    explorer.bits["fc1"].value = 5  # a slider move triggers an update
    assert explorer.result["seconds"] < 5
    assert set(explorer.bits) == {"conv1", "conv2", "fc1", "fc2", "fc3"}


def test_explorer_validates(program):
    data, prog = program
    with pytest.raises(TypeError, match="Program"):
        NNAExplorer("lenet5", data)
    explorer = NNAExplorer(prog, data, max_test=50)
    with pytest.raises(ValueError, match="weight_bits"):
        explorer.update(bits={"fc1": 1})
    with pytest.raises(ValueError, match="names layer"):
        explorer.update(sparsity={"8": 0.5})


def test_plots_draw(program):
    data, prog = program
    table = nna.report(prog)
    fig = plot_nna_costs(table)
    assert len(fig.axes) == 3
    assert plot_weight_codes(prog.layer("fc1")).axes[0].get_title().startswith("layer fc1")
    import pandas as pd
    stages = pd.DataFrame({"stage": ["fp32", "nna"], "accuracy": [99.0, 98.8], "energy_uj": [65.0, 2.0]})
    assert plot_stages(stages).axes[0].get_xscale() == "log"
    with pytest.raises(TypeError, match="report"):
        plot_nna_costs(pd.DataFrame({"a": [1]}))
