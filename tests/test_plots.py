"""The course's plots draw what they are given (headless, Agg backend)."""

import copy

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nnlab import nna  # noqa: E402
from nnlab import prune as P  # noqa: E402
from nnlab.plots.nna import plot_nna_costs, plot_stages, plot_weight_codes  # noqa: E402


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def test_elimination_plots_draw(small_data):
    from nnlab.plots import plot_accuracy_vs_sparsity, plot_sensitivity, plot_weight_histograms

    net = tiny_net()
    pruned = P.core_by_fraction(copy.deepcopy(net), 0.5)
    fig = plot_weight_histograms({"original": net, "pruned": pruned})
    assert len(fig.axes) == 2 and "50% zero" in fig.axes[1].get_title()
    ax = plot_accuracy_vs_sparsity({"no retraining": {"sparsity": [0, 0.5], "accuracy": [99, 90]}}, dense_acc=99)
    assert len(ax.lines) == 2
    table = P.sensitivity_analysis(net, small_data, sparsities=(0.0, 0.5))
    assert len(plot_sensitivity(table).lines) == 2


def test_nna_plots_draw(data, pretrained_program):
    prog = pretrained_program
    table = nna.report(prog)
    fig = plot_nna_costs(table)
    assert len(fig.axes) == 3
    assert plot_weight_codes(prog.layer("fc1")).axes[0].get_title().startswith("layer fc1")
    stages = pd.DataFrame({"stage": ["fp32", "nna"], "accuracy": [99.0, 98.8], "energy_uj": [65.0, 2.0]})
    assert plot_stages(stages).axes[0].get_xscale() == "log"
    with pytest.raises(TypeError, match="report"):
        plot_nna_costs(pd.DataFrame({"a": [1]}))


def test_pareto_points_are_distinguishable():
    stages = pd.DataFrame({"stage": ["fp32", "pruned", "distilled", "nna"], "accuracy": [99.1, 99.0, 99.05, 98.9],
                           "energy_uj": [65.0, 65.0, 65.0, 2.0]})
    ax = plot_stages(stages).axes[0]
    markers = [(c.get_paths()[0].vertices.tobytes(), tuple(c.get_edgecolor()[0])) for c in ax.collections]
    assert len(set(markers)) == 4  # each stage its own shape and colour
    assert all(len(c.get_facecolor()) == 0 or c.get_facecolor()[0][3] == 0 for c in ax.collections)  # hollow
    numbers = sorted((t.get_text(), t.get_position()) for t in ax.texts)
    assert [n for n, _ in numbers] == ["1", "2", "3", "4"]
    offsets = {t.get_text(): t.xyann[0] for t in ax.texts}
    assert len({offsets["1"], offsets["2"]}) == 2  # same cost: numbers on both sides
